"""The optimizer: per-network learning-rate scales, frozen networks, the warm-up/cosine schedule, Muon."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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


def test_stage_lr_scale_multiplies_one_networks_updates_in_that_stage_only(tiny_config):
  """train.<stage>.lr_scale.<net> scales that network's updates in that stage, on top of train.lr_scale."""
  c = tiny_config
  c.train.weight_decay = 0.0
  for stage in ("stage1", "stage2"):
    c.train[stage].trainable = "tokenizer,llm,fm,rm"
    c.train[stage].warmup_steps = 1
  c.train.lr_scale.rm = 0.5
  c.train.stage2.lr_scale.rm = 0.3
  grads = jax.tree.map(jnp.ones_like, _params())

  def peak_updates(stage):
    tx = optim.make_optimizer(c, stage)
    state = tx.init(_params())
    for _ in range(2):   # step 0 runs at LR 0 (warm-up from 0); step 1 at the peak
      updates, state = tx.update(grads, state, _params())
    return {n: np.asarray(updates[n]["dense"]["kernel"]) for n in ("llm", "rm")}

  for stage, scale in (("stage1", 0.5), ("stage2", 0.5 * 0.3)):
    u = peak_updates(stage)
    assert np.all(u["llm"] < 0)
    np.testing.assert_allclose(u["rm"], scale * u["llm"], rtol=1e-6)


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


@pytest.mark.parametrize("steps, warmup", [(100, 10), (24, 1), (5, 0), (3, 5)])
def test_schedule_matches_optax_warmup_cosine(tiny_config, steps, warmup):
  s = tiny_config.train.stage1
  s.steps, s.warmup_steps, s.learning_rate = steps, warmup, 2e-3
  ref = optax.warmup_cosine_decay_schedule(0.0, 2e-3, warmup, max(steps, warmup + 1), end_value=2e-4)
  ours = optim.schedule(tiny_config, "stage1")
  np.testing.assert_allclose([float(ours(i)) for i in range(steps + 5)], [float(ref(i)) for i in range(steps + 5)],
                             rtol=1e-5, atol=1e-10)


def test_the_schedule_argument_overrides_the_configs_and_the_state_is_adamws(tiny_config):
  c = tiny_config
  c.train.stage1.trainable = "tokenizer,llm,fm,rm"
  tx = optim.make_optimizer(c, "stage1")
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  # The state tree is optax.adamw's (with a schedule) under the per-network clip: checkpoints restore either way.
  adamw = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lambda n: 1e-3, mask=optim._decay_mask))
  reference = optax.multi_transform({n: adamw for n in optim.NETWORKS},
                                   lambda p: {n: jax.tree.map(lambda _: n, p[n]) for n in p})
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(reference.init(params))
  state = tx.update(grads, tx.init(params), params)[1]        # count 1: past the 1-step warm-up below
  values = np.array([0.5, 1, 10], np.float32)
  updates, _ = tx.update(grads, state, params, schedule=values)
  plain = optax.with_extra_args_support(optax.chain(optax.clip_by_global_norm(c.train.grad_clip), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, 0.5, 1, 10, end_value=0.05), b1=c.train.b1, b2=c.train.b2,
      weight_decay=c.train.weight_decay, mask=optim._decay_mask)))
  pstate = plain.update(grads, plain.init(params), params)[1]
  expected = plain.update(grads, pstate, params)[0]
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def _block_params():
  """A network's parameters as the models lay them out: block kernels stacked over 2 layers, the attention's
  heads x kv axes, plus an input projection, a norm and a head that stay AdamW's."""
  k = jax.random.split(jax.random.key(0), 6)
  net = {"layers": {"attn": {"query": {"kernel": jax.random.normal(k[0], (2, 12, 3, 4))},
                             "out": {"kernel": jax.random.normal(k[1], (2, 3, 4, 12))}},
                    "mlp": {"up": {"kernel": jax.random.normal(k[2], (2, 12, 20))}},
                    "attn_norm": {"scale": jnp.ones((2, 12))}},
         "code_in": {"kernel": jax.random.normal(k[3], (8, 12)), "bias": jnp.zeros((12,))},
         "head": {"kernel": jax.random.normal(k[4], (12, 5))}}
  return {n: net for n in optim.NETWORKS}


def test_muon_takes_the_block_matrices_with_heads_as_one_axis():
  dims = optim.muon_dimensions(_block_params())["fm"]
  assert tuple(dims["layers"]["attn"]["query"]["kernel"]) == ((1,), (2, 3))
  assert tuple(dims["layers"]["attn"]["out"]["kernel"]) == ((1, 2), (3,))
  assert tuple(dims["layers"]["mlp"]["up"]["kernel"]) == ((1,), (2,))
  for leaf in (dims["layers"]["attn_norm"]["scale"], dims["code_in"]["kernel"], dims["code_in"]["bias"],
               dims["head"]["kernel"]):
    assert leaf is None


