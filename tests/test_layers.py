"""Shared layers: KV cache parity, causality, padding masks, AdaLN-Zero identity, remat/dtype/unroll policies,
the attention core against jax.nn.dot_product_attention, the MLP's depthwise convolution."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2etts_jax.models import layers as L


def _cfg(**kw):
  base = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
  base.update(kw)
  return L.TransformerConfig(**base)


def _init(cfg, x, valid, **kw):
  m = L.Transformer(cfg)
  return m, nn.unbox(m.init(jax.random.key(1), x, valid, **kw))


def test_kv_cache_matches_full_forward():
  cfg = _cfg(causal=True)
  x = jax.random.normal(jax.random.key(0), (2, 9, 32))
  valid = jnp.ones((2, 9), bool)
  m, v = _init(cfg, x, valid)
  full, _ = m.apply(v, x, valid)
  cache, kv_valid = L.init_cache(cfg, 2, 12), jnp.zeros((2, 12), bool)
  # Prefill 4 positions at once, then decode one at a time.
  kv_valid = kv_valid.at[:, :4].set(True)
  out0, cache = m.apply(v, x[:, :4], valid[:, :4], positions=jnp.broadcast_to(jnp.arange(4), (2, 4)),
                        cache=cache, cache_index=jnp.int32(0), kv_valid=kv_valid)
  outs = [out0]
  for i in range(4, 9):
    kv_valid = kv_valid.at[:, i].set(True)
    o, cache = m.apply(v, x[:, i:i + 1], valid[:, i:i + 1], positions=jnp.full((2, 1), i), cache=cache,
                       cache_index=jnp.int32(i), kv_valid=kv_valid)
    outs.append(o)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)


def test_causal_future_does_not_change_past():
  cfg = _cfg(causal=True)
  x = jax.random.normal(jax.random.key(0), (1, 8, 32))
  valid = jnp.ones((1, 8), bool)
  m, v = _init(cfg, x, valid)
  y1, _ = m.apply(v, x, valid)
  y2, _ = m.apply(v, x.at[:, 5:].set(7.0), valid)
  np.testing.assert_array_equal(y1[:, :5], y2[:, :5])
  assert not np.allclose(y1[:, 5:], y2[:, 5:])


def test_bidirectional_padding_invariance():
  cfg = _cfg()
  x = jax.random.normal(jax.random.key(0), (1, 6, 32))
  m, v = _init(cfg, x, jnp.ones((1, 6), bool))
  y, _ = m.apply(v, x, jnp.ones((1, 6), bool))
  xp = jnp.concatenate([x, 100 * jnp.ones((1, 3, 32))], 1)
  yp, _ = m.apply(v, xp, jnp.arange(9)[None] < 6)
  np.testing.assert_allclose(yp[:, :6], y, atol=1e-5)


def test_adaln_zero_blocks_start_as_identity():
  cfg = _cfg(adaln=True, num_kv_heads=4)
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  valid = jnp.ones((2, 5), bool)
  cond = jax.random.normal(jax.random.key(2), (2, 32))
  m, v = _init(cfg, x, valid, cond=cond)
  y, _ = m.apply(v, x, valid, cond=cond)
  norm = L.RMSNorm().apply({"params": {"scale": jnp.ones(32)}}, x)
  np.testing.assert_allclose(y, norm, atol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_identical_gradients(remat):
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  valid = jnp.ones((2, 5), bool)
  m0, v = _init(_cfg(causal=True), x, valid)
  m1 = L.Transformer(_cfg(causal=True, remat=remat))
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply(p, x, valid)[0] ** 2))(v)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad(m0), grad(m1))


@pytest.mark.parametrize("unroll", [1, 2, 4])
def test_scan_unroll_keeps_params_outputs_and_gradients(unroll):
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  valid = jnp.arange(5)[None] < jnp.array([[5], [3]])
  m0, v = _init(_cfg(causal=True, num_layers=4, scan_unroll=0), x, valid)
  m1, v1 = _init(_cfg(causal=True, num_layers=4, scan_unroll=unroll), x, valid)
  assert jax.tree.structure(v) == jax.tree.structure(v1)
  scans = [e for e in jax.make_jaxpr(lambda p: m1.apply(p, x, valid))(v).eqns if e.primitive.name == "scan"]
  assert [e.params["unroll"] for e in scans] == [unroll]
  loss = lambda m: lambda p: jnp.sum(jnp.where(valid[..., None], m.apply(p, x, valid)[0], 0.0) ** 2)
  np.testing.assert_allclose(loss(m0)(v), loss(m1)(v), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.grad(loss(m0))(v), jax.grad(loss(m1))(v))


@pytest.mark.parametrize("kv_heads,causal", [(4, False), (2, True), (1, True)])
def test_attend_matches_dot_product_attention(kv_heads, causal):
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (2, 7, 4, 8))
  k, v = jax.random.normal(ks[1], (2, 7, kv_heads, 8)), jax.random.normal(ks[2], (2, 7, kv_heads, 8))
  valid = jnp.arange(7)[None] < jnp.array([[7], [4]])
  mask = L.attention_mask(valid, valid, causal)
  w = jax.random.normal(ks[3], q.shape)   # a loss over the valid queries (padded ones attend to nothing)
  f = lambda fn: lambda q, k, v: jnp.sum(jnp.where(valid[:, :, None, None], fn(q, k, v, mask=mask), 0.0) * w)
  ours, ref = f(L.attend), f(jax.nn.dot_product_attention)
  np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               jax.grad(ours, argnums=(0, 1, 2))(q, k, v), jax.grad(ref, argnums=(0, 1, 2))(q, k, v))


@pytest.mark.parametrize("x_shape,features,axis", [((3, 5, 8), 6, -1), ((3, 5, 2, 4), 6, (-2, -1)),
                                                   ((3, 8), (2, 3), -1)])
def test_cpu_dot_general_matches_lax_gradients(x_shape, features, axis):
  """The CPU kernel-gradient path of `dense` (explicitly transposed x) is the same function and gradient."""
  x = jax.random.normal(jax.random.key(0), x_shape)
  outs = []
  for dot in (L._cpu_dot_general, jax.lax.dot_general):
    m = nn.DenseGeneral(features, axis=axis, use_bias=True, dot_general=dot)
    p = m.init(jax.random.key(1), x)
    f = lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
    outs.append((f(p, x), jax.grad(f, argnums=(0, 1))(p, x)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), outs[0], outs[1])
  # ...and `dense` takes that path on CPU: the transposed x of the kernel gradient sits behind a barrier.
  d = L.dense(features, ("embed", "mlp"), jnp.float32, "d", axis=axis)
  p = nn.unbox(d.init(jax.random.key(1), x))
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(d.apply(p, x))))(p))
  assert ("optimization_barrier" in jaxpr) == (jax.default_backend() == "cpu")


def test_bfloat16_compute_keeps_float32_params():
  cfg = _cfg(dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (1, 4, 32))
  m, v = _init(cfg, x, jnp.ones((1, 4), bool))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))
  y, _ = m.apply(v, x, jnp.ones((1, 4), bool))
  assert y.dtype == jnp.bfloat16


def test_params_are_annotated_with_logical_axes():
  x = jnp.zeros((1, 4, 32))
  boxed = L.Transformer(_cfg()).init(jax.random.key(0), x, jnp.ones((1, 4), bool))
  specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert specs and all(len(s) and s[0] in ("layers", "norm") for s in specs)
  assert ("layers", "embed", "mlp") in [tuple(s) for s in specs]


def test_attention_mask_and_helpers():
  q = jnp.array([[True, True, False]])
  m = L.attention_mask(q, q, causal=True)
  np.testing.assert_array_equal(m[0, 0], [[1, 0, 0], [1, 1, 0], [0, 0, 0]])
  np.testing.assert_array_equal(L.length_mask(jnp.array([0, 2]), 3), [[0, 0, 0], [1, 1, 0]])
  assert float(L.masked_mean(jnp.array([1.0, 3.0, 100.0]), jnp.array([True, True, False]))) == 2.0


def test_depthwise_conv_matches_numpy_convolution_with_zeroed_padding():
  x = jax.random.normal(jax.random.key(0), (2, 7, 3))
  kernel = jax.random.normal(jax.random.key(1), (5, 3))
  valid = jnp.array([[True] * 7, [True] * 4 + [False] * 3])
  y = np.asarray(L.depthwise_conv(x, kernel, valid))
  xv = np.where(np.asarray(valid)[..., None], np.asarray(x), 0.0)
  for b in range(2):
    for ch in range(3):
      # 'same' correlation: y[t] = sum_j k[j] x[t + j - 2]; np.convolve flips the kernel, so flip it back.
      ref = np.convolve(xv[b, :, ch], np.asarray(kernel)[::-1, ch], mode="same")
      np.testing.assert_allclose(y[b, :, ch], ref, rtol=1e-5, atol=1e-6)


def test_conv_block_starts_as_the_block_without_and_learns_locality():
  x = jax.random.normal(jax.random.key(0), (2, 9, 32))
  valid = jnp.arange(9)[None] < jnp.array([[9], [6]])
  plain, v_plain = _init(_cfg(), x, valid)
  conv, v_conv = _init(_cfg(conv_kernel=3), x, valid)
  # Same parameters plus identity taps: the same function.
  taps = v_conv["params"]["layers"]["mlp"]["conv"]
  assert taps.shape == (2, 3, 64)
  np.testing.assert_array_equal(taps[:, 1], 1.0)
  grafted = jax.tree.map(lambda a: a, v_plain)
  grafted["params"]["layers"]["mlp"]["conv"] = taps
  # (Compared on valid positions: padded ones are meaningless in both, and the convolution zeroes them.)
  np.testing.assert_allclose(conv.apply(grafted, x, valid)[0][valid], plain.apply(v_plain, x, valid)[0][valid],
                             atol=1e-6)
  # Off-centre taps mix neighbours, and the mixing still never reads padding.
  grafted["params"]["layers"]["mlp"]["conv"] = taps.at[:, 0].set(0.5)
  y, _ = conv.apply(grafted, x, valid)
  assert not np.allclose(y[valid], plain.apply(v_plain, x, valid)[0][valid], atol=1e-3)
  y_pad, _ = conv.apply(grafted, x.at[1, 6:].set(100.0), valid)
  np.testing.assert_allclose(y_pad[1, :6], y[1, :6], atol=1e-5)


def test_conv_kernel_is_refused_for_causal_stacks():
  x = jnp.zeros((1, 4, 32))
  with pytest.raises(ValueError, match="conv_kernel is for bidirectional"):
    L.Transformer(_cfg(conv_kernel=3, causal=True)).init(jax.random.key(0), x, jnp.ones((1, 4), bool))


def test_dropout_acts_only_given_a_dropout_rng():
  x = jax.random.normal(jax.random.key(0), (2, 12, 32))
  valid = jnp.ones((2, 12), bool)
  plain, params = _init(_cfg(), x, valid)
  params = params["params"]
  dropped = L.Transformer(_cfg(dropout=0.3))
  y = plain.apply({"params": params}, x, valid)[0]
  # Without a 'dropout' rng (evaluation, generation) the stack is exactly the dropout-free function.
  np.testing.assert_array_equal(dropped.apply({"params": params}, x, valid)[0], y)
  train = lambda key: dropped.apply({"params": params}, x, valid, rngs={"dropout": jax.random.key(key)})[0]
  np.testing.assert_array_equal(train(5), train(5))          # a pure function of its rng
  assert float(jnp.max(jnp.abs(train(5) - y))) > 1e-2
  assert float(jnp.max(jnp.abs(train(5) - train(6)))) > 1e-2
