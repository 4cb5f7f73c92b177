"""Text-to-speech with a trained workdir: text -> speech tokens (LLM) -> log-mel (flow matching) -> waveform.

  synth = Synthesizer.from_workdir("runs/quickstart")   # [, inference={"fm.ode_steps": 32}]: see INFERENCE_KEYS
  result = synth.synthesize("Hello there.", prompt_wav="ref.wav", prompt_text="The reference transcript.")
  result.save("out.wav")              # also writes out.png, a picture of the generated mel

The chain (one `synthesize` call):
  1. text: `text.normalize_text` and `text.llm_text` (as at data preparation), sentencepiece ids of the workdir's model.
  2. prompt (optional, zero-shot): the wav is loaded with `audio.load_audio` (any rate, any channel count),
     analysed with THE `audio.log_mel`, trimmed to whole tokens and tokenized; its transcript is normalised and
     encoded like the target text. Prompts are cached by (path, size, mtime, transcript).
  3. LLM: `generation.generate` continues [sos, prompt text + text, task, prompt tokens] with new speech tokens
     (one compiled, KV-cached `while_loop`; config.llm sampling values; eos is masked below min_ratio x text
     tokens and forced at max_ratio x text tokens).
  4. FM: `flow_matching.sample` (guided Euler, config.fm.ode_steps / config.fm.guidance) over [prompt tokens,
     new tokens] with the prompt's mel as the known prefix, exactly as the FM was trained (the prompt is a prefix
     of the same utterance); only the frames after the prompt are returned, clipped to `mel_range`.
  5. vocoder: `vocoder.make_vocoder(config, name)` (Griffin-Lim unless another one is registered).

Speaker condition of the FM. In training it is the reward model's `spk_embed` of the utterance's own tokens, so:
  * with a prompt: `spk_embed` of the prompt's tokens (the voice to clone);
  * without a prompt (the default speaker): `spk_embed` of the tokens the LLM just generated. Without a prompt
    the LLM picks a voice itself (it was trained on many speakers with no prompt), and this embedding makes the
    FM render the voice those tokens carry, which is what the FM saw in training; it needs no data beside the
    checkpoint. For one fixed voice across calls, give every call the same prompt.
  * a prompt wav without a transcript: the LLM runs without a prompt (it cannot continue speech whose text it
    does not know), the FM still gets the prompt's mel prefix and speaker embedding.

Compilation. Every shape that reaches a compiled function is padded to a fixed bucket, so repeated calls reuse
compiled code: the LLM always sees text and prompt text padded to `text.max_text_tokens` and prompt speech
padded to `data.max_frames / tokenizer.downsample` tokens, with room for that many new tokens (one compiled loop
with a prompt, one without; padding changes no result, positions are per row); tokenizer, reward model and FM run
on token counts rounded up to BUCKETS (about x1.4 apart). Same inputs and seed give the identical waveform.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from e2etts_jax import audio, checkpoint, config_lib, text as text_lib
from e2etts_jax.models import flow_matching, generation, vocoder as vocoder_lib
from e2etts_jax.system import System

# Token-count buckets for the tokenizer, RM and FM (x ~1.4 apart: at most ~40% padding, few compiles).
BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
_PROMPT_CACHE_SIZE = 64

PromptAudio = Union[str, "os.PathLike[str]", tuple]   # a path, or (wav [samples], sample_rate)

# The config values a trained system may be synthesised with other than those it was trained with: how the LLM
# samples and how the FM's ODE is solved. Anything else would no longer describe the trained parameters.
INFERENCE_KEYS = (*(f"llm.{k}" for k in generation.SAMPLING_KEYS), "fm.ode_steps", "fm.guidance", "fm.temperature",
                  "fm.start_t", "fm.decoder", "model.use_ema")


class SynthesisError(ValueError):
  """The request cannot be synthesised (empty or too long text, unusable prompt); the message says why."""


def bucket(n: int, buckets: Sequence[int] = BUCKETS) -> int:
  """The smallest bucket >= n (n itself, rounded up to a multiple of 1024, beyond the last bucket)."""
  for b in buckets:
    if b >= n:
      return b
  return -(-n // 1024) * 1024


def _bucketed(indices: np.ndarray, empty_error: str) -> tuple[np.ndarray, np.ndarray]:
  """Token ids [n] zero-padded to [1, bucket(n)], with their validity mask [1, bucket(n)] (one compile per bucket).
  Raises SynthesisError(empty_error) when n == 0."""
  n = int(indices.shape[0])
  if n < 1:
    raise SynthesisError(empty_error)
  width = bucket(n)
  padded = np.zeros((1, width), np.int32)
  padded[0, :n] = indices
  return padded, np.arange(width)[None] < n


@dataclasses.dataclass
class Result:
  """One synthesised utterance.

  wav: [samples] float32 at `sample_rate`; mel: [frames, n_mels] generated log-mel (the prompt's frames are not
  included; samples = frames * hop_length); tokens: [n] int32 generated speech tokens; rtf: synthesis seconds /
  audio seconds; timings: seconds per phase (text, prompt, llm, fm, vocoder, total).
  """
  wav: np.ndarray
  sample_rate: int
  mel: np.ndarray
  tokens: np.ndarray
  rtf: float
  timings: dict

  @property
  def duration(self) -> float:
    return self.wav.shape[0] / self.sample_rate

  def save(self, wav_path: str, png_path: Optional[str] = None, title: Optional[str] = None) -> tuple[str, str]:
    """Writes the wav (16-bit PCM) and a mel picture (default: the wav path with .png). Returns both paths."""
    os.makedirs(os.path.dirname(os.path.abspath(wav_path)), exist_ok=True)
    audio.save_wav(wav_path, self.wav, self.sample_rate)
    png_path = png_path or os.path.splitext(wav_path)[0] + ".png"
    rate = self.sample_rate * self.mel.shape[0] / self.wav.shape[0] if self.wav.shape[0] else None
    save_mel_png(self.mel, png_path, title=title, frame_rate=rate)
    return wav_path, png_path


def save_mel_png(mel: np.ndarray, path: str, title: Optional[str] = None, frame_rate: Optional[float] = None) -> str:
  """Draws a log-mel [frames, n_mels] as an image (time left to right, low bins at the bottom); returns path."""
  # Figure, not pyplot: no global backend switch (that would break a notebook's inline plots).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  mel = np.asarray(mel, np.float32)
  fig = Figure(figsize=(max(4.0, min(16.0, mel.shape[0] / 40.0)), 3.0), layout='tight')
  ax = fig.subplots()
  extent = None
  if frame_rate:
    extent = (0.0, mel.shape[0] / frame_rate, 0, mel.shape[1])
  im = ax.imshow(mel.T, origin="lower", aspect="auto", interpolation="nearest", cmap="magma", extent=extent)
  ax.set_xlabel("seconds" if frame_rate else "frame")
  ax.set_ylabel("mel bin")
  if title:
    ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, label="log-mel")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)
  return path


def mel_range(audio_cfg) -> tuple[float, float]:
  """(lowest, highest) value `audio.log_mel` can produce for a waveform in [-1, 1]: the log floor, and the log
  of the largest mel filter's weight sum times the Hann window's sum (every bin of that filter at the largest
  magnitude a full-scale signal reaches). Decoded mels are clipped to it: the flow can overshoot into values no
  audio has, and those only cost the vocoder's non-negative least squares many more iterations."""
  basis = audio.mel_basis(int(audio_cfg.sample_rate), int(audio_cfg.n_fft), int(audio_cfg.n_mels),
                          float(audio_cfg.fmin), float(audio_cfg.fmax))
  window_sum = float(np.hanning(int(audio_cfg.win_length) + 1)[:-1].sum())   # periodic Hann, as the STFT's
  return audio.silence(audio_cfg), math.log(float(basis.sum(axis=1).max()) * window_sum)


