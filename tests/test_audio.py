"""THE mel function against a direct librosa computation, framing, and audio loading conversions."""
import librosa
import numpy as np
import pytest
import soundfile as sf

from e2etts_jax import audio
from tests.conftest import sine_wave


def _librosa_reference(wav, a):
  pad = (a.n_fft - a.hop_length) // 2
  mel = librosa.feature.melspectrogram(y=np.pad(wav, (pad, pad), mode="reflect"), sr=a.sample_rate,
                                       n_fft=a.n_fft, hop_length=a.hop_length, win_length=a.win_length,
                                       window="hann", center=False, power=1.0, n_mels=a.n_mels, fmin=a.fmin,
                                       fmax=a.fmax)
  return np.log(np.maximum(mel, a.log_floor)).T[: len(wav) // a.hop_length]


@pytest.mark.parametrize("size", ["tiny", "small", "paper"])
def test_log_mel_equals_librosa(size):
  from e2etts_jax import config_lib
  a = config_lib.get_config(size).audio
  wav = sine_wave(1.37, a.sample_rate)
  ours, ref = audio.log_mel(wav, a), _librosa_reference(wav, a)
  assert ours.shape == (len(wav) // a.hop_length, a.n_mels) == ref.shape
  assert np.max(np.abs(ours - ref)) < 1e-5


def test_frames_align_with_hop(tiny_config):
  a = tiny_config.audio
  for n in (a.hop_length * 10, a.hop_length * 10 + 1, a.hop_length * 11 - 1):
    assert audio.log_mel(np.zeros(n, np.float32) + 0.1, a).shape[0] == n // a.hop_length


def test_silence_hits_the_floor(tiny_config):
  m = audio.log_mel(np.zeros(16000, np.float32), tiny_config.audio)
  np.testing.assert_allclose(m, np.log(tiny_config.audio.log_floor))
  # The one silence value that padding uses is exactly what log_mel gives a silent frame.
  np.testing.assert_array_equal(m, np.float32(audio.silence(tiny_config.audio)))


def test_load_audio_converts_stereo_and_rate(tmp_path, tiny_config):
  wav = sine_wave(0.5, 22050)
  sf.write(tmp_path / "s.wav", np.stack([wav, wav], 1), 22050)
  out = audio.load_audio(str(tmp_path / "s.wav"), 16000)
  assert out.ndim == 1 and abs(len(out) - 8000) <= 1
  ref = librosa.resample(wav, orig_sr=22050, target_sr=16000, res_type="soxr_hq")
  assert np.max(np.abs(out[: len(ref)] - ref)) < 1e-3   # PCM_16 write quantisation


def test_load_audio_names_the_problem(tmp_path):
  (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00garbage")
  with pytest.raises(audio.AudioError, match="unreadable"):
    audio.load_audio(str(tmp_path / "bad.wav"), 16000)
  sf.write(tmp_path / "nan.wav", np.array([0.0, np.nan, 0.1], np.float32), 16000, subtype="FLOAT")
  with pytest.raises(audio.AudioError, match="NaN"):
    audio.load_audio(str(tmp_path / "nan.wav"), 16000)


def test_spectral_envelope_removes_the_harmonic_ripple_only():
  """A mel that is a smooth envelope (low DCT terms) plus a fast ripple across bins (the harmonics' pattern): the
  envelope keeps the first exactly and drops the second; with every coefficient kept it is the identity."""
  n_mels, frames = 80, 7
  k = np.arange(n_mels)
  rs = np.random.default_rng(0)
  smooth = sum(rs.normal(size=(frames, 1)) * np.cos(np.pi * j * (k + 0.5) / n_mels) for j in range(6))
  ripple = 0.8 * np.cos(np.pi * 40 * (k + 0.5) / n_mels)
  mel = (smooth + ripple - 5.0).astype(np.float32)
  np.testing.assert_allclose(audio.spectral_envelope(mel, 20), smooth - 5.0, atol=1e-4)
  np.testing.assert_allclose(audio.spectral_envelope(mel, n_mels), mel, atol=1e-4)
  np.testing.assert_allclose(mel - audio.spectral_envelope(mel, 20), np.broadcast_to(ripple, mel.shape), atol=1e-4)
  with pytest.raises(ValueError, match="n_coeffs"):
    audio.spectral_envelope(mel, 0)


def test_mel_and_its_inverse_do_not_depend_on_the_blas_thread_count():
  """Data preparation and evaluation may run on any number of cores: the same wav must give the same log-mel and
  the same Griffin-Lim magnitude bit for bit (a float32 BLAS product does not: its summation order follows the
  thread count; nor does LAPACK's SVD behind the pseudo-inverse)."""
  import threadpoolctl
  from e2etts_jax import config_lib
  from tests.conftest import sine_wave
  a = config_lib.get_config("small").audio
  wav = sine_wave(20.0, a.sample_rate, freq=130.0)   # long enough that the products are split across threads
  out = {}
  for threads in (1, 2):
    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
      if threads == 2 and max(i["num_threads"] for i in threadpoolctl.threadpool_info()
                              if i["user_api"] == "blas") < 2:
        pytest.skip("this BLAS runs one thread only")
      audio.mel_inverse.cache_clear()   # the pseudo-inverse too is computed under this thread count
      mel = audio.log_mel(wav, a)
      out[threads] = (mel, audio.mel_to_magnitude(mel, a))
  np.testing.assert_array_equal(out[1][0], out[2][0])
  np.testing.assert_array_equal(out[1][1], out[2][1])
