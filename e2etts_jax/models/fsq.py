"""Finite scalar quantisation (FSQ): the single-codebook quantiser of the speech tokenizer.

Each of the `dim` channels is squashed with tanh into a bounded interval and rounded to one of `levels[j]`
values. Rounding uses a straight-through estimator, so gradients pass to the encoder as if rounding were the
identity (on the bounded value). Codes are the rounded values divided by `levels[j] // 2`, so they lie in
[-1, 1]:

  odd L  (as CosyVoice: 3 levels -> tanh(z) * 0.999, round -> {-1, 0, 1}): {-(L//2), ..., L//2} / (L//2)
  even L (the FSQ paper's half-offset, Mentzer et al. 2023): the bounded value is shifted by 1/2 so that it
         rounds to {-L/2, ..., L/2 - 1}; codes are these / (L/2), i.e. in [-1, 1 - 2/L].

A code's index is sum_j digit_j * prod(levels[:j]) with digit_j = rounded_j + L_j // 2 in [0, L_j) (CosyVoice's
layout: the first channel is the least significant digit).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from e2etts_jax.models import layers

Array = jax.Array


def _plogp(p: Array) -> Array:
  """p log p elementwise, 0 where p == 0 (and a finite gradient there)."""
  return jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)


class FSQ:
  """An FSQ quantiser over `len(levels)` channels (plain object: it has no parameters)."""

  def __init__(self, levels: Sequence[int], eps: float = 1e-3):
    self.levels = tuple(int(l) for l in levels)
    if not self.levels or min(self.levels) < 2:
      raise ValueError(f"FSQ levels must be >= 2 per channel, got {self.levels}")
    self.dim = len(self.levels)
    self.codebook_size = int(math.prod(self.levels))
    lv = np.asarray(self.levels, np.float64)
    # (1 - eps) keeps tanh's image strictly inside the outermost rounding bins' far edges, so every level is
    # reachable but none beyond; for 3 levels this is CosyVoice's `tanh(h) * 0.999`.
    half_l = (lv - 1) * (1 - eps) / 2
    offset = np.where(lv % 2 == 0, 0.5, 0.0)
    self._half_l = half_l.astype(np.float32)
    self._offset = offset.astype(np.float32)
    self._shift = np.arctanh(offset / half_l).astype(np.float32)  # centres tanh(0) on a rounding bin
    self._half_width = (lv // 2).astype(np.float32)
    self._levels = lv.astype(np.int32)
    self._basis = np.cumprod([1] + list(self.levels[:-1])).astype(np.int32)

  def bound(self, z: Array) -> Array:
    """[..., dim] -> the bounded value in code units (before rounding), [..., dim] float32."""
    z = z.astype(jnp.float32)
    return (jnp.tanh(z + self._shift) * self._half_l - self._offset) / self._half_width

  def quantize(self, z: Array) -> tuple[Array, Array]:
    """z [..., dim] -> (codes [..., dim] float32 straight-through, indices [...] int32)."""
    b = self.bound(z)
    rounded = jnp.round(b * self._half_width) / self._half_width
    # rounded + (b - sg(b)) is exactly `rounded` in the forward pass (b - b == 0 exactly), so these codes
    # equal indices_to_codes(indices) bit for bit, while d codes / d b is the identity.
    codes = rounded + (b - jax.lax.stop_gradient(b))
    return codes, self.codes_to_indices(rounded)

  def codes_to_indices(self, codes: Array) -> Array:
    """[..., dim] codes (hard values) -> [...] int32 indices."""
    digits = jnp.round(codes.astype(jnp.float32) * self._half_width) + self._half_width
    digits = jnp.clip(digits.astype(jnp.int32), 0, self._levels - 1)
    return jnp.sum(digits * self._basis, axis=-1).astype(jnp.int32)

  def indices_to_codes(self, indices: Array) -> Array:
    """[...] int indices -> [..., dim] float32 codes."""
    digits = (jnp.asarray(indices, jnp.int32)[..., None] // self._basis) % self._levels
    return (digits.astype(jnp.float32) - self._half_width) / self._half_width

  def codebook(self) -> Array:
    """[codebook_size, dim]: row i is indices_to_codes(i)."""
    return self.indices_to_codes(jnp.arange(self.codebook_size, dtype=jnp.int32))

  def gradient_gain(self, bounded: Array) -> Array:
    """[..., dim] bounded values -> [..., dim] d bound / d z relative to its maximum (1 - tanh^2): near 0 the
    channel is saturated and no loss can move it any more (a collapse mechanism worth watching)."""
    t = (bounded.astype(jnp.float32) * self._half_width + self._offset) / self._half_l
    return 1.0 - jnp.square(t)

  def level_probs(self, bounded: Array, temperature: float = 1.0) -> Array:
    """Soft assignment of each channel's bounded value to its levels.

    bounded [..., dim] (from `bound`) -> [..., dim, max(levels)] float32 probabilities, softmax of the negative
    squared distance in level units (adjacent levels are 1 apart) over temperature; slots past a channel's own
    level count are 0. Rounding picks the argmax, so this is the differentiable stand-in for the code choice.
    """
    max_l = max(self.levels)
    steps = np.arange(max_l, dtype=np.float32)[None, :] - self._half_width[:, None]      # [dim, max_l]
    valid = np.arange(max_l)[None, :] < self._levels[:, None]
    dist = bounded.astype(jnp.float32)[..., None] * self._half_width[:, None] - steps
    logits = jnp.where(valid, -jnp.square(dist) / temperature, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)

  def usage_loss(self, z: Array, mask: Array, temperature: float = 1.0, linear_range: float = 1.5,
                 dependence_weight: float = 0.0) -> tuple[Array, dict[str, Array]]:
    """The code-usage (anti-collapse) term of the tokenizer, from its pre-quantisation latents z [..., dim]:

      entropy:  mean per-token level entropy minus the entropy of the batch's mean level distribution, per
                channel, each divided by log(levels[j]), averaged over channels (in [-1, 1]); lowering it makes
                each token's choice confident while the batch spreads over every level of every channel (the
                entropy penalty of lookup-free quantisers, per FSQ channel: the joint codebook is too big to soften);
      range:    mean squared excess of |z| (centred as `bound` centres it) over `linear_range`: a tanh pushed
                past ~2 passes almost no gradient (see `gradient_gain`), so a saturated channel can never be
                moved again by any loss; this pull back needs no gradient through the tanh;
      dependence (times `dependence_weight * (dim - 1) / 2`): see `dependence`. The entropy part sees each
                channel alone, so channels that copy each other cost it nothing, and a codebook of many small
                channels (3^8) can use every level of every channel yet only a few dozen joint codes. The factor
                turns the mean over dim * (dim - 1) / 2 pairs into their sum per channel, the entropy part's
                scale (a copied pair costs weight / dim, as one channel's share of the entropy part does), so that
                one weight means the same pull on any channel count.

    mask [...] bool. Returns (entropy + range + dependence_weight * (dim - 1) / 2 * dependence,
    {'sample_entropy', 'batch_entropy', 'dependence' in [0, 1], 'range'}).
    """
    z = z.astype(jnp.float32)
    mask = jnp.asarray(mask, bool)
    p = self.level_probs(self.bound(z), temperature)                                     # [..., dim, max_l]
    norm = np.log(self._levels.astype(np.float32))
    tokens = tuple(range(z.ndim - 1))
    sample_h = layers.masked_mean(-jnp.sum(_plogp(p), -1), mask[..., None], axis=tokens) / norm    # [dim]
    mean_p = layers.masked_mean(p, mask[..., None, None], axis=tokens)                         # [dim, max_l]
    batch_h = -jnp.sum(_plogp(mean_p), axis=-1) / norm
    excess = jnp.square(jax.nn.relu(jnp.abs(z + self._shift) - linear_range))
    range_loss = layers.masked_mean(jnp.mean(excess, -1), mask)
    dependence = self.dependence(p, mask)
    loss = jnp.mean(sample_h - batch_h) + range_loss + dependence_weight * (self.dim - 1) / 2 * dependence
    return loss, dict(sample_entropy=jnp.mean(sample_h), batch_entropy=jnp.mean(batch_h), dependence=dependence,
                      range=range_loss)

  def dependence(self, p: Array, mask: Array) -> Array:
    """Mean normalised mutual information between the soft level choices of every pair of channels.

    p [..., dim, max(levels)] (from `level_probs`), mask [...] bool -> scalar in [0, 1]: for channels i < j,
    I(i; j) / min(log L_i, log L_j) of the batch's joint level distribution (each token's outer product
    p_i p_j^T, averaged over valid tokens), averaged over pairs. 0 when the channels' choices are independent
    over the batch; for a channel that copies another (or mirrors it: any one-to-one level map) the pair's
    value is that channel's level entropy over log L, so 1 when it uses its levels evenly and confidently. Soft
    assignments lower it: a collapsed 3^8 tokenizer (docs/diagnosis.md) scores 0.11 at temperature 1 and 0.32
    at 0.01. Pairwise, because the joint over all channels has prod(levels) cells; pairs catch the
    redundancy seen in practice. 0 with one channel.
    """
    if self.dim < 2:
      return jnp.zeros((), jnp.float32)
    w = jnp.asarray(mask, jnp.float32)
    w = (w / jnp.maximum(jnp.sum(w), 1.0)).reshape(-1)
    p = p.astype(jnp.float32).reshape(-1, self.dim, p.shape[-1])                         # [N, dim, max_l]
    joint = jnp.einsum("n,nil,njm->ijlm", w, p, p)                                       # [dim, dim, l, m]
    marginal = jnp.einsum("n,nil->il", w, p)                                             # [dim, max_l]
    h = -jnp.sum(_plogp(marginal), -1)                                                    # [dim]
    mutual = h[:, None] + h[None, :] + jnp.sum(_plogp(joint), (-2, -1))                   # [dim, dim]
    log_l = np.log(self._levels.astype(np.float32))
    pairs = np.triu_indices(self.dim, k=1)
    return jnp.mean(mutual[pairs] / np.minimum(log_l[:, None], log_l[None, :])[pairs])


def code_usage(indices: Array, mask: Array, codebook_size: int) -> dict[str, Array]:
  """Codebook statistics over the valid tokens.

  indices [...] int, mask [...] bool. Returns scalars: perplexity = exp(entropy) (k for uniform use of k codes),
  used_fraction (codes seen at least once / codebook_size), entropy_bits (entropy of the empirical code
  distribution in bits; log2(codebook_size) at most).
  """
  w = jnp.asarray(mask, jnp.float32).reshape(-1)
  counts = jnp.zeros((codebook_size,), jnp.float32).at[jnp.asarray(indices, jnp.int32).reshape(-1)].add(w)
  p = counts / jnp.maximum(jnp.sum(w), 1.0)
  entropy = -jnp.sum(_plogp(p))
  return dict(perplexity=jnp.exp(entropy), used_fraction=jnp.mean((counts > 0).astype(jnp.float32)),
              entropy_bits=entropy / jnp.log(2.0))
