"""Flow-matching decoder: sampler against fields with known solutions, CFG algebra, loss masking, overfitting,
padding invariance, and the paper-size parameter count."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from e2etts_jax import config_lib, sharding
from e2etts_jax.models import flow_matching as fm

B, TS, E = 2, 6, 16


def _batch(config, seed=0):
  """A tiny batch: real-scale log-mel, FSQ-like codes, unit speakers; row 1 is padded."""
  ds, m, d = config.tokenizer.downsample, config.audio.n_mels, len(config.tokenizer.fsq_levels)
  f = TS * ds
  r = np.random.default_rng(seed)
  mel = jnp.asarray(r.uniform(-11.0, 2.0, (B, f, m)), jnp.float32)
  mel_mask = jnp.arange(f)[None] < jnp.array([[f], [f - 2 * ds]])
  codes = jnp.asarray(r.integers(-1, 2, (B, TS, d)), jnp.float32)
  code_mask = jnp.arange(TS)[None] < jnp.array([[TS], [TS - 2]])
  spk = r.standard_normal((B, E))
  spk = jnp.asarray(spk / np.linalg.norm(spk, axis=-1, keepdims=True), jnp.float32)
  return mel, mel_mask, codes, code_mask, spk


@pytest.fixture(scope="module")
def decoder():
  """The tiny config's decoder, initialised once for the module (tests must not mutate the config)."""
  config = config_lib.get_config("tiny")
  batch = _batch(config)
  mel, mel_mask, codes, code_mask, spk = batch
  model = fm.FlowMatchingDecoder(config)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(1), mel, jnp.zeros(B), codes, code_mask, mel, spk, mel_mask))
  return config, model, params, batch


def test_normalisation_round_trip_and_scale():
  x = jnp.linspace(-11.5, 3.0, 7)
  np.testing.assert_allclose(fm.denormalize_mel(fm.normalize_mel(x)), x, atol=1e-5)
  # The log-mel range maps to a few units around 0, the scale of the N(0, I) noise.
  assert -2.5 < float(fm.normalize_mel(-11.5)) < -1.5 and 1.5 < float(fm.normalize_mel(3.0)) < 2.5


def _net(field):
  """A velocity field in the decoder's output form (velocity, prior); the sampler uses the velocity only."""
  return lambda x, *rest: (field(x, *rest), jnp.full_like(x, jnp.nan))


