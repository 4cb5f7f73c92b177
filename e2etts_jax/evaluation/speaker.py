"""Speaker encoders for SIM: `embed(wav, sample_rate) -> [E]`, scored by cosine similarity.

Seed-TTS-Eval's SIM is the cosine between WavLM-large + ECAPA-TDNN embeddings (UniSpeech's speaker-verification
fine-tune) of the generated wav and the prompt wav, at 16 kHz. Backends:
  - 'wavlm_ecapa': that model, loaded from local files (see `WavLMECAPAEncoder`); needs torch.
  - 'resemblyzer': the GE2E d-vector of the `resemblyzer` package (weights ship inside it); needs torch.
  - 'internal': any callable, e.g. the reward model's speaker head during training.
  - 'mfcc': MFCC statistics, no learned model at all: a smoke-test backend whose values only rank voices
    coarsely and must never be reported as SIM.
Scores from different backends are on different scales and are not comparable.
"""
from __future__ import annotations

import abc
import os
import sys
from typing import Callable

import numpy as np

from e2etts_jax import audio


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
  """Cosine of two [E] embeddings, in [-1, 1]; 0 when either is all zeros."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  if a.shape != b.shape:
    raise ValueError(f"embeddings differ in size: {a.shape} vs {b.shape}")
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  if na == 0.0 or nb == 0.0:
    return 0.0
  # Clipped: rounding can put identical embeddings a hair above 1.
  return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


class SpeakerEncoder(abc.ABC):
  """A speaker encoder; subclasses implement `_embed` on mono float32 audio at `self.sample_rate`."""

  name: str = "speaker"
  sample_rate: int = 16000

  def embed(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """[samples] (or [samples, channels]) waveform at `sample_rate` -> [E] float32 embedding."""
    wav = np.asarray(wav, np.float32)
    if wav.ndim == 2:
      wav = wav.mean(axis=1)
    if wav.ndim != 1 or wav.size == 0:
      raise ValueError(f"expected a non-empty [samples] waveform, got shape {wav.shape}")
    emb = np.asarray(self._embed(audio.resample(wav, int(sample_rate), self.sample_rate)), np.float32)
    return emb.reshape(-1)

  def similarity(self, wav_a: np.ndarray, sr_a: int, wav_b: np.ndarray, sr_b: int) -> float:
    return cosine_similarity(self.embed(wav_a, sr_a), self.embed(wav_b, sr_b))

  @abc.abstractmethod
  def _embed(self, wav: np.ndarray) -> np.ndarray:
    ...


class CallableEncoder(SpeakerEncoder):
  """Wraps `fn(wav [samples] float32 at sample_rate) -> [E]`, e.g. the reward model's speaker embedding."""

  def __init__(self, fn: Callable[[np.ndarray], np.ndarray], sample_rate: int = 16000, name: str = "internal"):
    if not callable(fn):
      raise TypeError(f"the internal speaker encoder needs a callable, got {type(fn).__name__}")
    self._fn, self.sample_rate, self.name = fn, int(sample_rate), name

  def _embed(self, wav: np.ndarray) -> np.ndarray:
    return np.asarray(self._fn(wav))


class MFCCStatsEncoder(SpeakerEncoder):
  """Mean and std of MFCC 1..n over the louder frames: a model-free baseline for plumbing checks only."""

  name = "mfcc"

  def __init__(self, n_mfcc: int = 20):
    self.n_mfcc = n_mfcc

  def _embed(self, wav: np.ndarray) -> np.ndarray:
    import librosa  # pylint: disable=import-outside-toplevel
    mfcc = librosa.feature.mfcc(y=wav, sr=self.sample_rate, n_mfcc=self.n_mfcc + 1, n_fft=512, hop_length=160)
    # Silence frames carry no voice information and would pull every utterance towards the same point.
    energy = mfcc[0]
    keep = energy >= np.percentile(energy, 30) if energy.size > 3 else np.ones_like(energy, bool)
    feats = mfcc[1:, keep]
    return np.concatenate([feats.mean(axis=1), feats.std(axis=1)])


