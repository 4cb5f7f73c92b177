"""Speech tokenizer: shapes and masks, padding invariance, gradients through the FSQ codes, and overfitting."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from e2etts_jax import config_lib
from e2etts_jax.models import layers
from e2etts_jax.models.fsq import FSQ
from e2etts_jax.models.tokenizer import SpeechTokenizer, token_mask


def _mel(rng, b, f, n_mels):
  return jnp.asarray(rng.normal(-5.0, 2.5, (b, f, n_mels)), jnp.float32)


@pytest.fixture(scope="module")
def init():
  """One initialisation shared by the tests (parameter shapes depend on neither batch nor length)."""
  c = config_lib.get_config("tiny")
  model = SpeechTokenizer(c)
  mel = jnp.zeros((1, 2 * c.tokenizer.downsample, c.audio.n_mels))
  params = jax.jit(model.init)(jax.random.key(0), mel, jnp.ones(mel.shape[:2], bool))
  return model, params


def test_shapes_and_masks(tiny_config, np_rng, init):
  c = tiny_config
  ds, n_mels = c.tokenizer.downsample, c.audio.n_mels
  mel = _mel(np_rng, 3, 20, n_mels)
  mel_mask = layers.length_mask(jnp.array([20, 13, 1]), 20)
  model, params = init
  out = jax.jit(model.apply)(params, mel, mel_mask)
  d = len(c.tokenizer.fsq_levels)
  assert out["codes"].shape == (3, 10, d) and out["codes"].dtype == jnp.float32
  assert out["indices"].shape == (3, 10) and out["indices"].dtype == jnp.int32
  # A token is valid if any of its frames is: ceil(n / ds) tokens.
  np.testing.assert_array_equal(np.asarray(out["mask"]).sum(1), [10, 7, 1])
  np.testing.assert_array_equal(np.asarray(token_mask(mel_mask, ds)), np.asarray(out["mask"]))
  fsq = FSQ(c.tokenizer.fsq_levels)
  assert int(out["indices"].min()) >= 0 and int(out["indices"].max()) < fsq.codebook_size
  np.testing.assert_array_equal(np.asarray(fsq.indices_to_codes(out["indices"])), np.asarray(out["codes"]))


def test_padding_invariance(tiny_config, np_rng, init):
  """Appending padding frames (with garbage values) changes nothing at valid tokens."""
  c = tiny_config
  model, params = init
  mel = _mel(np_rng, 2, 24, c.audio.n_mels)
  mask = layers.length_mask(jnp.array([24, 17]), 24)
  junk = _mel(np_rng, 2, 16, c.audio.n_mels) * 10
  mel_long = jnp.concatenate([jnp.where(mask[..., None], mel, 99.0), junk], axis=1)
  mask_long = jnp.concatenate([mask, jnp.zeros((2, 16), bool)], axis=1)

  @jax.jit
  def run(m, mm):
    out, state = model.apply(params, m, mm, capture_intermediates=lambda mdl, _: mdl.name == "encoder")
    return out, state["intermediates"]["encoder"]["__call__"][0][0]   # encoder output [B, T, d]

  short, h_short = run(mel, mask)
  long, h_long = run(mel_long, mask_long)
  valid = np.asarray(short["mask"])
  np.testing.assert_array_equal(np.asarray(long["mask"])[:, :12], valid)
  assert not np.asarray(long["mask"])[:, 12:].any()
  np.testing.assert_allclose(np.asarray(h_long)[:, :12][valid], np.asarray(h_short)[valid], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(long["indices"])[:, :12][valid], np.asarray(short["indices"])[valid])
  np.testing.assert_array_equal(np.asarray(long["codes"])[:, :12][valid], np.asarray(short["codes"])[valid])


def test_gradient_reaches_encoder_through_codes(tiny_config, np_rng, init):
  c = tiny_config
  model, params = init
  params = params["params"]
  mel = _mel(np_rng, 2, 16, c.audio.n_mels)
  mask = layers.length_mask(jnp.array([16, 10]), 16)
  w = jax.random.normal(jax.random.key(3), (2, 8, len(c.tokenizer.fsq_levels)))

  def loss(p):
    out = model.apply({"params": p}, mel, mask)
    return jnp.sum(out["codes"] * w * out["mask"][..., None])

  grads = jax.tree.map(lambda g: float(jnp.abs(g).sum()), nn.unbox(jax.jit(jax.grad(loss))(params)))
  for name in ("conv_in", "conv_out", "to_fsq"):
    assert grads[name]["kernel"] > 0, name
  enc = jax.tree.leaves(grads["encoder"])
  assert all(np.isfinite(enc)) and min(enc) > 0


def test_overfits_one_batch_with_linear_decoder(tiny_config, np_rng, init):
  """Tokenizer + a linear decoder (codes -> the token's mel frames) reconstructs a tiny batch.

  The batch is a reconstruction proxy: 4 spectral "phones" (random mel templates plus a little noise) in
  segments aligned to tokens. Targets are standardised per channel and the decoder starts at zero, so the
  initial MSE is ~1 and a collapsed tokenizer cannot go below ~1; a >= 90% drop means the tokens tell the phones
  apart through the straight-through FSQ codes.
  """
  c = tiny_config
  ds, n_mels = c.tokenizer.downsample, c.audio.n_mels
  b, t = 2, 24
  templates = np_rng.normal(-5.0, 2.5, (4, n_mels))
  phones = np.stack([np.repeat(np_rng.integers(0, 4, t // 3), 3) for _ in range(b)])       # [B, T]
  mel = templates[np.repeat(phones, ds, axis=1)] + 0.05 * np_rng.standard_normal((b, t * ds, n_mels))
  mel = jnp.asarray(mel, jnp.float32)
  mel_mask = layers.length_mask(jnp.array([t * ds, t * ds - 6]), t * ds)
  valid = np.asarray(mel_mask)[..., None]
  mu = (np.asarray(mel) * valid).sum((0, 1)) / valid.sum()
  sd = np.sqrt((((np.asarray(mel) - mu) ** 2) * valid).sum((0, 1)) / valid.sum())
  target = ((mel - mu) / sd).reshape(b, t, ds * n_mels)

  model, tok_params = init
  head = nn.Dense(ds * n_mels, kernel_init=nn.initializers.zeros)
  params = {"tok": nn.unbox(tok_params["params"]),
            "head": head.init(jax.random.key(1), jnp.zeros((1, len(c.tokenizer.fsq_levels))))["params"]}

  def loss_fn(p):
    out = model.apply({"params": p["tok"]}, mel, mel_mask)
    recon = head.apply({"params": p["head"]}, out["codes"])
    frame_mask = mel_mask.reshape(b, t, ds)[..., None]
    err = (recon.reshape(b, t, ds, n_mels) - target.reshape(b, t, ds, n_mels)) ** 2
    return layers.masked_mean(err, frame_mask)

  opt = optax.adam(1e-2)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state = opt.init(params)
  first = None
  for _ in range(250):
    params, state, loss = step(params, state)
    first = float(loss) if first is None else first
  final = float(jax.jit(loss_fn)(params))
  print(f"tokenizer reconstruction MSE {first:.4f} -> {final:.4f}")
  assert first > 0.9
  assert final <= 0.1 * first
