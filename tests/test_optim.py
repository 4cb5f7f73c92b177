"""The optimizer: per-network learning-rate scales, frozen networks, the warm-up/cosine schedule."""
import jax
import jax.numpy as jnp
import numpy as np

from e2etts_jax import optim


def _params():
  return {n: {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros((2,))}} for n in optim.NETWORKS}


def test_lr_scale_multiplies_one_networks_updates(tiny_config):
  c = tiny_config
  c.train.stage1.trainable = "tokenizer,llm,fm,rm"
  c.train.stage1.warmup_steps = 1
  c.train.weight_decay = 0.0
  c.train.lr_scale.tokenizer = 0.1
  tx = optim.make_optimizer(c, "stage1")
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  for _ in range(2):   # step 0 runs at LR 0 (warm-up from 0); step 1 at the peak
    updates, state = tx.update(grads, state, params)
  tok = np.asarray(updates["tokenizer"]["dense"]["kernel"])
  llm = np.asarray(updates["llm"]["dense"]["kernel"])
  assert np.all(llm < 0)
  np.testing.assert_allclose(tok, 0.1 * llm, rtol=1e-6)
  np.testing.assert_allclose(llm, -optim.schedule(c, "stage1")(1) * np.ones_like(llm), rtol=1e-3)


def test_frozen_networks_get_zero_updates(tiny_config):
  c = tiny_config
  c.train.stage2.trainable = "llm"
  tx = optim.make_optimizer(c, "stage2")
  params = _params()
  state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  for n in ("tokenizer", "fm", "rm"):
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates[n]))


def test_schedule_warms_up_then_decays_to_a_tenth(tiny_config):
  c = tiny_config
  s = c.train.stage1
  s.steps, s.warmup_steps, s.learning_rate = 100, 10, 1e-3
  lr = optim.schedule(c, "stage1")
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(100)), 1e-4, rtol=1e-6)
  assert float(lr(55)) < 1e-3
