"""The one mel -> waveform interface, and a registry of implementations by name.

Everything that turns log-mel into audio (synthesis, evaluation, notebooks) goes through `make_vocoder`, so a
neural vocoder can replace Griffin-Lim by registering a factory under a new name, without touching callers.
Vocoders run on the host (numpy in, numpy out); they are not part of any jitted training step.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import ml_collections
import numpy as np

from e2etts_jax import audio


@runtime_checkable
class Vocoder(Protocol):
  """log-mel [F, n_mels] (as produced by `audio.log_mel`) -> waveform [F * hop] float32 at `sample_rate`."""
  sample_rate: int

  def __call__(self, log_mel: np.ndarray) -> np.ndarray:
    ...


class GriffinLimVocoder:
  """Mel pseudo-inverse + Griffin-Lim phase recovery with the analysis settings of `audio_cfg`.

  Quality is limited (phasey, buzzy), but it needs no training, and it is exactly matched to `audio.log_mel`
  (same filterbank, window, hop and framing), so it measures what the mel itself carries.
  """

  def __init__(self, audio_cfg: ml_collections.ConfigDict, n_iter: int | None = None, seed: int = 0):
    self.audio_cfg = audio_cfg
    self.sample_rate = int(audio_cfg.sample_rate)
    self.hop_length = int(audio_cfg.hop_length)
    self.n_iter = int(n_iter or audio_cfg.griffin_lim_iters)
    self.seed = seed

  def __call__(self, log_mel: np.ndarray) -> np.ndarray:
    log_mel = np.asarray(log_mel, np.float32)
    if log_mel.ndim != 2 or log_mel.shape[1] != self.audio_cfg.n_mels:
      raise ValueError(f"GriffinLimVocoder expects log-mel [frames, {self.audio_cfg.n_mels}], "
                       f"got shape {log_mel.shape}")
    if log_mel.shape[0] == 0:
      return np.zeros((0,), np.float32)
    return audio.mel_to_wav_griffin_lim(log_mel, self.audio_cfg, n_iter=self.n_iter, seed=self.seed)


VocoderFactory = Callable[[ml_collections.ConfigDict], Vocoder]
_REGISTRY: dict[str, VocoderFactory] = {
    "griffin_lim": lambda config: GriffinLimVocoder(config.audio),
}


def register_vocoder(name: str, factory: VocoderFactory) -> None:
  """Adds (or replaces) a vocoder factory: factory(config) -> Vocoder."""
  _REGISTRY[name] = factory


def available_vocoders() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def make_vocoder(config: ml_collections.ConfigDict, name: str = "griffin_lim") -> Vocoder:
  """The vocoder registered as `name`, built for the full `config` (its `audio` section sets the analysis)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown vocoder {name!r}; registered: {', '.join(available_vocoders())}")
  return _REGISTRY[name](config)
