"""Conditional flow-matching mel decoder: token code vectors (+ speaker, + mel prompt) -> log-mel.

The decoder is a velocity field v(x_t, t | codes, prompt, speaker) trained on the optimal-transport path with a
floor sigma_min (CosyVoice 2):

  x_t = (1 - (1 - sigma_min) t) x0 + t x1,   x0 ~ N(0, I),   target u = x1 - (1 - sigma_min) x0,

and sampled by a guided Euler ODE solve from t = 0 (noise) to t = 1 (mel) on a cosine time grid. Training draws t
uniformly or, as CosyVoice, warped toward the noise end (`fm.t_schedule`, `training_times`). With `fm.prior_start`
the noise is centred on the prior mel (PriorGrad), a change of variables inside the network (see `__call__`).

Mel normalisation. Log-mel spans about log(1e-5) = -11.5 (the floor, silence) to +3, with mean about -5 and
standard deviation about 3.3 (measured on synthetic speech at the tiny, small and paper audio settings). The flow
runs in the normalised space `(log_mel - MEL_MEAN) / MEL_STD`, so the data and the N(0, I) noise have the same
scale. The network (`FlowMatchingDecoder`) sees and predicts normalised values only: its `x_t`, `prompt_mel` and
returned velocity are all in the normalised space. `fm_loss` and `sample` are the only conversion points: they
take real log-mel (`mel`, `prompt_mel`) and `sample` returns real log-mel.

Conditioning. Token code vectors [B, Ts, D] are projected to d_model, contextualised by a small non-causal
transformer over the tokens (`fm.encoder_layers`, CosyVoice's token encoder) and repeated `downsample` times to the
frame rate, plus a learned per-phase embedding (which frame of its token a frame is), so the transformer can
interpolate inside a token. A linear head on these features is the prior: a direct estimate of the mel from the
codes alone, trained by MSE beside the flow (Matcha-TTS's encoder loss). Frames are fused as dense([x_t, prompt]) +
code features; time and speaker form the AdaLN-Zero condition of every block (DiT). Classifier-free guidance drops
codes, speaker and prompt together: the unconditional input is `code_mask` all False (code features exactly zero;
the code projection has a bias so that a valid all-zero FSQ vector is distinguishable from "no codes"), `spk` zeros
and `prompt_mel` zeros.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from e2etts_jax.models import layers

Array = jax.Array
# apply_fn(x_t, t, codes, code_mask, prompt_mel, spk, mel_mask) -> (velocity, prior mel); all mel-like arrays
# normalised.
VelocityFn = Callable[[Array, Array, Array, Array, Array, Array, Array], Array]

MEL_MEAN = -5.0
MEL_STD = 3.3
# Real log-mel of silence at the default audio.log_floor (1e-5): what `sample` writes into padded frames unless the
# caller passes its own config's floor as `silence`.
MEL_SILENCE = math.log(1e-5)
# Flow time is scaled before the sinusoidal features so that [0, 1] spans many periods (as DiT's 0..1000 steps).
_TIME_SCALE = 1000.0
_TIME_FEATURES = 256
# Small per-frame axes (mel bins, code dims, speaker dims) have no rule in sharding.LOGICAL_RULES: replicated.
_FEATURE = "feature"


def normalize_mel(log_mel: Array) -> Array:
  """Real log-mel -> the flow's unit-scale space (elementwise; any shape)."""
  return (log_mel - MEL_MEAN) / MEL_STD


def denormalize_mel(x: Array) -> Array:
  """The flow's space -> real log-mel (elementwise; any shape)."""
  return x * MEL_STD + MEL_MEAN


