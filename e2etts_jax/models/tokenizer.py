"""The speech tokenizer: log-mel -> 25 Hz single-codebook FSQ tokens (ids and straight-through code vectors).

  mel [B, F, n_mels] --normalise, zero padding frames--> strided conv (kernel 3*ds, stride ds, to mlp_dim)
      -> GELU -> dense to [B, F/ds, d_model] -> bidirectional Transformer (padding-masked)
      -> dense to D = len(fsq_levels)
      -> FSQ -> codes [B, F/ds, D], indices [B, F/ds]

The conv is written as a dense layer over each token's window of frames (its own ds frames plus the ds frames
either side), so its kernel carries logical axis names like every other parameter. Padding frames are zeroed
after normalisation, so a valid token's output does not depend on how much padding follows the utterance.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from e2etts_jax.models import layers
from e2etts_jax.models.fsq import FSQ

Array = jax.Array

# Log-mels with a 1e-5 floor lie in about [-11.5, 3]; this affine map sends that range to about [-2, 2] so
# the first layer starts in a well-scaled regime without data statistics.
MEL_CENTER = -4.25
MEL_SCALE = 3.6


def token_mask(mel_mask: Array, downsample: int) -> Array:
  """[B, F] bool frame mask -> [B, F // downsample] bool token mask.

  A token is valid if ANY of its frames is, i.e. an utterance of n frames has ceil(n / downsample) tokens: the
  last, partly padded token still carries the utterance's final frames (their padded neighbours are zeros).
  """
  b, f = mel_mask.shape
  return jnp.any(mel_mask.reshape(b, f // downsample, downsample), axis=-1)


class SpeechTokenizer(nn.Module):
  """Mel -> FSQ tokens. `config` is the full config (uses `tokenizer`, `model`, `audio`)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, mel: Array, mel_mask: Array) -> dict[str, Array]:
    """mel [B, F, n_mels] float, mel_mask [B, F] bool (F divisible by tokenizer.downsample).

    Returns dict(codes=[B, T, D] float32 straight-through codes, indices=[B, T] int32, mask=[B, T] bool,
    latent=[B, T, D] float32 FSQ inputs for the code-usage term) with T = F // downsample. Outputs at invalid
    tokens are computed but meaningless; use `mask`.
    """
    cfg = self.config.tokenizer
    ds = int(cfg.downsample)
    tcfg = layers.TransformerConfig.from_config(cfg, self.config.model, causal=False)
    b, f, n_mels = mel.shape
    if f % ds:
      raise ValueError(f"mel length {f} is not divisible by tokenizer.downsample={ds}")
    t = f // ds
    fsq = FSQ(cfg.fsq_levels)

    x = (mel.astype(jnp.float32) - MEL_CENTER) / MEL_SCALE
    x = jnp.where(mel_mask[..., None], x, 0.0)
    x = x.reshape(b, t, ds, n_mels)
    # Window of three tokens' frames (previous, own, next): a conv of kernel 3*ds and stride ds, zero-padded.
    zeros = jnp.zeros_like(x[:, :1])
    prev = jnp.concatenate([zeros, x[:, :-1]], axis=1)
    nxt = jnp.concatenate([x[:, 1:], zeros], axis=1)
    window = jnp.stack([prev, x, nxt], axis=2).astype(tcfg.dtype)          # [B, T, 3, ds, n_mels]
    h = layers.dense(tcfg.mlp_dim, (None, None, None, "mlp"), tcfg.dtype, "conv_in", use_bias=True,
                     axis=(-3, -2, -1))(window)                                # [B, T, mlp_dim]
    h = layers.dense(tcfg.d_model, ("mlp", "embed"), tcfg.dtype, "conv_out", use_bias=True)(nn.gelu(h))

    mask = token_mask(mel_mask, ds)
    h, _ = layers.Transformer(tcfg, name="encoder")(h, mask)
    z = layers.dense(fsq.dim, ("embed", None), tcfg.dtype, "to_fsq", use_bias=True)(h)
    codes, indices = fsq.quantize(z.astype(jnp.float32))
    return dict(codes=codes, indices=indices, mask=mask, latent=z.astype(jnp.float32))
