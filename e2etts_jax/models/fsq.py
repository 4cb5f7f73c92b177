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

Array = jax.Array


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


def code_usage(indices: Array, mask: Array, codebook_size: int) -> dict[str, Array]:
  """Codebook statistics over the valid tokens.

  indices [...] int, mask [...] bool. Returns scalars: perplexity = exp(entropy) (k for uniform use of k codes),
  used_fraction (codes seen at least once / codebook_size), entropy_bits (entropy of the empirical code
  distribution in bits; log2(codebook_size) at most).
  """
  w = jnp.asarray(mask, jnp.float32).reshape(-1)
  counts = jnp.zeros((codebook_size,), jnp.float32).at[jnp.asarray(indices, jnp.int32).reshape(-1)].add(w)
  p = counts / jnp.maximum(jnp.sum(w), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return dict(perplexity=jnp.exp(entropy), used_fraction=jnp.mean((counts > 0).astype(jnp.float32)),
              entropy_bits=entropy / jnp.log(2.0))