def test_muon_matches_optax_contrib_muon_and_keeps_adamw_elsewhere(tiny_config):
  """train.optimizer='muon' is optax.contrib.muon at consistent RMS 0.2 on the block matrices (the same numbers),
  and exactly the AdamW configuration's updates on every other parameter."""
  c = tiny_config
  c.train.stage1.trainable = "tokenizer,llm,fm,rm"
  c.train.stage1.warmup_steps = 1
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1e9
  params = _block_params()
  grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1.0)), params) for i in range(3)]

  def run(tx):
    state, out = tx.init(params), []
    for g in grads:
      updates, state = tx.update(g, state, params)
      out.append(updates)
    return out

  adamw = run(optim.make_optimizer(c, "stage1"))
  c.train.optimizer = "muon"
  ours = run(optim.make_optimizer(c, "stage1"))
  reference = optax.contrib.muon(optim.schedule(c, "stage1"), beta=c.train.muon_momentum, adam_b1=c.train.b1,
                                 adam_b2=c.train.b2, adam_learning_rate=optim.schedule(c, "stage1"),
                                 muon_weight_dimension_numbers=optim.muon_dimensions, consistent_rms=0.2)
  reference = run(reference)
  dims = optim.muon_dimensions(params)
  for step in range(1, 3):   # step 0 runs at LR 0
    flat_dims = jax.tree.leaves(dims, is_leaf=optim._is_dims)
    assert len(flat_dims) == len(jax.tree.leaves(params)) and sum(d is not None for d in flat_dims) == 12
    for d, a, m, r in zip(flat_dims, jax.tree.leaves(adamw[step]), jax.tree.leaves(ours[step]),
                          jax.tree.leaves(reference[step])):
      if d is None:
        np.testing.assert_array_equal(m, a)
      else:
        np.testing.assert_allclose(m, r, rtol=1e-5, atol=1e-9)
        assert not np.allclose(m, a, rtol=0.1)
  # The orthogonalised update of each layer's [in, out] matrix has its singular values bunched near one value
  # (Newton-Schulz's quintic leaves them within about [0.7, 1.2]), where the gradient's spread.
  up = np.asarray(ours[2]["llm"]["layers"]["mlp"]["up"]["kernel"][0])
  sv = np.linalg.svd(up, compute_uv=False)
  g_sv = np.linalg.svd(np.asarray(grads[2]["llm"]["layers"]["mlp"]["up"]["kernel"][0]), compute_uv=False)
  assert sv.max() / sv.min() < 2.5 < g_sv.max() / g_sv.min()


def test_muon_networks_leave_the_others_on_adamw(tiny_config):
  c = tiny_config
  c.train.stage1.trainable = "tokenizer,llm,fm,rm"
  c.train.stage1.warmup_steps = 1
  params = _block_params()
  grads = jax.tree.map(jnp.cos, params)

  def second_updates():
    tx = optim.make_optimizer(c, "stage1")
    state = tx.update(grads, tx.init(params), params)[1]
    return tx.update(grads, state, params)[0]

  adamw = second_updates()
  c.train.optimizer, c.train.muon_networks = "muon", "llm,rm"
  mixed = second_updates()
  for net in optim.NETWORKS:
    a = np.asarray(adamw[net]["layers"]["mlp"]["up"]["kernel"])
    m = np.asarray(mixed[net]["layers"]["mlp"]["up"]["kernel"])
    if net in ("llm", "rm"):
      assert not np.allclose(m, a, rtol=0.1)
    else:
      np.testing.assert_array_equal(m, a)


def test_config_rejects_an_unknown_optimizer_or_muon_network(tiny_config):
  from e2etts_jax import config_lib
  tiny_config.train.optimizer = "sgd"
  with pytest.raises(config_lib.ConfigError, match="train.optimizer='sgd'"):
    config_lib.validate(tiny_config)
  tiny_config.train.optimizer = "muon"
  tiny_config.train.muon_networks = "llm,tokeniser"
  with pytest.raises(config_lib.ConfigError, match="muon_networks names unknown network 'tokeniser' .*'tokenizer'"):
    config_lib.validate(tiny_config)
  tiny_config.train.muon_networks = "llm"
  tiny_config.train.muon_rms = 0.0
  with pytest.raises(config_lib.ConfigError, match="train.muon_rms=0.0: must be > 0"):
    config_lib.validate(tiny_config)