class FlowMatchingDecoder(nn.Module):
  """DiT-style velocity network of the flow-matching decoder (all mel-like inputs/outputs normalised).

  Uses config.fm (transformer sizes), config.model (dtype, remat, rope), config.tokenizer.downsample.
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x_t: Array, t: Array, codes: Array, code_mask: Array, prompt_mel: Array, spk: Array,
               mel_mask: Array) -> Array:
    """Velocity at (x_t, t).

    Args:
      x_t: [B, F, M] noisy normalised mel.
      t: [B] flow time in [0, 1].
      codes: [B, Ts, D] token code vectors (hard FSQ vectors or soft mixtures), F = Ts * downsample.
      code_mask: [B, Ts] bool, False for padding (all False = unconditional).
      prompt_mel: [B, F, M] normalised prompt mel, zeros outside the prompt prefix.
      spk: [B, E] speaker embedding (zeros = unconditional).
      mel_mask: [B, F] bool frame validity.
    Returns:
      (velocity, prior): [B, F, M] float32 each, zero on padded frames. `prior` is the token encoder's direct
      estimate of the normalised mel (a function of the codes alone; see `fm_loss`).
    """
    cfg = layers.TransformerConfig.from_config(self.config.fm, self.config.model, adaln=True, causal=False)
    d, dt = cfg.d_model, cfg.dtype
    ds = int(self.config.tokenizer.downsample)
    b, f, m = x_t.shape
    ts = codes.shape[1]
    if ts * ds != f:
      raise ValueError(f"FlowMatchingDecoder: {ts} tokens x tokenizer.downsample={ds} = {ts * ds} frames, "
                       f"but x_t has {f} frames")

    # Token features: project, contextualise over tokens (the encoder), repeat per frame, add which-frame-of-the-
    # token. Dropped/padded tokens are zeroed before and after the encoder so "no codes" stays exactly zero.
    tmask = code_mask[..., None].astype(dt)
    code_feat = layers.dense(d, (_FEATURE, "embed"), dt, "code_in", use_bias=True)(codes.astype(dt)) * tmask
    if int(self.config.fm.encoder_layers):
      enc_cfg = dataclasses.replace(cfg, num_layers=int(self.config.fm.encoder_layers), adaln=False)
      code_feat = code_feat + layers.Transformer(enc_cfg, name="encoder")(code_feat, code_mask)[0] * tmask
    # The prior: a direct regression of the (normalised) mel from the token features alone (Matcha-TTS's encoder
    # output mu), all `ds` frames of a token from that token's features. Its MSE is the clean, low-variance part of
    # the reconstruction signal (the flow loss is noisy over t and x0), which is what teaches the codes, and the
    # tokenizer behind them, what the mel looks like.
    prior = layers.dense(ds * m, ("embed", _FEATURE), dt, "prior_out", use_bias=True)(code_feat)
    prior = prior.astype(jnp.float32).reshape(b, f, m) * mel_mask[..., None]
    phase = self.param("code_phase", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                  (_FEATURE, "embed")), (ds, d))
    code_feat = jnp.repeat(code_feat, ds, axis=1) + jnp.tile(phase.astype(dt), (ts, 1))[None]
    code_feat = code_feat * jnp.repeat(code_mask, ds, axis=1)[..., None].astype(dt)  # dropped/padded -> exactly 0

    # Prior start (PriorGrad): the flow runs from N(prior, I) instead of N(0, I), i.e. on the residual mel - prior,
    # so the velocity network learns detail and denoising around the prior rather than the whole mel. Done as a
    # change of variables inside the network: the caller's state z_t is the standard path (from N(0, I)), the
    # network sees x_t = z_t + (1 - (1 - sigma_min) t) prior and returns dz/dt = dx/dt + (1 - sigma_min) prior, so
    # `fm_loss`, `sample` and every other caller keep the standard path. The prior is stop-gradiented here: its own
    # MSE term trains it.
    start = 0.0
    if bool(self.config.fm.prior_start):
      keep_frac = 1.0 - float(self.config.fm.sigma_min)
      start = jax.lax.stop_gradient(prior)
      x_t = x_t + (1.0 - keep_frac * t)[:, None, None] * start
      start = keep_frac * start

    frames = jnp.concatenate([x_t, prompt_mel], axis=-1).astype(dt)
    h = layers.dense(d, (_FEATURE, "embed"), dt, "mel_in", use_bias=True)(frames) + code_feat

    # AdaLN condition: time MLP + speaker projection.
    t_feat = layers.sinusoidal_embedding(t * _TIME_SCALE, _TIME_FEATURES).astype(dt)
    t_emb = layers.dense(d, (_FEATURE, "embed"), dt, "time_in", use_bias=True)(t_feat)
    t_emb = layers.dense(d, ("mlp", "embed"), dt, "time_out", use_bias=True)(nn.silu(t_emb))
    s_emb = layers.dense(d, (_FEATURE, "embed"), dt, "spk_in", use_bias=True)(spk.astype(dt))
    cond = t_emb + s_emb

    y, _ = layers.Transformer(cfg, name="dit")(h, mel_mask, cond=cond)
    # DiT final layer: condition-dependent shift/scale, zero-initialised so training starts from v = 0.
    shift, scale = jnp.split(layers.dense(2 * d, ("embed", "mlp"), dt, "final_adaln", use_bias=True,
                                          kernel_init=nn.initializers.zeros)(nn.silu(cond))[:, None, :], 2, -1)
    y = y * (1 + scale) + shift
    v = layers.dense(m, ("embed", _FEATURE), dt, "mel_out", use_bias=True, kernel_init=nn.initializers.zeros)(y)
    return (v.astype(jnp.float32) + start) * mel_mask[..., None], prior


def fm_loss(apply_fn: VelocityFn, rng: Array, mel: Array, mel_mask: Array, codes: Array, code_mask: Array,
            spk: Array, fm_cfg: ml_collections.ConfigDict) -> tuple[Array, dict]:
  """Conditional flow-matching loss for one batch (deterministic given `rng`).

  Args:
    apply_fn: the bound velocity network (normalised space), see `FlowMatchingDecoder.__call__`.
    rng: key for t, x0, prompt lengths and CFG drops.
    mel: [B, F, M] real log-mel targets; mel_mask: [B, F] bool.
    codes: [B, Ts, D]; code_mask: [B, Ts] bool; spk: [B, E].
    fm_cfg: config.fm (sigma_min, t_schedule, prompt_prob, prompt_max_frac, cfg_drop, prior_weight).
  Returns:
    (loss, metrics): loss = flow + prior_weight * prior, where flow is the mean squared velocity error over valid,
    non-prompt frames and all mel bins, and prior the mean squared error of the prior mel (normalised space) over
    the valid frames of rows that kept their codes. Prompt frames are given to the network (as `prompt_mel`) and
    so carry no flow signal; for rows whose conditions were dropped the prompt frames are still excluded, so the
    excluded set depends only on `rng`.
  """
  b, f, m = mel.shape
  sigma = fm_cfg.sigma_min
  k_t, k_x0, k_use, k_len, k_drop = jax.random.split(rng, 5)
  x1 = normalize_mel(mel.astype(jnp.float32)) * mel_mask[..., None]
  t = training_times(k_t, b, fm_cfg.t_schedule)
  x0 = jax.random.normal(k_x0, x1.shape)
  tb = t[:, None, None]
  x_t = (1 - (1 - sigma) * tb) * x0 + tb * x1
  u = x1 - (1 - sigma) * x0

  # Prompt: with prob prompt_prob, frames [0, len) of the row with len ~ U{0..floor(frac * valid frames)}.
  n_valid = jnp.sum(mel_mask, axis=1)
  use = jax.random.bernoulli(k_use, fm_cfg.prompt_prob, (b,))
  max_len = jnp.floor(fm_cfg.prompt_max_frac * n_valid.astype(jnp.float32))
  plen = jnp.floor(jax.random.uniform(k_len, (b,)) * (max_len + 1)).astype(jnp.int32) * use
  prompt_mask = layers.length_mask(plen, f) & mel_mask
  keep = ~jax.random.bernoulli(k_drop, fm_cfg.cfg_drop, (b,))
  prompt = x1 * (prompt_mask & keep[:, None])[..., None]

  v, prior = apply_fn(x_t, t, codes, code_mask & keep[:, None], prompt, spk * keep[:, None].astype(spk.dtype),
                      mel_mask)
  loss_mask = (mel_mask & ~prompt_mask)[..., None]
  flow = layers.masked_mean(jnp.square(v.astype(jnp.float32) - u), loss_mask)
  # The prior sees only the codes, so it is scored on every valid frame of the rows that kept their codes.
  prior_err = layers.masked_mean(jnp.square(prior - x1), (mel_mask & keep[:, None])[..., None])
  loss = flow + fm_cfg.prior_weight * prior_err
  metrics = {
      "fm_loss": loss,
      "fm_flow": flow,
      "fm_prior": prior_err,
      "fm_prompt_frac": jnp.sum(prompt_mask) / jnp.maximum(jnp.sum(mel_mask), 1),
      "fm_cfg_drop_frac": 1.0 - jnp.mean(keep.astype(jnp.float32)),
  }
  return loss, metrics


T_SCHEDULES = ("uniform", "cosine")


def training_times(rng: Array, n: int, schedule: str) -> Array:
  """[n] flow times for training: 'uniform' U(0, 1), or 'cosine' 1 - cos(u pi / 2) with u ~ U(0, 1).

  The cosine warp (CosyVoice's t_scheduler) spends more of training near the noise end (density
  2 / (pi sqrt(1 - (1 - t)^2))), where the sampler's cosine grid (`cosine_time_grid`) takes its small steps and
  the velocity is hardest to predict.
  """
  u = jax.random.uniform(rng, (n,))
  if schedule == "uniform":
    return u
  if schedule == "cosine":
    return 1.0 - jnp.cos(u * (jnp.pi / 2))
  raise ValueError(f"fm.t_schedule={schedule!r}: choose one of {', '.join(T_SCHEDULES)}")


def cosine_time_grid(steps: int) -> Array:
  """[steps + 1] times 1 - cos(s * pi / 2) for s = 0, 1/steps, ..., 1: small steps near the noise end."""
  s = jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32)
  return 1.0 - jnp.cos(s * (jnp.pi / 2))


def prior_mel(apply_fn: VelocityFn, codes: Array, code_mask: Array, mel_mask: Array, *, n_mels: int,
              spk_dim: int) -> Array:
  """[B, F, M] float32 normalised mel of the FM's prior head (`apply_fn`'s second output) for `codes`.

  The prior is a function of the codes alone, so x_t, t, prompt and speaker are zero placeholders (and XLA drops the
  velocity branch, whose output is unused).
  """
  b, f = mel_mask.shape
  zeros = jnp.zeros((b, f, n_mels), jnp.float32)
  _, prior = apply_fn(zeros, jnp.zeros((b,), jnp.float32), codes, code_mask, zeros,
                      jnp.zeros((b, spk_dim), jnp.float32), mel_mask)
  return prior.astype(jnp.float32)


def sample(apply_fn: VelocityFn, rng: Array, codes: Array, code_mask: Array, prompt_mel: Array,
           prompt_mask: Array, spk: Array, mel_mask: Array, *, steps: int, guidance: float,
           sigma_min: float = 1e-6, temperature: float = 1.0, start_t: float = 0.0,
           silence: float = MEL_SILENCE) -> Array:
  """Generates log-mel by a guided Euler ODE solve on the cosine grid (jit-friendly: one lax.fori_loop).

  Args:
    apply_fn: the bound velocity network (normalised space).
    rng: key for the initial noise.
    codes: [B, Ts, D]; code_mask: [B, Ts] bool; spk: [B, E]; mel_mask: [B, F] bool.
    prompt_mel: [B, F, M] real log-mel, read only where prompt_mask [B, F] is True (the given prefix).
    steps: Euler steps (static). guidance: CFG weight g (static Python float): v = (1 + g) v_cond - g v_uncond,
      with cond and uncond evaluated in one batched call; g == 0 skips the unconditional half.
    temperature: scale of the initial noise (Matcha-TTS's sampling temperature): below 1 starts the solve nearer
      the data mean, trading variety for less residual noise where the velocity field is still imprecise.
    sigma_min: the training path's floor. The straight path ends at x1 + sigma_min * x0, so the known start
      noise term is removed at the end (exact for straight trajectories, negligible otherwise).
    start_t: flow time the solve starts at (static Python float in [0, 1); 0 = from pure noise). Above 0 the
      start is the training path's point at start_t with the prior head's mel in place of the unknown mel,
      (1 - (1 - sigma_min) start_t) x0 + start_t prior (DiffSinger's shallow diffusion), and the `steps` Euler
      steps cover [start_t, 1] on the cosine grid rescaled to it: the solve skips the noise end, where the
      velocity is hardest to predict, and starts from what the codes say of the mel.
    silence: real log-mel written into padded frames (log of the audio config's log_floor).
  Returns:
    [B, F, M] real log-mel: prompt frames equal `prompt_mel`, padded frames are `silence`.
  """
  b, f = mel_mask.shape
  m = prompt_mel.shape[-1]
  prompt = jnp.where(prompt_mask[..., None], normalize_mel(prompt_mel.astype(jnp.float32)), 0.0)
  x0 = float(temperature) * jax.random.normal(rng, (b, f, m), jnp.float32)
  grid = cosine_time_grid(steps)
  guided = float(guidance) != 0.0
  start_t = float(start_t)
  if not 0.0 <= start_t < 1.0:
    raise ValueError(f"flow_matching.sample: start_t={start_t} must be in [0, 1)")
  x_start = x0
  if start_t > 0.0:
    prior = prior_mel(apply_fn, codes, code_mask, mel_mask, n_mels=m, spk_dim=spk.shape[-1])
    prior = jnp.where(prompt_mask[..., None], prompt, prior)   # the prompt's mel is known
    x_start = (1.0 - (1.0 - sigma_min) * start_t) * x0 + start_t * prior
    grid = start_t + (1.0 - start_t) * grid

  if guided:
    # Unconditional rows: no codes, no speaker, no prompt (as the training-time CFG drop).
    both = lambda a, a_uncond: jnp.concatenate([a, a_uncond], axis=0)
    in_codes = both(codes, codes)
    in_code_mask = both(code_mask, jnp.zeros_like(code_mask))
    in_prompt = both(prompt, jnp.zeros_like(prompt))
    in_spk = both(spk, jnp.zeros_like(spk))
    in_mask = both(mel_mask, mel_mask)

  def velocity(x: Array, t: Array) -> Array:
    tb = jnp.full((b,), t, jnp.float32)
    if not guided:
      return apply_fn(x, tb, codes, code_mask, prompt, spk, mel_mask)[0].astype(jnp.float32)
    v = apply_fn(both(x, x), both(tb, tb), in_codes, in_code_mask, in_prompt, in_spk, in_mask)[0]
    v = v.astype(jnp.float32)
    return (1.0 + guidance) * v[:b] - guidance * v[b:]

  def step(i, x):
    t, t_next = grid[i], grid[i + 1]
    return x + (t_next - t) * velocity(x, t)

  x = jax.lax.fori_loop(0, steps, step, x_start) - sigma_min * x0
  mel = denormalize_mel(x)
  mel = jnp.where(prompt_mask[..., None], prompt_mel.astype(jnp.float32), mel)
  return jnp.where(mel_mask[..., None], mel, jnp.float32(silence))