class ResemblyzerEncoder(SpeakerEncoder):
  """GE2E d-vectors (256-d) from the `resemblyzer` package, whose weights ship inside the package."""

  name = "resemblyzer"

  def __init__(self, device: str = "cpu"):
    try:
      import resemblyzer  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("the 'resemblyzer' speaker encoder needs `pip install resemblyzer` (pulls torch); "
                        "use --speaker none to skip SIM") from e
    self._resemblyzer = resemblyzer
    self._encoder = resemblyzer.VoiceEncoder(device=device, verbose=False)

  def _embed(self, wav: np.ndarray) -> np.ndarray:
    # preprocess_wav normalises loudness and trims long silences, as the encoder was trained with.
    wav = self._resemblyzer.preprocess_wav(wav, source_sr=self.sample_rate)
    if wav.size == 0:
      raise ValueError("no speech left after resemblyzer's silence trimming")
    return self._encoder.embed_utterance(wav)


class WavLMECAPAEncoder(SpeakerEncoder):
  """Seed-TTS-Eval's SIM model: UniSpeech's ECAPA-TDNN on WavLM-large features, from local files only.

  This needs what Seed-TTS-Eval's own scripts need, none of which we vendor or download:
    - `torch` (and `s3prl`, which UniSpeech's model code imports);
    - `checkpoint_path`: the speaker-verification fine-tune `wavlm_large_finetune.pth`;
    - `unispeech_dir`: UniSpeech's `downstreams/speaker_verification` folder (it holds `models/ecapa_tdnn.py`);
    - `wavlm_path`: a local WavLM-Large checkpoint (`WavLM-Large.pt`) handed to UniSpeech's model as its
      `config_path`, so the feature extractor is built from disk instead of through torch.hub.
  Embeddings: 256-d, from 16 kHz audio, with the model in eval mode (as `verification.py` does).
  """

  name = "wavlm_ecapa"

  def __init__(self, checkpoint_path: str, unispeech_dir: str, wavlm_path: str, device: str = "cpu"):
    for what, path in (("checkpoint_path (wavlm_large_finetune.pth)", checkpoint_path),
                       ("wavlm_path (WavLM-Large.pt)", wavlm_path)):
      if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"WavLM-ECAPA speaker encoder: {what} not found: {path!r}")
    module_file = os.path.join(unispeech_dir or "", "models", "ecapa_tdnn.py")
    if not os.path.isfile(module_file):
      raise FileNotFoundError(f"WavLM-ECAPA speaker encoder: {module_file!r} not found; unispeech_dir must be "
                              "UniSpeech's downstreams/speaker_verification folder")
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("the 'wavlm_ecapa' speaker encoder needs `pip install torch torchaudio s3prl`") from e
    if unispeech_dir not in sys.path:
      sys.path.insert(0, unispeech_dir)
    from models.ecapa_tdnn import ECAPA_TDNN_SMALL  # pylint: disable=import-outside-toplevel,import-error
    self._torch, self._device = torch, device
    model = ECAPA_TDNN_SMALL(feat_dim=1024, feat_type="wavlm_large", config_path=wavlm_path)
    state = torch.load(checkpoint_path, map_location="cpu")
    # strict=False as in Seed-TTS-Eval: the fine-tune holds no copy of some frozen feature-extractor buffers.
    model.load_state_dict(state["model"], strict=False)
    self._model = model.to(device).eval()

  def _embed(self, wav: np.ndarray) -> np.ndarray:
    with self._torch.no_grad():
      x = self._torch.from_numpy(np.ascontiguousarray(wav))[None].to(self._device)
      return self._model(x)[0].float().cpu().numpy()


_REGISTRY: dict[str, Callable[..., SpeakerEncoder]] = {
    "wavlm_ecapa": WavLMECAPAEncoder,
    "resemblyzer": ResemblyzerEncoder,
    "internal": CallableEncoder,
    "mfcc": MFCCStatsEncoder,
}


def register_speaker_encoder(name: str, factory: Callable[..., SpeakerEncoder]) -> None:
  """Makes `make_speaker_encoder(name, **kw)` call `factory(**kw)`."""
  _REGISTRY[name] = factory


def speaker_encoder_names() -> tuple[str, ...]:
  return ("none",) + tuple(_REGISTRY)


def make_speaker_encoder(name: str, **kwargs) -> SpeakerEncoder | None:
  """Builds a registered encoder; 'none' gives None (SIM is skipped).

  'internal' takes fn=callable (and optional sample_rate); 'wavlm_ecapa' takes checkpoint_path, unispeech_dir,
  wavlm_path; 'resemblyzer' takes device.
  """
  if name == "none":
    return None
  if name not in _REGISTRY:
    raise ValueError(f"unknown speaker encoder {name!r}; choose one of {', '.join(speaker_encoder_names())}")
  return _REGISTRY[name](**kwargs)
