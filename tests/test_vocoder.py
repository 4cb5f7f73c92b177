"""Vocoder interface: Griffin-Lim round trip through `audio.log_mel`, output length, and the registry."""
import numpy as np
import pytest

from e2etts_jax import audio, config_lib
from e2etts_jax.models import vocoder
from tests.conftest import sine_wave


def _spectral_convergence(ref_log_mel, log_mel):
  """||M_ref - M|| / ||M_ref|| on linear mel magnitudes (Frobenius)."""
  a, b = np.exp(ref_log_mel), np.exp(log_mel)
  return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_griffin_lim_round_trip(size):
  config = config_lib.get_config(size)
  voc = vocoder.make_vocoder(config)
  assert isinstance(voc, vocoder.Vocoder) and voc.sample_rate == config.audio.sample_rate
  wav = sine_wave(1.0, config.audio.sample_rate)
  log_mel = audio.log_mel(wav, config.audio)
  out = voc(log_mel)
  assert out.dtype == np.float32 and out.shape == (log_mel.shape[0] * config.audio.hop_length,)
  again = audio.log_mel(out, config.audio)
  assert again.shape == log_mel.shape
  # Griffin-Lim reaches about 0.1-0.2 here; a tone a fifth higher or white noise of the same power sit above 0.6.
  assert _spectral_convergence(log_mel, again) < 0.3
  other = audio.log_mel(sine_wave(1.0, config.audio.sample_rate, freq=330.0), config.audio)
  assert _spectral_convergence(log_mel, other) > 0.6


@pytest.mark.parametrize("signal", ["tone", "loud_harmonics", "noise"])
def test_mel_inversion_is_librosa_nnls(signal):
  """The vocoder's clipped pseudo-inverse is the non-negative least-squares solution librosa.util.nnls finds
  (its L-BFGS-B starts there and does not move on these mels), at a fraction of the cost."""
  import librosa
  c = config_lib.get_config("small").audio
  rs = np.random.default_rng(0)
  t = np.arange(int(1.5 * c.sample_rate)) / c.sample_rate
  wav = {"tone": sine_wave(1.5, c.sample_rate),
         "loud_harmonics": sum(0.9 / k * np.sin(2 * np.pi * 110 * k * t) for k in range(1, 8)),
         "noise": 0.1 * rs.standard_normal(t.shape)}[signal].astype(np.float32)
  log_mel = audio.log_mel(wav, c)
  mel = np.exp(log_mel).T
  basis = audio.mel_basis(c.sample_rate, c.n_fft, c.n_mels, c.fmin, c.fmax)
  ours = audio.mel_to_magnitude(log_mel, c)
  np.testing.assert_allclose(ours, librosa.util.nnls(basis, mel), rtol=1e-5, atol=1e-6 * mel.max())
  assert ours.min() >= 0.0


def test_griffin_lim_rejects_wrong_mel_shape(tiny_config):
  voc = vocoder.GriffinLimVocoder(tiny_config.audio)
  with pytest.raises(ValueError, match="log-mel"):
    voc(np.zeros((10, tiny_config.audio.n_mels + 1), np.float32))
  assert voc(np.zeros((0, tiny_config.audio.n_mels), np.float32)).shape == (0,)


def test_registry(tiny_config):
  with pytest.raises(ValueError, match="griffin_lim"):
    vocoder.make_vocoder(tiny_config, "hifigan")

  class Silence:
    def __init__(self, config):
      self.sample_rate, self.hop = config.audio.sample_rate, config.audio.hop_length

    def __call__(self, log_mel):
      return np.zeros(log_mel.shape[0] * self.hop, np.float32)

  vocoder.register_vocoder("test_silence", Silence)
  try:
    voc = vocoder.make_vocoder(tiny_config, "test_silence")
    assert isinstance(voc, vocoder.Vocoder) and voc(np.zeros((3, 20))).shape == (3 * 320,)
    assert "test_silence" in vocoder.available_vocoders()
  finally:
    vocoder._REGISTRY.pop("test_silence")
