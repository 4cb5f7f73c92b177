"""The shared transformer pieces used by all four networks (one implementation of each).

Parameters carry logical axis names; `e2etts_jax.sharding` maps them to mesh axes. Parameter names:
  embed    model width            mlp      feed-forward width
  heads    query heads            kv_heads key/value heads         kv   per-head dim
  vocab    token tables           layers   the scanned layer axis   norm  norm scales
  conv     convolution taps
Activations are constrained with ('batch', 'length', 'act_embed' | 'act_heads' | 'act_mlp').
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
DType = Any

default_init = nn.initializers.xavier_uniform()


def dtype_of(name: str) -> DType:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of one transformer stack (built from a network's config section)."""
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  causal: bool = False
  adaln: bool = False               # DiT-style AdaLN-Zero conditioning on a vector per sequence
  conv_kernel: int = 0              # taps of the MLP's depthwise convolution over the sequence (0 = none; odd)
  rope_base: float = 10000.0
  dtype: DType = jnp.float32        # compute dtype; params are float32
  remat: str = "none"
  scan_unroll: int = 0              # layers per iteration of the layer loop; 0 = all (straight-line code)
  dropout: float = 0.0              # residual dropout of each sub-layer's output; active only given a 'dropout' rng

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @classmethod
  def from_config(cls, net_cfg, model_cfg, **kw) -> "TransformerConfig":
    return cls(d_model=net_cfg.d_model, num_layers=net_cfg.num_layers, num_heads=net_cfg.num_heads,
               num_kv_heads=net_cfg.num_kv_heads, mlp_dim=net_cfg.mlp_dim, rope_base=model_cfg.rope_base,
               dtype=dtype_of(model_cfg.dtype), remat=model_cfg.remat,
               scan_unroll=model_cfg.scan_unroll, conv_kernel=int(net_cfg.get("conv_kernel", 0)),
               dropout=float(net_cfg.get("dropout", 0.0)), **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_transposed_wgrad(x: Array, kernel: Array, n_in: int) -> Array:
  """x [..., *in] @ kernel [*in, *out] -> [..., *out], whose kernel gradient is a row-major matmul.

  Autodiff's kernel gradient contracts x over its leading (token) dimension. XLA's CPU backend hands such a dot
  to its slower generic kernel and writes the output gradient transposed first; transposing x explicitly (a
  barrier keeps XLA from folding the transpose back into the dot) makes it the [in, tokens] @ [tokens, out]
  matmul YNNPACK runs at full speed: -19% on a SwiGLU MLP forward + backward, about -10% on a training step.
  """
  return jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))


def _matmul_fwd(x, kernel, n_in):
  return _matmul_transposed_wgrad(x, kernel, n_in), (x, kernel)


def _matmul_bwd(n_in, res, dy):
  x, kernel = res
  n_out = kernel.ndim - n_in
  dx = jax.lax.dot_general(dy, kernel, ((tuple(range(dy.ndim - n_out, dy.ndim)), tuple(range(n_in, kernel.ndim))),
                                        ((), ())))
  xt = jax.lax.optimization_barrier(x.reshape(-1, math.prod(kernel.shape[:n_in])).T)    # [in, tokens]
  dk = xt @ dy.reshape(-1, math.prod(kernel.shape[n_in:]))
  return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_matmul_transposed_wgrad.defvjp(_matmul_fwd, _matmul_bwd)


def _cpu_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """DenseGeneral's dot_general: `_matmul_transposed_wgrad` where it applies (trailing input axes against the
  kernel's leading ones, default precision), lax.dot_general otherwise."""
  (lc, rc), batch = dimension_numbers
  n = len(lc)
  if (tuple(lc) == tuple(range(lhs.ndim - n, lhs.ndim)) and tuple(rc) == tuple(range(n)) and batch == ((), ())
      and precision is None and preferred_element_type is None):
    return _matmul_transposed_wgrad(lhs, rhs, n)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