@dataclasses.dataclass(frozen=True)
class _Prompt:
  mel: np.ndarray          # [Tp * ds, n_mels] real log-mel, trimmed to whole tokens
  indices: np.ndarray      # [Tp] int32 speech tokens
  text_ids: tuple          # sentencepiece ids of the transcript (`encode_text`; empty: no transcript)
  spk: np.ndarray          # [E] RM speaker embedding of the prompt tokens


def inference_settings(config: ml_collections.ConfigDict) -> dict:
  """{key: value} of INFERENCE_KEYS in `config` (what a synthesis report records)."""
  out = {}
  for key in INFERENCE_KEYS:
    section, name = key.split(".")
    out[key] = config[section][name]
  return out


def inference_config(config: ml_collections.ConfigDict, settings: Union[Mapping[str, Any], Sequence[str]]
                     ) -> ml_collections.ConfigDict:
  """A copy of `config` with INFERENCE_KEYS `settings` applied (`config` itself when there are none). Raises
  ValueError naming a key outside INFERENCE_KEYS or a value that does not parse."""
  if isinstance(settings, str):
    settings = [settings]
  settings = dict(settings) if isinstance(settings, Mapping) else list(settings)
  if not settings:
    return config
  for key in (settings if isinstance(settings, dict) else (s.split("=", 1)[0] for s in settings)):
    if key not in INFERENCE_KEYS:
      raise ValueError(f"{key!r} is not an inference setting: a trained system synthesises with other values "
                       f"of {', '.join(INFERENCE_KEYS)} only")
  config = ml_collections.ConfigDict(config.to_dict())
  try:
    config_lib.apply_overrides(config, settings)   # parses 'key=value' strings like the command line
    config_lib.validate(config)                    # names a value out of range (fm.decoder=...)
  except config_lib.ConfigError as e:
    raise ValueError(str(e)) from e
  return config