def test_sampler_lands_on_target_of_straight_field(tiny_config):
  """For a one-point data distribution the exact OT velocity keeps trajectories straight: Euler is exact on any
  grid, so the sampler must reach the target (and only if it integrates the whole of t = 0..1)."""
  mel, mel_mask, codes, code_mask, spk = _batch(tiny_config)
  target = fm.normalize_mel(mel)
  sigma = 1e-6

  def field(x, t, *_):
    t, x1 = t[:, None, None], jnp.concatenate([target] * (x.shape[0] // B))   # cond (+ uncond) rows
    return (x1 - (1 - sigma) * x) / (1 - (1 - sigma) * t)

  prompt_mask = jnp.arange(mel.shape[1])[None] < jnp.array([[3], [0]])
  prompt_mel = jnp.where(prompt_mask[..., None], mel - 1.0, 0.0)   # differs from target: must be copied
  pm, valid = np.asarray(prompt_mask), np.asarray(mel_mask)
  for steps, guidance in ((3, 0.0), (10, 0.7)):   # the field ignores conditions, so CFG must not move it
    out = np.asarray(fm.sample(_net(field), jax.random.key(3), codes, code_mask, prompt_mel, prompt_mask, spk,
                               mel_mask, steps=steps, guidance=guidance, sigma_min=sigma))
    free = valid & ~pm
    np.testing.assert_allclose(out[free], np.asarray(mel)[free], atol=2e-4)
    np.testing.assert_array_equal(out[pm], np.asarray(prompt_mel)[pm])
    assert np.all(out[~valid] == fm.MEL_SILENCE)
  out = fm.sample(_net(field), jax.random.key(3), codes, code_mask, prompt_mel, prompt_mask, spk, mel_mask, steps=3,
                  guidance=0.0, sigma_min=sigma, silence=-7.25)   # another config's log floor
  assert np.all(np.asarray(out)[~valid] == np.float32(-7.25))


def test_sampler_uses_cosine_grid_with_exact_euler_error(tiny_config):
  """v(x, t) = 2t solves to x(1) = x(0) + 1; Euler on grid t_i misses by exactly sum_i (t_{i+1} - t_i)^2."""
  mel, mel_mask, codes, code_mask, spk = _batch(tiny_config)
  steps = 10
  no_prompt = jnp.zeros(mel_mask.shape, bool)
  run = lambda field: fm.sample(_net(field), jax.random.key(4), codes, code_mask, mel, no_prompt, spk, mel_mask,
                                steps=steps, guidance=0.0, sigma_min=0.0)
  moved = run(lambda x, t, *_: jnp.broadcast_to(2 * t[:, None, None], x.shape))
  still = run(lambda x, t, *_: jnp.zeros_like(x))
  grid = 1 - np.cos(np.linspace(0, 1, steps + 1) * np.pi / 2)
  euler_error = np.sum(np.diff(grid) ** 2)
  assert euler_error > 0.01  # the grid is not uniform (uniform gives 0.1 ...) and the check below is sensitive
  delta = np.asarray(moved - still)[np.asarray(mel_mask)] / fm.MEL_STD
  np.testing.assert_allclose(delta, 1.0 - euler_error, atol=1e-5)
  assert abs(euler_error - 1.0 / steps) > 1e-3


@pytest.mark.parametrize("start_t", [0.3, 0.6])
def test_shallow_start_begins_on_the_training_path_at_the_prior(tiny_config, start_t):
  """With start_t the solve starts at (1 - (1 - sigma) t0) x0 + t0 prior and covers [t0, 1] on the rescaled cosine
  grid: a still field returns exactly that start (temperature 0: t0 prior), v = 2t adds (1 - t0^2) less the Euler
  error of the rescaled grid, and prompt frames stay the prompt."""
  mel, mel_mask, codes, code_mask, spk = _batch(tiny_config)
  steps, f = 6, mel.shape[1]
  prior = fm.normalize_mel(mel) + 0.25
  prompt_mask = jnp.arange(f)[None] < jnp.array([[4], [0]])
  net = lambda field: (lambda x, *rest: (field(x, *rest), prior * rest[-1][..., None]))
  run = lambda field, **kw: np.asarray(fm.sample(net(field), jax.random.key(6), codes, code_mask, mel, prompt_mask,
                                                 spk, mel_mask, steps=steps, guidance=0.0, start_t=start_t, **kw))
  free = np.asarray(mel_mask & ~prompt_mask)
  still = run(lambda x, t, *_: jnp.zeros_like(x), temperature=0.0, sigma_min=0.0)
  np.testing.assert_allclose(still[free], np.asarray(fm.denormalize_mel(start_t * prior))[free], atol=1e-5)
  np.testing.assert_array_equal(still[np.asarray(prompt_mask)], np.asarray(mel)[np.asarray(prompt_mask)])
  moved = run(lambda x, t, *_: jnp.broadcast_to(2 * t[:, None, None], x.shape), temperature=0.0, sigma_min=0.0)
  grid = start_t + (1 - start_t) * (1 - np.cos(np.linspace(0, 1, steps + 1) * np.pi / 2))
  np.testing.assert_allclose((moved - still)[free] / fm.MEL_STD, (1 - start_t ** 2) - np.sum(np.diff(grid) ** 2),
                             atol=1e-5)
  # With noise, the start keeps (1 - (1 - sigma) t0) of it: a still field returns that noise around t0 prior.
  noisy = run(lambda x, t, *_: jnp.zeros_like(x), sigma_min=1e-3)
  x0 = jax.random.normal(jax.random.key(6), mel.shape)
  expect = fm.denormalize_mel((1 - (1 - 1e-3) * start_t) * x0 + start_t * prior - 1e-3 * x0)
  np.testing.assert_allclose(noisy[free], np.asarray(expect)[free], atol=1e-4)
  with pytest.raises(ValueError, match="start_t=1.0"):
    fm.sample(net(lambda x, t, *_: x), jax.random.key(0), codes, code_mask, mel, prompt_mask, spk, mel_mask,
              steps=2, guidance=0.0, start_t=1.0)


def _cond_field(x, t, codes, code_mask, prompt, spk, mel_mask):
  """A field that depends on every condition, so conditional and unconditional velocities differ."""
  c = jnp.mean(codes * code_mask[..., None], axis=(1, 2))[:, None, None]
  s = jnp.sum(spk, axis=-1)[:, None, None]
  return (-0.5 * x + t[:, None, None] * (1.0 + c + s) + prompt) * mel_mask[..., None]


def _reference_sample(field, x0, grid, guidance, cond, uncond):
  x = np.asarray(x0, np.float64)
  for i in range(len(grid) - 1):
    t = jnp.full((x.shape[0],), grid[i], jnp.float32)
    v = np.asarray(field(jnp.asarray(x, jnp.float32), t, *cond))
    if guidance:
      v = (1 + guidance) * v - guidance * np.asarray(field(jnp.asarray(x, jnp.float32), t, *uncond))
    x = x + (grid[i + 1] - grid[i]) * v
  return x


@pytest.mark.parametrize("guidance,temperature", [(0.0, 1.0), (0.7, 1.0), (0.7, 0.5)])
def test_cfg_matches_reference_euler(tiny_config, guidance, temperature):
  mel, mel_mask, codes, code_mask, spk = _batch(tiny_config)
  prompt_mask = jnp.arange(mel.shape[1])[None] < 4
  steps, rng = 5, jax.random.key(5)
  out = fm.sample(_net(_cond_field), rng, codes, code_mask, mel, prompt_mask, spk, mel_mask, steps=steps,
                  guidance=guidance, sigma_min=0.0, temperature=temperature)
  x0 = temperature * jax.random.normal(rng, mel.shape)
  prompt = jnp.where(prompt_mask[..., None], fm.normalize_mel(mel), 0.0)
  cond = (codes, code_mask, prompt, spk, mel_mask)
  uncond = (codes, jnp.zeros_like(code_mask), jnp.zeros_like(prompt), jnp.zeros_like(spk), mel_mask)
  ref = _reference_sample(_cond_field, x0, np.asarray(fm.cosine_time_grid(steps)), guidance, cond, uncond)
  free = np.asarray(mel_mask & ~prompt_mask)
  np.testing.assert_allclose(np.asarray(out)[free], fm.denormalize_mel(ref)[free], rtol=1e-5, atol=1e-4)


def test_sampler_is_one_traced_loop(tiny_config):
  """Inside jit the velocity is traced once (a fori_loop), not unrolled per step in Python."""
  mel, mel_mask, codes, code_mask, spk = _batch(tiny_config)
  calls = []

  def field(x, t, *rest):
    calls.append(x.shape)
    return _cond_field(x, t, *rest)

  run = jax.jit(lambda r: fm.sample(_net(field), r, codes, code_mask, mel, mel_mask, spk, mel_mask, steps=10,
                                    guidance=0.7))
  jax.block_until_ready(run(jax.random.key(0)))
  assert calls == [(2 * B,) + mel.shape[1:]]  # one batched cond + uncond call, traced once


def _capture_loss(config, batch, mel=None, field=None, prior=None):
  mel0, mel_mask, codes, code_mask, spk = batch
  seen = {}

  def apply_fn(x_t, t, c, cm, prompt, s, mm):
    seen.update(prompt=prompt, code_mask=cm, spk=s, t=t)
    v = jnp.zeros_like(x_t) if field is None else field(x_t, prompt, mm)
    return v, prior(x_t) if prior is not None else jnp.zeros_like(x_t)

  loss, metrics = fm.fm_loss(apply_fn, jax.random.key(11), mel0 if mel is None else mel, mel_mask, codes,
                             code_mask, spk, config.fm)
  return float(loss), metrics, seen


def test_fm_loss_excludes_prompt_and_padding(tiny_config):
  # The flow term's masking; the prior term, which does score prompt frames, has its own test below.
  tiny_config.fm.update(prompt_prob=1.0, prompt_max_frac=0.5, cfg_drop=0.0, prior_weight=0.0)
  batch = _batch(tiny_config)
  mel, mel_mask = batch[0], batch[1]
  base, metrics, seen = _capture_loss(tiny_config, batch)
  prompt_mask = np.any(np.asarray(seen["prompt"]) != 0, axis=-1)
  n_valid = np.asarray(mel_mask).sum(1)
  assert prompt_mask.any() and np.all(prompt_mask.sum(1) <= np.floor(0.5 * n_valid))
  assert np.all(prompt_mask <= np.asarray(mel_mask))
  # The prompt given to the network is the normalised target on the prompt prefix.
  np.testing.assert_allclose(np.asarray(seen["prompt"])[prompt_mask], fm.normalize_mel(mel)[prompt_mask],
                             rtol=1e-6)
  pm = jnp.asarray(prompt_mask)[..., None]
  pad = ~mel_mask[..., None]
  # Changing the target inside the prompt or the padding leaves the loss unchanged ...
  assert _capture_loss(tiny_config, batch, mel=jnp.where(pm, mel + 5.0, mel))[0] == base
  assert _capture_loss(tiny_config, batch, mel=jnp.where(pad, mel + 5.0, mel))[0] == base
  # ... and so do huge predictions there; outside them a change does move the loss (the check is sensitive).
  huge = lambda x, prompt, mm: jnp.where(pm | pad, 1e4, 0.0) * jnp.ones_like(x)
  assert _capture_loss(tiny_config, batch, field=huge)[0] == pytest.approx(base, rel=1e-6)
  free = jnp.asarray(~prompt_mask & np.asarray(mel_mask))[..., None]
  assert _capture_loss(tiny_config, batch, mel=jnp.where(free, mel + 5.0, mel))[0] != base


@pytest.mark.parametrize("cfg_drop", [0.0, 1.0])
def test_fm_loss_adds_weighted_prior_error(tiny_config, cfg_drop):
  """loss = flow + prior_weight * MSE(prior, normalised mel) over valid frames (prompt frames included: the prior
  never sees the prompt) of the rows that kept their codes; a dropped row's prior is not scored."""
  tiny_config.fm.update(prompt_prob=1.0, prompt_max_frac=0.5, cfg_drop=cfg_drop, prior_weight=0.5)
  batch = _batch(tiny_config)
  mel, mel_mask = batch[0], np.asarray(batch[1])
  base, metrics, _ = _capture_loss(tiny_config, batch)
  with_prior, metrics1, _ = _capture_loss(tiny_config, batch, prior=lambda x: jnp.ones_like(x))
  x1 = np.asarray(fm.normalize_mel(mel), np.float64)
  if cfg_drop:
    assert with_prior == base and float(metrics1["fm_prior"]) == 0.0
    return
  err = lambda p: np.mean((p - x1)[mel_mask] ** 2)
  np.testing.assert_allclose(float(metrics["fm_prior"]), err(0.0), rtol=1e-5)
  np.testing.assert_allclose(float(metrics1["fm_prior"]), err(1.0), rtol=1e-5)
  np.testing.assert_allclose(with_prior - base, 0.5 * (err(1.0) - err(0.0)), rtol=1e-4)
  assert float(metrics1["fm_flow"]) == float(metrics["fm_flow"])


def test_training_times_follow_the_schedule():
  n = 200_000
  u = fm.training_times(jax.random.key(3), n, "uniform")
  t = fm.training_times(jax.random.key(3), n, "cosine")
  # The same key gives the same u; the cosine schedule is the warp 1 - cos(u pi / 2) of it.
  np.testing.assert_allclose(np.asarray(t), 1.0 - np.cos(np.asarray(u) * np.pi / 2), atol=1e-6)
  # Against the warped law: E[t] = 1 - 2 / pi, P(t < 0.1) = (2 / pi) arccos(0.9) (3-sigma bands).
  assert abs(float(t.mean()) - (1 - 2 / np.pi)) < 3 * 0.31 / math.sqrt(n)
  p = 2 / np.pi * np.arccos(0.9)
  assert abs(float((t < 0.1).mean()) - p) < 3 * math.sqrt(p * (1 - p) / n)
  assert abs(float((u < 0.1).mean()) - 0.1) < 3 * math.sqrt(0.09 / n)
  with pytest.raises(ValueError, match="fm.t_schedule='cos'"):
    fm.training_times(jax.random.key(3), 4, "cos")


def test_fm_loss_draws_times_from_the_configured_schedule(tiny_config):
  batch = _batch(tiny_config)
  _, _, uniform = _capture_loss(tiny_config, batch)
  tiny_config.fm.t_schedule = "cosine"
  _, _, cosine = _capture_loss(tiny_config, batch)
  np.testing.assert_allclose(np.asarray(cosine["t"]), 1.0 - np.cos(np.asarray(uniform["t"]) * np.pi / 2),
                             atol=1e-6)


def test_fm_loss_cfg_drop_zeroes_all_conditions(tiny_config):
  tiny_config.fm.update(prompt_prob=1.0, cfg_drop=1.0)
  _, metrics, seen = _capture_loss(tiny_config, _batch(tiny_config))
  assert not np.any(seen["code_mask"]) and not np.any(seen["spk"]) and not np.any(seen["prompt"])
  assert float(metrics["fm_cfg_drop_frac"]) == 1.0
  tiny_config.fm.cfg_drop = 0.0
  _, _, seen = _capture_loss(tiny_config, _batch(tiny_config))
  np.testing.assert_array_equal(seen["code_mask"], _batch(tiny_config)[3])


def test_decoder_padding_invariance_and_unconditional(decoder):
  config, model, params, batch = decoder
  mel, mel_mask, codes, code_mask, spk = batch
  # Make the zero-initialised output layers non-trivial so the outputs depend on the inputs.
  r = np.random.default_rng(2)
  params = jax.tree.map(lambda p: p + 0.05 * r.standard_normal(p.shape).astype(np.float32), params)
  x = fm.normalize_mel(mel)
  t = jnp.array([0.3, 0.8])
  run = jax.jit(lambda x, codes, code_mask, prompt, spk: model.apply(params, x, t, codes, code_mask, prompt, spk,
                                                                     mel_mask)[0])
  prior = jax.jit(lambda codes, code_mask, x: model.apply(params, x, t, codes, code_mask, x * 0, spk, mel_mask)[1])
  v = run(x, codes, code_mask, x * 0, spk)
  assert v.shape == mel.shape and np.all(np.asarray(v)[~np.asarray(mel_mask)] == 0)
  pad = ~mel_mask[..., None]
  code_pad = ~code_mask[..., None]
  v2 = run(jnp.where(pad, 50.0, x), jnp.where(code_pad, 7.0, codes), code_mask, jnp.where(pad, 3.0, 0.0 * x), spk)
  np.testing.assert_allclose(v2, v, atol=1e-5)
  # The prior is a function of the valid codes alone: not of x_t, nor of padded codes; zero on padded frames.
  p1 = prior(codes, code_mask, x)
  assert np.all(np.asarray(p1)[~np.asarray(mel_mask)] == 0)
  np.testing.assert_allclose(prior(jnp.where(code_pad, 7.0, codes), code_mask, 3.0 * x), p1, atol=1e-5)
  assert not np.allclose(prior(-codes, code_mask, x), p1, atol=1e-4)
  # With code_mask all False (the CFG-dropped input) the codes cannot matter; with it, they do.
  off = jnp.zeros_like(code_mask)
  np.testing.assert_allclose(run(x, codes, off, x * 0, spk), run(x, -codes, off, x * 0, spk), atol=1e-6)
  assert not np.allclose(run(x, codes, code_mask, x * 0, spk), run(x, -codes, code_mask, x * 0, spk), atol=1e-4)
  # A valid all-zero FSQ vector is not the same as a dropped token.
  zeros = jnp.zeros_like(codes)
  assert not np.allclose(run(x, zeros, code_mask, x * 0, spk), run(x, zeros, off, x * 0, spk), atol=1e-4)
  with pytest.raises(ValueError, match="downsample"):
    model.apply(params, x, t, codes[:, :-1], code_mask[:, :-1], x, spk, mel_mask)


def test_prior_start_flows_from_the_prior(decoder):
  """fm.prior_start: at initialisation (zero output layers) the returned velocity is (1 - sigma_min) * prior, so a
  noise-free, unguided solve lands on the prior mel; with trained-like (perturbed) weights the velocity is the
  standard decoder's evaluated at x_t + (1 - (1 - sigma) t) prior, plus (1 - sigma) prior."""
  config, model, params, batch = decoder
  mel, mel_mask, codes, code_mask, spk = batch
  config = config.copy_and_resolve_references()
  config.fm.prior_start = True
  config.fm.sigma_min = 0.01  # large enough that the (1 - sigma) factors are checked
  started = fm.FlowMatchingDecoder(config)
  t = jnp.array([0.3, 0.8])
  x = fm.normalize_mel(mel)
  v, prior = started.apply(params, x, t, codes, code_mask, x * 0, spk, mel_mask)
  assert np.abs(np.asarray(prior)).max() > 0.1
  np.testing.assert_allclose(v, 0.99 * prior, atol=1e-6)
  apply_fn = lambda *a: started.apply(params, *a)
  no_prompt = jnp.zeros_like(mel_mask)
  out = fm.sample(apply_fn, jax.random.key(0), codes, code_mask, mel, no_prompt, spk, mel_mask, steps=4,
                  guidance=0.0, sigma_min=0.01, temperature=0.0)
  valid = np.asarray(mel_mask)
  np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(fm.denormalize_mel(0.99 * prior))[valid],
                             atol=1e-4)
  # Perturbed weights: the change of variables against the standard decoder.
  r = np.random.default_rng(2)
  params = jax.tree.map(lambda p: p + 0.05 * r.standard_normal(p.shape).astype(np.float32), params)
  v, prior = started.apply(params, x, t, codes, code_mask, x * 0, spk, mel_mask)
  shifted = x + (1 - 0.99 * t)[:, None, None] * prior
  v_std, _ = model.apply(params, shifted, t, codes, code_mask, x * 0, spk, mel_mask)
  np.testing.assert_allclose(v, v_std + 0.99 * prior, atol=1e-4)


def test_params_shard_on_a_mesh(decoder):
  """Every parameter has logical axes the rule table resolves; small feature axes stay replicated."""
  config, model, params, batch = decoder
  mel, mel_mask, codes, code_mask, spk = batch
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
  abstract = jax.eval_shape(model.init, jax.random.key(1), mel, jnp.zeros(B), codes, code_mask, mel, spk, mel_mask)
  shardings = sharding.param_shardings(abstract, mesh)
  assert shardings["params"]["mel_out"]["kernel"].spec == P("fsdp", None)
  placed = jax.device_put(params, shardings)
  assert placed["params"]["dit"]["layers"]["mlp"]["up"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")


def test_decoder_overfits_one_batch(decoder):
  """Measured: fm_loss at one fixed rng key on the batch repeated 4 times (so 4 fixed draws of t, x0 and prompt
  per utterance), the same objective the model is trained on, so before/after are comparable."""
  config, model, params, batch = decoder
  mel, mel_mask, codes, code_mask, spk = (jnp.concatenate([a] * 4) for a in batch)
  fm_cfg = config.fm.copy_and_resolve_references()
  fm_cfg.cfg_drop = 0.0  # dropped rows have an irreducible loss (the mean over the batch)

  def loss(p):
    apply_fn = lambda *a: model.apply(p, *a)
    value, metrics = fm.fm_loss(apply_fn, jax.random.key(123), mel, mel_mask, codes, code_mask, spk, fm_cfg)
    return value, (metrics["fm_flow"], metrics["fm_prior"])

  opt = optax.adam(5e-3)

  @jax.jit
  def train(p):
    def step(carry, _):
      p, s = carry
      (_, terms), g = jax.value_and_grad(loss, has_aux=True)(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), terms
    (p, _), terms = jax.lax.scan(step, (p, opt.init(p)), None, length=60)
    return jax.tree.map(lambda x: x[0], terms), loss(p)[1]

  (flow0, prior0), (flow1, prior1) = jax.tree.map(float, train(params))
  assert flow1 < 0.1 * flow0, (flow0, flow1)
  assert prior1 < 0.1 * prior0, (prior0, prior1)


def test_paper_size_is_half_a_billion_parameters():
  config = config_lib.get_config("paper")
  ds, m, d = config.tokenizer.downsample, config.audio.n_mels, len(config.tokenizer.fsq_levels)
  model = fm.FlowMatchingDecoder(config)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 2 * ds, m)), jnp.zeros((1,)), jnp.zeros((1, 2, d)), jnp.ones((1, 2), bool),
      jnp.zeros((1, 2 * ds, m)), jnp.zeros((1, config.rm.spk_embed_dim)), jnp.ones((1, 2 * ds), bool)))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert abs(count - 0.5e9) < 0.05e9, count