def dense(features, axes: tuple[str, ...], dtype: DType, name: str, use_bias: bool = False,
          kernel_init: Callable = default_init, axis: int | tuple[int, ...] = -1) -> nn.DenseGeneral:
  """A DenseGeneral whose kernel is annotated with logical `axes` (input axes then output axes).

  On CPU its kernel gradient goes through `_matmul_transposed_wgrad`; accelerators keep XLA's own (their
  compilers handle transposed operands natively, and remat policies see the plain dot_general).
  """
  return nn.DenseGeneral(features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                         dot_general=_cpu_dot_general if jax.default_backend() == "cpu" else None,
                         kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:] if
                                                                isinstance(features, int) else axes[-len(features):]),
                         name=name)


def embedding(num: int, features: int, name: str, dtype: DType = jnp.float32) -> nn.Embed:
  return nn.Embed(num, features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))


class RMSNorm(nn.Module):
  """RMS normalisation in float32 (then cast back), with a learned scale unless `use_scale=False`."""
  eps: float = 1e-6
  use_scale: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    if self.use_scale:
      scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],))
      y = y * scale
    return y.astype(x.dtype)


def rotary(x: Array, positions: Array, base: float) -> Array:
  """Rotary position embedding (rotate-half form). x: [batch, length, heads, dim]; positions: [batch, length]."""
  dim = x.shape[-1]
  freqs = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)            # [dim/2]
  angles = positions.astype(jnp.float32)[..., None] * freqs                    # [b, t, dim/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(q_valid: Array, kv_valid: Array, causal: bool,
                   q_pos: Optional[Array] = None, kv_pos: Optional[Array] = None) -> Array:
  """THE masking helper: [batch, 1, q_len, kv_len] bool, True where a query may attend to a key.

  q_valid: [batch, q_len] bool; kv_valid: [batch, kv_len] bool. With `causal`, a query at position p sees keys at
  positions <= p (positions default to 0..len-1, so pass them when queries start mid-sequence, e.g. decoding).
  """
  mask = q_valid[:, None, :, None] & kv_valid[:, None, None, :]
  if causal:
    if q_pos is None:
      q_pos = jnp.broadcast_to(jnp.arange(q_valid.shape[1]), q_valid.shape)
    if kv_pos is None:
      kv_pos = jnp.broadcast_to(jnp.arange(kv_valid.shape[1]), kv_valid.shape)
    mask = mask & (kv_pos[:, None, None, :] <= q_pos[:, None, :, None])
  return mask


def length_mask(lengths: Array, max_len: int) -> Array:
  """[batch] lengths -> [batch, max_len] bool validity mask."""
  return jnp.arange(max_len)[None, :] < lengths[:, None]


def attend(q: Array, k: Array, v: Array, mask: Array, return_probs: bool = False):
  """THE attention core: softmax(q k^T / sqrt(head_dim)) v under a bool mask, with grouped KV heads.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim]; mask: [batch, 1, q_len, kv_len]
  (from `attention_mask`). Query head n uses KV head n // (heads / kv_heads). Returns [batch, q_len, heads,
  head_dim], and with `return_probs` also the attention weights [batch, heads, q_len, kv_len]. The semantics of
  `jax.nn.dot_product_attention` (float32 logits and softmax, masked logits set to the same large negative
  number), but the operands are laid out heads-major before the two batched matmuls:
  on CPU, 13-27% faster forward + backward than its sequence-major einsums alone and 4% off a small stage-1
  training step (not measured on accelerators).
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  q = jnp.transpose(q.reshape(b, t, kh, n // kh, h), (0, 2, 3, 1, 4))        # [b, kv_heads, group, t, h]
  k, v = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))      # [b, kv_heads, s, h]
  # Scaling q (t * h values) instead of the logits (t * s) is the same product up to rounding.
  q = q * jnp.asarray(h ** -0.5, q.dtype)
  logits = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, :, None], logits, -0.7 * jnp.finfo(jnp.float32).max)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksh->bkgth", probs, v)
  out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h)
  if return_probs:
    return out, probs.reshape(b, n, t, probs.shape[-1])    # (kv_heads, group) -> heads, in query-head order
  return out


class Attention(nn.Module):
  """Multi-head attention with grouped KV heads, RoPE and an optional KV cache.

  Cache (for decoding): {'k','v': [batch, cache_len, kv_heads, head_dim]}; new keys/values are written at
  `cache_index` and the query attends over the whole cache under `mask` ([batch, 1, q, cache_len]).
  Applied with mutable=['intermediates'], it sows its weights [batch, heads, q, kv] as 'probs'.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, positions: Array, cache: Optional[dict] = None,
               cache_index: Optional[Array] = None) -> tuple[Array, Optional[dict]]:
    c = self.cfg
    q = dense((c.num_heads, c.head_dim), ("embed", "heads", "kv"), c.dtype, "query")(x)
    k = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), c.dtype, "key")(x)
    v = dense((c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "kv"), c.dtype, "value")(x)
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "kv"))
    q, k = rotary(q, positions, c.rope_base), rotary(k, positions, c.rope_base)
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, axis=1)
      cache = {"k": k, "v": v}
    # The weights are kept only when the caller asks for them (apply with mutable=['intermediates']): an
    # alignment loss reads them (llm.alignment_loss); otherwise nothing is stored.
    keep = self.is_mutable_collection("intermediates")
    out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, return_probs=keep)
    if keep:
      out, probs = out
      self.sow("intermediates", "probs", probs)
    out = dense(x.shape[-1], ("heads", "kv", "embed"), c.dtype, "out", axis=(-2, -1))(out)
    return out, cache


