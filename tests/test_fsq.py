"""FSQ: code/index bijection, straight-through gradients, hand-computed codes, and codebook usage statistics."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2etts_jax.models.fsq import FSQ, code_usage


@pytest.mark.parametrize("levels", [(3, 3, 3), (8, 5, 5, 5), (4, 3), (3,) * 8])
def test_index_code_round_trip_over_all_codes(levels):
  fsq = FSQ(levels)
  assert fsq.dim == len(levels) and fsq.codebook_size == math.prod(levels)
  book = np.asarray(fsq.codebook())
  assert book.shape == (fsq.codebook_size, fsq.dim)
  assert len({tuple(r) for r in book.tolist()}) == fsq.codebook_size  # all rows unique
  assert book.min() >= -1.0 and book.max() <= 1.0
  idx = np.asarray(fsq.codes_to_indices(book))
  np.testing.assert_array_equal(idx, np.arange(fsq.codebook_size))
  # Quantising a hard code (pushed back through tanh) returns the same code and index.
  codes, indices = fsq.quantize(_preimage(fsq, book))
  np.testing.assert_array_equal(np.asarray(indices), np.arange(fsq.codebook_size))
  np.testing.assert_array_equal(np.asarray(codes), book)


def _preimage(fsq, codes):
  """A z that quantises to `codes`: invert the bound at the code value."""
  hw = np.asarray([l // 2 for l in fsq.levels], np.float32)
  half_l = (np.asarray(fsq.levels) - 1) * (1 - 1e-3) / 2
  offset = np.asarray([0.5 if l % 2 == 0 else 0.0 for l in fsq.levels])
  y = (np.asarray(codes) * hw + offset) / half_l
  return jnp.asarray(np.arctanh(np.clip(y, -0.9999, 0.9999)) - np.arctanh(offset / half_l), jnp.float32)


def test_quantize_hand_computed_three_levels():
  fsq = FSQ((3, 3, 3))
  # tanh(z) * 0.999 rounded: tanh(0.2) = 0.197 -> 0; tanh(-1.5) = -0.905 -> -1; tanh(3) = 0.995 -> 1.
  codes, index = fsq.quantize(jnp.array([0.2, -1.5, 3.0]))
  np.testing.assert_array_equal(np.asarray(codes), [0.0, -1.0, 1.0])
  # digits (code + 1) = (1, 0, 2): 1 + 0 * 3 + 2 * 9 = 19 (CosyVoice's layout).
  assert int(index) == 19
  # tanh(0.6) = 0.537 rounds up; tanh(0.5) * 0.999 = 0.4617 rounds down.
  codes, index = fsq.quantize(jnp.array([0.6, 0.5, -0.6]))
  np.testing.assert_array_equal(np.asarray(codes), [1.0, 0.0, -1.0])
  assert int(index) == 2 + 1 * 3 + 0 * 9


def test_quantize_hand_computed_even_levels():
  fsq = FSQ((4, 8))
  # L = 4: half_l = 1.5 * 0.999 = 1.4985, offset 0.5, shift = atanh(0.5 / 1.4985) = 0.3469.
  #   z = 0    -> tanh(0.3469) * 1.4985 - 0.5 = 0      -> 0  -> code 0.0,  digit 2
  #   z = 0.5  -> tanh(0.8469) * 1.4985 - 0.5 = 0.533  -> 1  -> code 0.5,  digit 3
  #   z = -10  -> -1.4985 - 0.5 = -1.9985              -> -2 -> code -1.0, digit 0
  # L = 8: half_l = 3.4965, shift = atanh(0.5 / 3.4965) = 0.1440.
  #   z = 0    -> 0 -> code 0.0, digit 4;  z = 10 -> 3.4965 - 0.5 = 2.9965 -> 3 -> code 0.75, digit 7
  #   z = -0.3 -> tanh(-0.156) * 3.4965 - 0.5 = -1.041 -> -1 -> code -0.25, digit 3
  z = jnp.array([[0.0, 0.0], [0.5, 10.0], [-10.0, -0.3]])
  codes, indices = fsq.quantize(z)
  np.testing.assert_array_equal(np.asarray(codes), [[0.0, 0.0], [0.5, 0.75], [-1.0, -0.25]])
  np.testing.assert_array_equal(np.asarray(indices), [2 + 4 * 4, 3 + 7 * 4, 0 + 3 * 4])
  # Every one of the L levels is reachable, and no more.
  sweep = jnp.linspace(-8, 8, 4001)[:, None].repeat(2, axis=1)
  c, _ = fsq.quantize(sweep)
  assert sorted(set(np.asarray(c[:, 0]).tolist())) == [-1.0, -0.5, 0.0, 0.5]
  assert len(set(np.asarray(c[:, 1]).tolist())) == 8


@pytest.mark.parametrize("levels", [(3, 3, 3), (8, 5, 4)])
def test_straight_through_gradient(levels):
  fsq = FSQ(levels)
  key1, key2 = jax.random.split(jax.random.key(0))
  z = 1.5 * jax.random.normal(key1, (7, fsq.dim))
  w = jax.random.normal(key2, (7, fsq.dim))
  # Through the bounded value: d codes / d bound = identity.
  g_bound = jax.grad(lambda z: jnp.sum(fsq.quantize(z)[0] * w))(z)
  g_ref = jax.grad(lambda z: jnp.sum(fsq.bound(z) * w))(z)
  np.testing.assert_allclose(np.asarray(g_bound), np.asarray(g_ref), rtol=1e-6, atol=1e-7)
  # Against the analytic derivative of tanh(z + shift) * half_l / half_width.
  lv = np.asarray(levels, np.float64)
  half_l = (lv - 1) * 0.999 / 2
  offset = np.where(lv % 2 == 0, 0.5, 0.0)
  shift = np.arctanh(offset / half_l)
  analytic = np.asarray(w) * half_l / (lv // 2) * (1 - np.tanh(np.asarray(z, np.float64) + shift) ** 2)
  np.testing.assert_allclose(np.asarray(g_bound), analytic, rtol=1e-4, atol=1e-6)
  # The forward value is exactly the hard code (bit-equal to indices_to_codes).
  codes, indices = fsq.quantize(z)
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(fsq.indices_to_codes(indices)))


def test_code_usage_known_distributions():
  # Uniform over k = 5 of 27 codes, plus masked-out entries that must not count.
  idx = jnp.array([0, 3, 7, 11, 26] * 4 + [5, 5, 5])
  mask = jnp.array([True] * 20 + [False] * 3)
  u = code_usage(idx, mask, 27)
  np.testing.assert_allclose(float(u["perplexity"]), 5.0, rtol=1e-5)
  np.testing.assert_allclose(float(u["used_fraction"]), 5 / 27, rtol=1e-6)
  np.testing.assert_allclose(float(u["entropy_bits"]), math.log2(5), rtol=1e-5)
  # A single code: perplexity 1, zero entropy; p = (1/2, 1/4, 1/4): 1.5 bits.
  one = code_usage(jnp.full((2, 3), 4), jnp.ones((2, 3), bool), 27)
  np.testing.assert_allclose([float(one["perplexity"]), float(one["entropy_bits"])], [1.0, 0.0], atol=1e-6)
  skew = code_usage(jnp.array([[1, 1, 2, 3]]), jnp.ones((1, 4), bool), 8)
  np.testing.assert_allclose(float(skew["entropy_bits"]), 1.5, rtol=1e-6)
  np.testing.assert_allclose(float(skew["perplexity"]), 2 ** 1.5, rtol=1e-5)


def test_usage_loss_spread_vs_collapsed():
  """Entropy part: -1 when every token is certain and the batch covers every level evenly, ~0 when all tokens
  sit on one level; the range part is 0 inside the linear range."""
  fsq = FSQ((3, 3))
  mask = jnp.ones((300,), bool)
  # Latents at the three level centres of each channel (pre-images of -1, 0, 1), 100 tokens each, scaled up so the
  # soft assignment is near one-hot: temperature 1e-3 makes it exactly so.
  centres = jnp.repeat(jnp.array([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]), 100, axis=0)
  z = jnp.arctanh(centres * 0.99)   # bound = 0.99 * 0.999 * centre: rounds to the centre
  spread, m = fsq.usage_loss(z, mask, temperature=1e-3, linear_range=10.0)
  np.testing.assert_allclose(float(spread), -1.0, atol=1e-5)
  np.testing.assert_allclose(float(m["batch_entropy"]), 1.0, atol=1e-5)
  # The two channels copy each other: the entropy part cannot see it, the dependence (1 here) can.
  np.testing.assert_allclose(float(m["dependence"]), 1.0, atol=1e-5)
  copied, _ = fsq.usage_loss(z, mask, temperature=1e-3, linear_range=10.0, dependence_weight=0.5)
  np.testing.assert_allclose(float(copied), -1.0 + 0.5 / 2, atol=1e-5)   # one copied pair of 2 channels: weight / 2
  collapsed, m = fsq.usage_loss(jnp.zeros((300, 2)), mask, temperature=1e-3, linear_range=10.0)
  np.testing.assert_allclose(float(collapsed), 0.0, atol=1e-5)
  assert float(m["batch_entropy"]) < 1e-5 and float(m["range"]) == 0.0
  # Masked tokens do not count: 200 of the spread tokens masked out leaves one level per channel.
  part, _ = fsq.usage_loss(z, jnp.arange(300) < 100, temperature=1e-3, linear_range=10.0)
  np.testing.assert_allclose(float(part), 0.0, atol=1e-5)


def _grid_latents(fsq, digits):
  """Latents whose hard codes have the given level digits [N, dim] (soft assignment one-hot at temperature 1e-3)."""
  hw = np.asarray([l // 2 for l in fsq.levels], np.float32)
  return jnp.arctanh(jnp.asarray((digits - hw) / hw * 0.99, jnp.float32))


def test_dependence_of_independent_copied_and_mirrored_channels():
  """Normalised pairwise mutual information: 0 when every level combination is equally common, 1 for a pair of
  uniform channels where one copies or mirrors the other, the mean over pairs with more channels."""
  fsq = FSQ((3, 3, 3))
  grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)   # all 27 combinations
  dep = lambda digits, mask=None: float(fsq.dependence(
      fsq.level_probs(fsq.bound(_grid_latents(fsq, digits)), 1e-3),
      jnp.ones(len(digits), bool) if mask is None else mask))
  np.testing.assert_allclose(dep(grid), 0.0, atol=1e-6)
  copied = grid.copy()
  copied[:, 2] = copied[:, 0]             # channel 2 copies channel 0: one pair of three at 1
  np.testing.assert_allclose(dep(copied), 1 / 3, atol=1e-5)
  copied[:, 1] = 2 - copied[:, 0]         # and channel 1 mirrors it: every pair at 1
  np.testing.assert_allclose(dep(copied), 1.0, atol=1e-5)
  # Masked tokens do not count: the copies plus junk rows that break the copy, masked out.
  junk = np.concatenate([copied, grid])
  np.testing.assert_allclose(dep(junk, jnp.arange(len(junk)) < len(copied)), 1.0, atol=1e-5)
  assert dep(junk) < 0.5
  assert float(FSQ((5,)).dependence(jnp.full((4, 1, 5), 0.2), jnp.ones(4, bool))) == 0.0   # no pairs


@pytest.mark.parametrize("channels", [2, 8])
def test_dependence_weight_is_per_channel(channels):
  """The usage term adds dependence_weight * (channels - 1) / 2 * the mean pairwise dependence: one copied pair
  among otherwise independent channels costs dependence_weight / channels on any channel count, as one channel's
  share of the entropy part does."""
  fsq = FSQ((3,) * channels)
  digits = np.stack(np.meshgrid(*[np.arange(3)] * channels, indexing="ij"), -1).reshape(-1, channels)
  digits[:, 1] = digits[:, 0]             # channel 1 copies channel 0; the rest stay independent
  z, mask = _grid_latents(fsq, digits), jnp.ones(len(digits), bool)
  loss = lambda weight: float(fsq.usage_loss(z, mask, temperature=1e-3, linear_range=10.0,
                                             dependence_weight=weight)[0])
  np.testing.assert_allclose(loss(1.5) - loss(0.0), 1.5 / channels, atol=1e-4)   # float32 sums over 3^8 rows


def test_dependence_gradient_separates_copied_channels():
  """Descending the usage term with the dependence turned on unties two channels that start as near copies: their
  hard codes decorrelate and use more level combinations. Without it the copies stay."""
  fsq = FSQ((3, 3))
  base = jax.random.normal(jax.random.key(0), (512, 1))
  z0 = jnp.concatenate([base, base + 0.05 * jax.random.normal(jax.random.key(1), (512, 1))], -1)
  mask = jnp.ones(512, bool)

  def train(weight):
    grad = jax.jit(jax.grad(lambda z: fsq.usage_loss(z, mask, dependence_weight=weight)[0]))
    z = z0
    for _ in range(200):
      z = z - 50.0 * grad(z)   # per-token gradients are O(1 / tokens)
    codes, indices = fsq.quantize(z)
    corr = abs(float(np.corrcoef(np.asarray(codes).T)[0, 1]))
    return corr, float(code_usage(indices, mask, 9)["perplexity"])

  corr, perplexity = train(0.0)
  assert corr > 0.9 and perplexity < 2.5    # ~2 codes: two corners of the 3 x 3 grid's diagonal
  corr, perplexity = train(2.0)   # 1 on the pair's mean dependence
  assert corr < 0.5 and perplexity > 3.5    # ~4 codes: all four corners


def test_usage_range_term_pulls_saturated_latents_back():
  """A saturated latent gets almost no gradient through the tanh (gradient_gain ~ 0), but the range term's
  gradient on it is 2 * excess, pointing back towards the linear range."""
  fsq = FSQ((5,))
  z = jnp.array([[6.0], [0.1]])
  gain = np.asarray(fsq.gradient_gain(fsq.bound(z)))
  assert gain[0, 0] < 1e-4 and gain[1, 0] > 0.98
  np.testing.assert_allclose(gain[1, 0], 1 - np.tanh(0.1) ** 2, rtol=1e-4)
  grad = jax.grad(lambda z: fsq.usage_loss(z, jnp.ones((2,), bool), linear_range=1.5)[0])(z)
  # d/dz of (1/2) * (6 - 1.5)^2 (mean over 2 tokens); the entropy part adds ~0 at saturation.
  np.testing.assert_allclose(float(grad[0, 0]), 4.5, rtol=1e-3)