def with_inference_settings(system, settings: Union[Mapping[str, Any], Sequence[str]]):
  """`system` (a `system.System`) with INFERENCE_KEYS `settings` applied to a copy of its config (the same object
  when there are none); ValueError as `inference_config`."""
  config = inference_config(system.config, settings)
  return system if config is system.config else System(config, system.info)


class Synthesizer:
  """A trained system ready to synthesise. Build with `from_workdir`; methods are not thread-safe."""

  def __init__(self, system, params: Mapping[str, Any], sp, *, seed: int = 0, vocoder: str = "griffin_lim",
               inference: Union[Mapping[str, Any], Sequence[str]] = (), meta: Optional[Mapping] = None,
               workdir: Optional[str] = None):
    """system: `system.System`; params: {'tokenizer', 'llm', 'fm', 'rm'} params; sp: the sentencepiece
    processor the LLM was trained with; seed: default seed of every call; vocoder: a `vocoder` registry name;
    inference: settings of INFERENCE_KEYS to synthesise with instead of the trained config's, as
    {'fm.temperature': 0.5} or ['fm.temperature=0.5'] (ValueError naming the key for any other)."""
    system = with_inference_settings(system, inference)
    self.system, self.params, self.sp = system, params, sp
    self.config: ml_collections.ConfigDict = system.config
    self.seed, self.meta, self.workdir = int(seed), dict(meta or {}), workdir
    self.sampling = generation.sampling_params(self.config)
    self.vocoder = vocoder_lib.make_vocoder(self.config, vocoder)
    c = self.config
    self.sample_rate = int(c.audio.sample_rate)
    self.ds = int(c.tokenizer.downsample)
    self.hop = int(c.audio.hop_length)
    self.max_text = int(c.text.max_text_tokens)
    # The longest utterance the networks were trained on, in tokens: the cap for a prompt and for new speech.
    self.max_tokens = int(c.data.max_frames) // self.ds
    self._prompt_cache: dict = {}
    self.mel_range = mel_range(c.audio)
    self._build_functions()

  # ------------------------------------------------------------------------------------------- construction

  @classmethod
  def from_workdir(cls, workdir: str, step: Optional[int] = None, seed: int = 0, **kwargs) -> "Synthesizer":
    """Loads a training workdir's latest (or `step`) checkpoint, config and sentencepiece model.

    Raises FileNotFoundError (no such workdir, no spm.model) or checkpoint.CheckpointError (not a training
    workdir, no checkpoints, unreadable checkpoint), each naming the path at fault.
    """
    from e2etts_jax import trainer  # the trainer pulls in the input pipeline and optimiser: only when loading
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f"workdir not found: {workdir}")
    spm_path = os.path.join(workdir, "spm.model")
    for name in ("config.json", "data_info.json"):   # (missing ones are named by load_trained)
      path = os.path.join(workdir, name)
      if os.path.exists(path):
        try:
          with open(path) as f:
            json.load(f)
        except (ValueError, OSError) as e:
          raise checkpoint.CheckpointError(f"{path} is damaged: {type(e).__name__}: {e}") from e
    try:
      trained_config = trainer.load_config(workdir)
    except checkpoint.CheckpointError:
      raise
    except Exception as e:  # e.g. a key this version does not know
      raise checkpoint.CheckpointError(f"{os.path.join(workdir, 'config.json')}: {type(e).__name__}: {e}") from e
    # Which weights to load is an inference setting, read before the checkpoint (a ValueError names a bad one).
    use_ema = inference_config(trained_config, kwargs.get("inference", ())).model.use_ema
    try:
      system, params, meta = trainer.load_trained(workdir, step=step, ema=use_ema)
    except checkpoint.CheckpointError:
      raise
    except Exception as e:  # orbax/json raise many types for damaged files; name the checkpoint either way
      raise checkpoint.CheckpointError(
          f"cannot load the checkpoint in {os.path.join(workdir, 'checkpoints')}"
          f"{'' if step is None else f' (step {step})'}: {type(e).__name__}: {e}") from e
    if not os.path.exists(spm_path):
      raise FileNotFoundError(f"{workdir} has no sentencepiece model (expected {spm_path})")
    sp = text_lib.load_sentencepiece(spm_path)
    if sp.vocab_size() > system.info.text_vocab_size:
      raise checkpoint.CheckpointError(f"{spm_path} has {sp.vocab_size()} pieces but the LLM was trained on "
                                       f"{system.info.text_vocab_size}: the workdir's files do not belong together")
    return cls(system, params, sp, seed=seed, meta=meta, workdir=workdir, **kwargs)

  def _build_functions(self) -> None:
    s, fsq = self.system, self.system.fsq
    steps, guidance = int(self.config.fm.ode_steps), float(self.config.fm.guidance)
    sigma_min, temperature = float(self.config.fm.sigma_min), float(self.config.fm.temperature)
    start_t = float(self.config.fm.start_t)
    silence = self.mel_range[0]   # audio.silence: the log floor

    def tokenize(p, mel, mel_mask):
      out = s.tokenizer.apply({"params": p}, mel, mel_mask)
      return out["indices"], out["mask"]

    def spk_embed(p, indices, mask):
      return s.rm.apply({"params": p}, fsq.indices_to_codes(indices), mask)["spk_embed"]

    def decode(p, rng, indices, code_mask, prompt_mel, prompt_mask, spk, mel_mask):
      apply_fn = lambda *a: s.fm.apply({"params": p}, *a)
      codes = fsq.indices_to_codes(indices) * code_mask[..., None]
      return flow_matching.sample(apply_fn, rng, codes, code_mask, prompt_mel, prompt_mask, spk, mel_mask,
                                  steps=steps, guidance=guidance, sigma_min=sigma_min, temperature=temperature,
                                  start_t=start_t, silence=silence)

    def prior(p, indices, code_mask, mel_mask):
      codes = fsq.indices_to_codes(indices) * code_mask[..., None]
      mel = flow_matching.prior_mel(lambda *a: s.fm.apply({"params": p}, *a), codes, code_mask, mel_mask,
                                    n_mels=int(self.config.audio.n_mels), spk_dim=int(self.config.rm.spk_embed_dim))
      return flow_matching.denormalize_mel(mel)

    self._tokenize = jax.jit(tokenize)
    self._spk_embed = jax.jit(spk_embed)
    self._decode = jax.jit(decode)
    self._prior = jax.jit(prior)

  # -------------------------------------------------------------------------------------------------- pieces

  def encode_text(self, text: str, what: str = "text") -> list[int]:
    """Sentencepiece ids of `text` through the trained front end (`text.llm_text`); raises SynthesisError when
    empty or longer than the LLM takes."""
    if text is None or not str(text).strip():
      raise SynthesisError(f"{what} is empty: give a sentence to speak")
    norm = text_lib.normalize_text(str(text))
    if not norm:
      raise SynthesisError(f"{what} {str(text)[:80]!r} has nothing speakable after normalisation")
    try:
      llm_text = text_lib.llm_text(str(text), norm, self.config.text.frontend)
    except text_lib.FrontendError as e:
      raise SynthesisError(f"{what}: {e}") from e
    if not llm_text:
      raise SynthesisError(f"{what} {str(text)[:80]!r}: text.frontend={self.config.text.frontend!r} gives nothing")
    ids = text_lib.encode_text(llm_text, self.sp)
    if len(ids) > self.max_text:
      raise SynthesisError(f"{what} is too long: {len(ids)} text tokens, the model takes at most "
                           f"text.max_text_tokens={self.max_text}; split it into sentences")
    return ids

  def mel_of(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """THE log-mel [frames, n_mels] of a mono waveform at any rate (resampled to the model's)."""
    wav = np.asarray(wav, np.float32)
    if wav.ndim == 2:
      wav = wav.mean(axis=1)
    return audio.log_mel(audio.resample(wav, int(sample_rate), self.sample_rate), self.config.audio)

  def tokenize_mel(self, mel: np.ndarray) -> np.ndarray:
    """Speech tokens [frames // ds] int32 of a log-mel [frames, n_mels] (padded to a bucket for the compile)."""
    tokens = mel.shape[0] // self.ds
    if tokens < 1:
      raise SynthesisError(f"audio too short to tokenize: {mel.shape[0]} mel frames, need {self.ds}")
    width = bucket(tokens) * self.ds
    padded = np.zeros((1, width, mel.shape[1]), np.float32)
    padded[0, :tokens * self.ds] = mel[:tokens * self.ds]
    mask = np.arange(width)[None] < tokens * self.ds
    indices, _ = self._tokenize(self.params["tokenizer"], jnp.asarray(padded), jnp.asarray(mask))
    return np.asarray(indices[0, :tokens], np.int32)

  def speaker_embedding(self, indices: np.ndarray) -> np.ndarray:
    """The reward model's speaker embedding [E] (unit norm) of a token sequence [n]."""
    padded, mask = _bucketed(indices, "no speech tokens to embed")
    return np.asarray(self._spk_embed(self.params["rm"], jnp.asarray(padded), jnp.asarray(mask))[0])

  def embed_wav(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """Speaker embedding [E] of a waveform through tokenizer + RM: the internal SIM space."""
    return self.speaker_embedding(self.tokenize_mel(self.mel_of(wav, sample_rate)))

  def _load_prompt(self, prompt_wav: PromptAudio, prompt_text: Optional[str]) -> _Prompt:
    if isinstance(prompt_wav, tuple):
      wav, sr = prompt_wav
      key = None
    else:
      path = os.fspath(prompt_wav)
      if not os.path.exists(path):
        raise SynthesisError(f"prompt wav not found: {path}")
      st = os.stat(path)
      key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, prompt_text or "")
      if key in self._prompt_cache:
        return self._prompt_cache[key]
      try:
        wav, sr = audio.load_audio(path, self.sample_rate), self.sample_rate
      except audio.AudioError as e:
        raise SynthesisError(f"prompt wav {path}: {e}") from e
    try:
      mel = self.mel_of(wav, sr)
    except audio.AudioError as e:
      raise SynthesisError(f"prompt audio: {e}") from e
    tokens = mel.shape[0] // self.ds
    if tokens < 1:
      raise SynthesisError(f"prompt audio is too short ({mel.shape[0]} mel frames)")
    if tokens > self.max_tokens:
      raise SynthesisError(f"prompt audio is too long: {tokens / float(self.config.tokenizer.token_rate):.1f} s, "
                           f"the model was trained on at most data.max_frames={self.config.data.max_frames} "
                           f"frames ({self.max_tokens} tokens); use a shorter prompt")
    mel = mel[:tokens * self.ds]
    indices = self.tokenize_mel(mel)
    text_ids = tuple(self.encode_text(prompt_text, "prompt text")) if prompt_text and prompt_text.strip() else ()
    prompt = _Prompt(mel=mel, indices=indices, text_ids=text_ids, spk=self.speaker_embedding(indices))
    if key is not None:
      if len(self._prompt_cache) >= _PROMPT_CACHE_SIZE:
        self._prompt_cache.pop(next(iter(self._prompt_cache)))
      self._prompt_cache[key] = prompt
    return prompt

  def generate_tokens(self, text_ids: Sequence[int], prompt: Optional[_Prompt], rng: jax.Array) -> np.ndarray:
    """New speech tokens [n] int32 for target text ids (continuing the prompt's text and tokens if given)."""
    def padded(ids, width):
      a = np.zeros((1, width), np.int32)
      a[0, :len(ids)] = ids
      return jnp.asarray(a), jnp.asarray(np.arange(width)[None] < len(ids))

    text_ids_a, text_mask = padded(text_ids, self.max_text)
    kw = {}
    if prompt is not None and prompt.text_ids:
      kw["prompt_text_ids"], kw["prompt_text_mask"] = padded(prompt.text_ids, self.max_text)
      kw["prompt_indices"], kw["prompt_mask"] = padded(prompt.indices, self.max_tokens)
    out, lengths = generation.generate(self.system.llm, self.params["llm"], text_ids_a, text_mask, rng,
                                       max_new_tokens=self.max_tokens, sampling=self.sampling, **kw)
    n = int(lengths[0])
    return np.asarray(out[0, :n], np.int32)

  def decode_tokens(self, tokens: np.ndarray, rng: jax.Array, prompt: Optional[_Prompt] = None,
                    spk: Optional[np.ndarray] = None) -> np.ndarray:
    """FM log-mel [n * ds, n_mels] of speech tokens [n], after the prompt's tokens/mel when given (clipped to
    `mel_range`). With fm.decoder 'prior' it is the prior head's regression of the prompt's and the new tokens
    together (the prompt's tokens are context for its token encoder; rng, the prompt mel and spk are unused).

    spk: [E] speaker embedding; default: the prompt's, else the RM embedding of `tokens` themselves.
    """
    n = int(tokens.shape[0])
    if n < 1:
      raise SynthesisError("the LLM produced no speech tokens")
    p_idx = prompt.indices if prompt is not None else np.zeros((0,), np.int32)
    if self.config.fm.decoder == "prior":
      return self.prior_mel(np.concatenate([p_idx, tokens]))[p_idx.shape[0] * self.ds:]
    total = p_idx.shape[0] + n
    indices, code_mask = _bucketed(np.concatenate([p_idx, tokens]), "the LLM produced no speech tokens")
    frames = indices.shape[1] * self.ds
    m = int(self.config.audio.n_mels)
    prompt_frames = p_idx.shape[0] * self.ds
    prompt_mel = np.zeros((1, frames, m), np.float32)
    if prompt is not None:
      prompt_mel[0, :prompt_frames] = prompt.mel
    prompt_mask = np.arange(frames)[None] < prompt_frames
    mel_mask = np.arange(frames)[None] < total * self.ds
    if spk is None:
      spk = prompt.spk if prompt is not None else self.speaker_embedding(tokens)
    mel = self._decode(self.params["fm"], rng, jnp.asarray(indices), jnp.asarray(code_mask),
                       jnp.asarray(prompt_mel), jnp.asarray(prompt_mask), jnp.asarray(spk[None], jnp.float32),
                       jnp.asarray(mel_mask))
    lo, hi = self.mel_range
    return np.clip(np.asarray(mel[0, prompt_frames:total * self.ds], np.float32), lo, hi)

  def prior_mel(self, tokens: np.ndarray) -> np.ndarray:
    """The FM's prior-head log-mel [n * ds, n_mels] of speech tokens [n]: its direct regression of the mel from the
    codes (no flow, no noise; clipped to `mel_range`). What the codes alone say about the mel."""
    indices, code_mask = _bucketed(tokens, "no speech tokens to decode")
    n = int(tokens.shape[0])
    mel_mask = np.repeat(code_mask, self.ds, axis=1)
    mel = self._prior(self.params["fm"], jnp.asarray(indices), jnp.asarray(code_mask), jnp.asarray(mel_mask))
    lo, hi = self.mel_range
    return np.clip(np.asarray(mel[0, :n * self.ds], np.float32), lo, hi)

  # ---------------------------------------------------------------------------------------------- requests

  def synthesize(self, text: str, prompt_wav: Optional[PromptAudio] = None, prompt_text: Optional[str] = None,
                 seed: Optional[int] = None) -> Result:
    """Speaks `text` (in the voice of `prompt_wav`, whose transcript is `prompt_text`, when given).

    prompt_wav: a path (any format soundfile reads, any rate, mono or multi-channel) or (wav, sample_rate).
    seed: LLM sampling and FM noise (default: the synthesizer's seed); the same seed gives the same wav.
    Raises SynthesisError for empty/unspeakable/too-long text and unusable prompts.
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    ids = self.encode_text(text)
    t1 = time.perf_counter()
    timings["text"] = t1 - t0
    prompt = self._load_prompt(prompt_wav, prompt_text) if prompt_wav is not None else None
    t2 = time.perf_counter()
    timings["prompt"] = t2 - t1
    k_llm, k_fm = jax.random.split(jax.random.key(self.seed if seed is None else int(seed)))
    tokens = self.generate_tokens(ids, prompt, k_llm)
    t3 = time.perf_counter()
    timings["llm"] = t3 - t2
    mel = self.decode_tokens(tokens, k_fm, prompt)
    t4 = time.perf_counter()
    timings["fm"] = t4 - t3
    wav = np.asarray(self.vocoder(mel), np.float32)
    t5 = time.perf_counter()
    timings["vocoder"] = t5 - t4
    timings["total"] = t5 - t0
    seconds = wav.shape[0] / self.sample_rate
    return Result(wav=wav, sample_rate=self.sample_rate, mel=mel, tokens=tokens,
                  rtf=timings["total"] / max(seconds, 1e-9), timings=timings)

  def synthesize_item(self, item) -> tuple[np.ndarray, int, dict]:
    """The evaluation harness's callback: an `EvalItem` -> (wav [samples], sample_rate, extra scalars)."""
    r = self.synthesize(item.target_text, prompt_wav=item.prompt_wav, prompt_text=item.prompt_text)
    extra = {"tokens": int(r.tokens.shape[0]), "model_rtf": r.rtf,
             **{f"{k}_s": round(v, 4) for k, v in r.timings.items()}}
    return r.wav, r.sample_rate, extra

  def synthesize_batch(self, texts: Sequence[str], prompt_wavs: Optional[Sequence[Optional[PromptAudio]]] = None,
                       prompt_texts: Optional[Sequence[Optional[str]]] = None,
                       seeds: Optional[Sequence[Optional[int]]] = None, progress: bool = False,
                       raise_errors: bool = False) -> list[Union[Result, Exception]]:
    """Synthesises several requests one after another, reusing compiled code; returns one entry per text:
    its Result, or (unless raise_errors) the exception that request raised, so one bad request does not end
    the batch. Per-request lists (prompt_wavs, prompt_texts, seeds) are optional and default to None."""
    n = len(texts)
    prompt_wavs = list(prompt_wavs) if prompt_wavs is not None else [None] * n
    prompt_texts = list(prompt_texts) if prompt_texts is not None else [None] * n
    seeds = list(seeds) if seeds is not None else [None] * n
    if not len(prompt_wavs) == len(prompt_texts) == len(seeds) == n:
      raise ValueError("synthesize_batch: texts, prompt_wavs, prompt_texts and seeds differ in length")
    from tqdm.auto import tqdm
    out: list = []
    for args in tqdm(list(zip(texts, prompt_wavs, prompt_texts, seeds)), desc="synthesize", unit="utt",
                     disable=not progress):
      try:
        out.append(self.synthesize(*args))
      except Exception as e:  # pylint: disable=broad-except  # reported per entry
        if raise_errors:
          raise
        out.append(e)
    return out

  def resynthesize(self, wav: np.ndarray, sample_rate: int, seed: Optional[int] = None) -> Result:
    """Ground-truth audio -> tokenizer -> FM -> vocoder (no LLM): what the tokens + FM + vocoder keep of real
    speech. The FM's speaker condition is the RM embedding of the audio's own tokens, as in training."""
    t0 = time.perf_counter()
    mel = self.mel_of(wav, sample_rate)
    tokens = self.tokenize_mel(mel)
    t1 = time.perf_counter()
    _, k_fm = jax.random.split(jax.random.key(self.seed if seed is None else int(seed)))
    out_mel = self.decode_tokens(tokens, k_fm)
    t2 = time.perf_counter()
    out = np.asarray(self.vocoder(out_mel), np.float32)
    t3 = time.perf_counter()
    timings = {"tokenizer": t1 - t0, "fm": t2 - t1, "vocoder": t3 - t2, "total": t3 - t0}
    return Result(wav=out, sample_rate=self.sample_rate, mel=out_mel, tokens=tokens,
                  rtf=timings["total"] / max(out.shape[0] / self.sample_rate, 1e-9), timings=timings)

  def resynthesize_mel(self, mel: np.ndarray, rng: jax.Array) -> np.ndarray:
    """Ground-truth log-mel [frames, n_mels] -> tokenizer -> FM, no vocoder: [frames', n_mels], frames' the whole
    tokens' frames (the tail past a multiple of the tokenizer's downsampling is dropped)."""
    return self.decode_tokens(self.tokenize_mel(mel), rng)

  def resynthesis_mel_errors(self, mels: Sequence[np.ndarray], seed: Optional[int] = None) -> list[float]:
    """Per utterance, the mean squared error (log-mel units^2) of `resynthesize_mel` against the ground truth: how
    much of the mel the tokens and FM keep. mels: [frames, n_mels] each; utterance i draws from fold_in(seed, i)."""
    rng = jax.random.key(self.seed if seed is None else int(seed))
    errors = []
    for i, mel in enumerate(mels):
      if mel.shape[0] < self.ds:
        raise SynthesisError(f"resynthesis_mel_errors: utterance {i} is shorter than one token")
      out = self.resynthesize_mel(mel, jax.random.fold_in(rng, i))
      errors.append(float(np.mean(np.square(out - np.asarray(mel[:out.shape[0]], np.float32)))))
    return errors

  def warmup(self, prompt: bool = True) -> float:
    """Compiles the LLM loops (with and without a prompt) and a small FM bucket; returns seconds taken."""
    t0 = time.perf_counter()
    rs = np.random.default_rng(0)
    wav = (0.1 * rs.standard_normal(self.sample_rate)).astype(np.float32)
    self.synthesize("hello", seed=0)
    if prompt:
      self.synthesize("hello", prompt_wav=(wav, self.sample_rate), prompt_text="hello", seed=0)
    return time.perf_counter() - t0


def code_usage_perplexity(synth: Synthesizer, token_lists: Iterable[np.ndarray]) -> float:
  """exp(entropy) of the pooled token distribution of several sequences (k for uniform use of k codes)."""
  counts = np.zeros((synth.system.fsq.codebook_size,), np.float64)
  for t in token_lists:
    counts += np.bincount(np.asarray(t, np.int64), minlength=counts.shape[0])[:counts.shape[0]]
  if counts.sum() == 0:
    return float("nan")
  p = counts[counts > 0] / counts.sum()
  return float(math.exp(-np.sum(p * np.log(p))))
