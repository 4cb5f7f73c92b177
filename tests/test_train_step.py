"""The sharded joint step: mesh invariance, stage 3 gradient paths, frozen networks, non-finite skipping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2etts_jax import objectives, optim, sharding, train_step
from e2etts_jax.system import DataInfo, System

INFO = DataInfo(text_vocab_size=64, num_ctc_classes=29, num_speakers=4, num_aux=2)


@pytest.fixture
def system(tiny_config):
  return System(tiny_config, INFO)


def _run(system, stage, mesh_shape, batch, steps=2):
  c = system.config
  c.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
  devices = jax.devices()[: int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(c.mesh, devices)
  tx = optim.make_optimizer(c, stage)
  state, sh = train_step.create_train_state(system, tx, mesh, jax.random.key(0))
  step = train_step.make_train_step(system, tx, stage, mesh, sh, batch)
  losses = []
  for _ in range(steps):
    state, m = step(state, batch, jax.random.key(1))
    losses.append(float(m["loss/total"]))
  return losses, jax.device_get(state.params)


def test_sharded_step_matches_single_device(system):
  # Full learning rate from the first step (lr 1e-3), so each update moves parameters by ~1e-3: the atol below
  # is 1% of one update. It is needed because Adam divides by sqrt(v): reduction-order noise (~1e-7) in a
  # near-zero gradient becomes a visible but tiny difference in that parameter's update.
  system.config.train.stage1.warmup_steps = 1
  batch = system.random_batch(8, 100, seed=0)
  ref_losses, ref_params = _run(system, "stage1", (1, 1, 1), batch)
  for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    losses, params = _run(system, "stage1", shape, batch)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(shape))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=str(shape)),
                 params, ref_params)


def test_stage3_llm_gets_gradient_through_fm_and_rm_paths(system):
  c = system.config
  params = jax.tree.map(jnp.asarray, __import__("flax").linen.unbox(system.init(jax.random.key(0))))
  batch = system.random_batch(4, 100, seed=1)

  def llm_grad(weights):
    c.train.stage3.weights.update({k: 0.0 for k in c.train.stage3.weights})
    c.train.stage3.weights.update(weights)
    g = jax.grad(lambda p: objectives.loss_fn(p, batch, jax.random.key(2), system=system, stage="stage3")[0])(params)
    return g

  for path in ("e2e_fm", "e2e_asr", "e2e_spk"):
    g = llm_grad({path: 1.0})
    assert optimizer_norm(g["llm"]) > 0, path
    for frozen in ("tokenizer", "fm", "rm"):
      assert optimizer_norm(g[frozen]) == 0, (path, frozen)


def optimizer_norm(tree):
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


def test_stage3_frozen_networks_bit_identical_after_step(system):
  batch = system.random_batch(4, 100, seed=2)
  c = system.config
  c.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  tx = optim.make_optimizer(c, "stage3")
  state, sh = train_step.create_train_state(system, tx, mesh, jax.random.key(0))
  before = jax.device_get(state.params)
  step = train_step.make_train_step(system, tx, "stage3", mesh, sh, batch)
  state, _ = step(state, batch, jax.random.key(1))
  after = jax.device_get(state.params)
  for frozen in ("tokenizer", "fm", "rm"):
    jax.tree.map(np.testing.assert_array_equal, after[frozen], before[frozen])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after["llm"], before["llm"]))
  assert all(changed)


def test_non_finite_loss_skips_update_and_counts(system):
  batch = system.random_batch(4, 100, seed=3)
  batch["mel"] = batch["mel"].at[0, 0, 0].set(jnp.nan)
  c = system.config
  c.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  tx = optim.make_optimizer(c, "stage2")
  state, sh = train_step.create_train_state(system, tx, mesh, jax.random.key(0))
  before = jax.device_get(state.params)
  step = train_step.make_train_step(system, tx, "stage2", mesh, sh, batch)
  for i in range(2):
    state, m = step(state, batch, jax.random.key(1))
    assert float(m["skipped"]) == 1.0
  assert int(state.bad_steps) == 2 and int(state.total_bad_steps) == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