def depthwise_conv(x: Array, kernel: Array, valid: Array) -> Array:
  """Per-channel convolution over the sequence, 'same' length, zero outside the valid positions.

  x: [batch, length, channels]; kernel: [taps, channels] (odd taps, centred: tap k // 2 is the position itself);
  valid: [batch, length] bool. Invalid positions are zeroed first, so padding never leaks into a valid output,
  and a valid output at an utterance's edge sees zeros beyond it, whatever the padding holds. Written as a sum
  of `taps` shifted products, which XLA fuses into elementwise loops.
  """
  taps, t = kernel.shape[0], x.shape[1]
  half = taps // 2
  xp = jnp.pad(jnp.where(valid[..., None], x, 0).astype(x.dtype), ((0, 0), (half, half), (0, 0)))
  kernel = kernel.astype(x.dtype)
  return sum(xp[:, j:j + t] * kernel[j] for j in range(taps))


def identity_taps(taps: int):
  """Initialiser of a [taps, channels] depthwise kernel that passes each channel through unchanged (1 at the
  centre tap), so a block with a convolution starts as the same function as one without."""
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype).at[taps // 2].set(1.0)
  return init


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)).

  With cfg.conv_kernel > 0 the gate is a depthwise convolution over the sequence of its projection (FastSpeech's
  and the Conformer's local mixing, at one multiply-add per tap and channel): each position's gate sees its
  neighbours, the local structure of spectra and phones, without attention having to learn it (what it buys at
  the `mini` budget: docs/diagnosis.md). `valid` [batch, length] bool is needed only then.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, valid: Optional[Array] = None) -> Array:
    c = self.cfg
    gate = dense(c.mlp_dim, ("embed", "mlp"), c.dtype, "gate")(x)
    if c.conv_kernel:
      taps = self.param("conv", nn.with_logical_partitioning(identity_taps(c.conv_kernel), ("conv", "mlp")),
                        (c.conv_kernel, c.mlp_dim))
      gate = depthwise_conv(gate, taps, valid)
    up = dense(c.mlp_dim, ("embed", "mlp"), c.dtype, "up")(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return dense(x.shape[-1], ("mlp", "embed"), c.dtype, "down")(h)


class Block(nn.Module):
  """THE transformer block: pre-norm attention + SwiGLU, optionally AdaLN-Zero modulated by `cond`.

  Written in scan form: (x, layer_cache) -> (x, new_layer_cache); the other inputs are broadcast to all layers.
  x: [batch, length, d_model]; valid: [batch, length] bool; cond: [batch, d_model] (only with cfg.adaln).
  Residual dropout (cfg.dropout) acts only when the caller's apply passes a 'dropout' rng: training passes one,
  evaluation and generation do not, so the same params give the deterministic function everywhere else.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, cache: Optional[dict], mask: Array, valid: Array, positions: Array,
               cond: Optional[Array], cache_index: Optional[Array]):
    c = self.cfg
    if c.adaln:
      # AdaLN-Zero: shift/scale/gate per sub-layer from the condition; zero init makes each block start as
      # the identity, which is what keeps a deep flow-matching DiT stable from scratch.
      mod = dense(6 * c.d_model, ("embed", "mlp"), c.dtype, "adaln",
                  use_bias=True, kernel_init=nn.initializers.zeros)(nn.silu(cond))
      shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod[:, None, :], 6, axis=-1)
      norm = lambda name, h, shift, scale: RMSNorm(use_scale=False, name=name)(h) * (1 + scale) + shift
    else:
      shift1 = scale1 = shift2 = scale2 = None
      gate1 = gate2 = 1.0
      norm = lambda name, h, shift, scale: RMSNorm(name=name)(h)
    drop = lambda h: nn.Dropout(c.dropout, deterministic=not self.has_rng("dropout"))(h)
    h, cache = Attention(c, name="attn")(norm("attn_norm", x, shift1, scale1), mask, positions, cache,
                                         cache_index)
    x = x + gate1 * drop(h)
    x = x + gate2 * drop(MLP(c, name="mlp")(norm("mlp_norm", x, shift2, scale2), valid))
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    return x, cache


_REMAT = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
  """A stack of `Block`s scanned over layers (params stacked on a 'layers' axis), then a final RMSNorm.

  `cfg.scan_unroll` layers run per loop iteration (0: all, i.e. no loop; the parameter tree is the same either
  way). Unrolled, XLA schedules each layer's activations and weight-gradient matmuls without the loop's
  stacked save/reload: ~20% faster training steps on CPU (small config), at the cost of compile time that grows
  with depth, which is why deep configs keep a loop.

  x: [batch, length, d_model]; valid: [batch, length] bool (padding mask, also used as key mask unless a cache
  is given); positions: [batch, length] int (defaults to 0..length-1).
  With a cache ({'k','v': [layers, batch, cache_len, kv_heads, head_dim]}), `cache_index` is where x's first
  position is written and `kv_valid` ([batch, cache_len]) says which cache slots hold real keys.
  Returns (y [batch, length, d_model], new cache or None).
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, valid: Array, positions: Optional[Array] = None, cond: Optional[Array] = None,
               cache: Optional[dict] = None, cache_index: Optional[Array] = None,
               kv_valid: Optional[Array] = None) -> tuple[Array, Optional[dict]]:
    c = self.cfg
    b, t = valid.shape
    if c.conv_kernel and (c.causal or cache is not None):
      # A convolution would need its own decoding state beside the KV cache; only bidirectional stacks have one.
      raise ValueError("conv_kernel is for bidirectional transformers (tokenizer, FM, RM), not causal/cached ones")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    if cache is None:
      mask = attention_mask(valid, valid, c.causal, positions, positions)
    else:
      cache_len = cache["k"].shape[2]
      kv_pos = jnp.broadcast_to(jnp.arange(cache_len), (b, cache_len))
      mask = attention_mask(valid, kv_valid, c.causal, positions, kv_pos)
    block = Block
    if c.remat != "none":
      block = nn.remat(Block, policy=_REMAT[c.remat], prevent_cse=False)
    stack = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                    length=c.num_layers, unroll=c.scan_unroll or c.num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x = nn.with_logical_constraint(x.astype(c.dtype), ("batch", "length", "act_embed"))
    x, cache = stack(c, name="layers")(x, cache, mask, valid, positions, cond, cache_index)
    return RMSNorm(name="final_norm")(x), cache


def init_cache(cfg: TransformerConfig, batch: int, length: int, dtype: DType = jnp.float32) -> dict:
  """Zeroed KV cache {'k','v': [layers, batch, length, kv_heads, head_dim]}."""
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def sinusoidal_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """[batch] float times (e.g. flow time in [0, 1], scaled by the caller) -> [batch, dim] features."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
  """Mean of x over entries where mask is True (mask broadcast to x); 0 when nothing is valid."""
  mask = jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
  return jnp.sum(x.astype(jnp.float32) * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)
