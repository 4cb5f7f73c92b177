"""Synthesis library and e2etts-synthesize CLI on a real `tiny` workdir (the `workdir`, `synth` and `utts`
fixtures of conftest.py: fresh parameters, a cheap Griffin-Lim vocoder; the eval-CLI test runs the default one)."""
import json
import math
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import soundfile as sf

from e2etts_jax import audio, checkpoint, synthesis
from e2etts_jax.models import generation
from e2etts_jax.system import System
from tests.conftest import FAST_VOCODER

TEXT = "The cat sat quietly on the warm mat."


def _length_bounds(synth, text):
  n_text = len(synth.encode_text(text))
  sp = synth.sampling
  lo = math.floor(sp["min_ratio"] * n_text)
  hi = min(math.floor(sp["max_ratio"] * n_text), synth.max_tokens)
  return lo, hi


def test_plausible_length_and_shapes(synth):
  r = synth.synthesize(TEXT, seed=0)
  lo, hi = _length_bounds(synth, TEXT)
  n = r.tokens.shape[0]
  assert lo <= n <= hi, (lo, n, hi)
  frames = n * synth.ds
  assert r.mel.shape == (frames, synth.config.audio.n_mels)
  assert r.wav.shape == (frames * synth.hop,)
  assert r.sample_rate == synth.config.audio.sample_rate
  assert np.all(np.isfinite(r.wav)) and np.abs(r.wav).max() > 0
  assert r.tokens.dtype == np.int32 and r.tokens.min() >= 0 and r.tokens.max() < synth.system.fsq.codebook_size
  assert r.rtf > 0 and set(r.timings) >= {"llm", "fm", "vocoder", "total"}


def test_same_seed_same_wav_other_seed_differs(synth, utts):
  a = synth.synthesize(TEXT, seed=3)
  b = synth.synthesize(TEXT, seed=3)
  c = synth.synthesize(TEXT, seed=4)
  np.testing.assert_array_equal(a.wav, b.wav)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert a.wav.shape != c.wav.shape or not np.array_equal(a.wav, c.wav)
  p = utts[0]
  d = synth.synthesize(TEXT, prompt_wav=p["audio"], prompt_text=p["text"], seed=3)
  e = synth.synthesize(TEXT, prompt_wav=p["audio"], prompt_text=p["text"], seed=3)
  np.testing.assert_array_equal(d.wav, e.wav)


def test_repeated_calls_reuse_compiled_code(synth):
  synth.synthesize("Hello.", seed=0)
  llm_fn = generation._COMPILED[(id(synth.system.llm), synth.max_tokens, True)][1]
  llm_size = llm_fn._cache_size()
  fm_buckets = set()
  fm_before = synth._decode._cache_size()
  for i, text in enumerate(["Hello there, my old friend.", "Hi.", "Hello.", "Good night, sleep well."]):
    r = synth.synthesize(text, seed=10 + i)
    fm_buckets.add(synthesis.bucket(r.tokens.shape[0]))
  # Text of any length reuses the LLM loop; the FM compiles once per token bucket, not per length.
  assert llm_fn._cache_size() == llm_size
  assert synth._decode._cache_size() <= fm_before + len(fm_buckets)


def test_prompt_at_22k_stereo_is_accepted(synth, utts, tmp_path):
  p = utts[1]
  wav16 = audio.load_audio(p["audio"], 16000)
  wav22 = audio.resample(wav16, 16000, 22050)
  stereo = np.stack([wav22, 0.5 * wav22], axis=1)
  path = str(tmp_path / "prompt_22k_stereo.wav")
  sf.write(path, stereo, 22050)
  r = synth.synthesize(TEXT, prompt_wav=path, prompt_text=p["text"], seed=0)
  lo, hi = _length_bounds(synth, TEXT)
  assert lo <= r.tokens.shape[0] <= hi
  # Only the new frames come back: the prompt's frames are not part of the result.
  assert r.mel.shape[0] == r.tokens.shape[0] * synth.ds
  assert r.wav.shape[0] == r.mel.shape[0] * synth.hop
  # The prompt was converted to 16 kHz mono: as many prompt tokens as the original 16 kHz file gives.
  prompt = synth._load_prompt(path, p["text"])
  assert prompt.indices.shape[0] == (len(wav16) // synth.hop) // synth.ds
  # A prompt without a transcript still works (voice only).
  assert synth.synthesize(TEXT, prompt_wav=path, seed=0).wav.size > 0


@pytest.mark.parametrize("text, match", [("", "empty"), ("   \n\t", "empty"), ("?!? ...", "nothing speakable")])
def test_empty_text_is_a_clear_error(synth, text, match):
  with pytest.raises(synthesis.SynthesisError, match=match):
    synth.synthesize(text)


def test_too_long_text_and_prompt_are_clear_errors(synth, tmp_path):
  with pytest.raises(synthesis.SynthesisError, match="max_text_tokens"):
    synth.synthesize("word " * 400)
  long_prompt = str(tmp_path / "long.wav")
  sf.write(long_prompt, np.zeros(16000 * 10, np.float32) + 0.01, 16000)
  with pytest.raises(synthesis.SynthesisError, match="too long"):
    synth.synthesize(TEXT, prompt_wav=long_prompt, prompt_text="hello")
  with pytest.raises(synthesis.SynthesisError, match="not found"):
    synth.synthesize(TEXT, prompt_wav=str(tmp_path / "nope.wav"), prompt_text="hello")


def test_load_errors_name_the_problem(workdir, tmp_path):
  missing = str(tmp_path / "no_such_run")
  with pytest.raises(FileNotFoundError, match="no_such_run"):
    synthesis.Synthesizer.from_workdir(missing)
  # A workdir without checkpoints.
  bare = tmp_path / "bare"
  bare.mkdir()
  for f in ("config.json", "data_info.json", "spm.model"):
    shutil.copy(os.path.join(workdir["run"], f), bare / f)
  with pytest.raises(checkpoint.CheckpointError, match=str(bare / "checkpoints")):
    synthesis.Synthesizer.from_workdir(str(bare))
  # Not a training workdir at all.
  with pytest.raises(checkpoint.CheckpointError, match="config.json"):
    synthesis.Synthesizer.from_workdir(str(tmp_path))
  # A damaged config.json.
  damaged = tmp_path / "damaged"
  shutil.copytree(workdir["run"], damaged)
  (damaged / "config.json").write_text('{"audio": ')
  with pytest.raises(checkpoint.CheckpointError, match="config.json is damaged"):
    synthesis.Synthesizer.from_workdir(str(damaged))
  # A corrupt checkpoint: every array file of the state truncated.
  broken = tmp_path / "broken"
  shutil.copytree(workdir["run"], broken)
  hit = 0
  for dirpath, _, files in os.walk(broken / "checkpoints"):
    for f in files:
      if "state" in os.path.relpath(dirpath, broken / "checkpoints").split(os.sep):
        with open(os.path.join(dirpath, f), "wb") as fh:
          fh.write(b"\0garbage")
        hit += 1
  assert hit
  with pytest.raises(checkpoint.CheckpointError, match="checkpoints"):
    synthesis.Synthesizer.from_workdir(str(broken))


def test_resynthesis_and_speaker_embedding(synth, utts):
  wav = audio.load_audio(utts[0]["audio"], 16000)
  r = synth.resynthesize(wav, 16000)
  tokens = (len(wav) // synth.hop) // synth.ds
  assert r.tokens.shape == (tokens,) and r.wav.shape == (tokens * synth.ds * synth.hop,)
  e = synth.embed_wav(wav, 16000)
  assert e.shape == (synth.config.rm.spk_embed_dim,)
  np.testing.assert_allclose(np.linalg.norm(e), 1.0, atol=1e-4)


def test_resynthesis_mel_errors_are_each_utterances_mse_of_resynthesize_mel(synth, utts):
  mels = [synth.mel_of(audio.load_audio(u["audio"], 16000), 16000) for u in utts[:2]]
  mels[1] = mels[1][:synth.ds * 3 + 1]   # a ragged tail: only whole tokens are resynthesised
  outs = [synth.resynthesize_mel(m, jax.random.fold_in(jax.random.key(5), i)) for i, m in enumerate(mels)]
  assert outs[1].shape == (synth.ds * 3, mels[1].shape[1])
  want = [np.mean(np.square(o - m[:o.shape[0]])) for o, m in zip(outs, mels)]
  np.testing.assert_allclose(synth.resynthesis_mel_errors(mels, seed=5), want, rtol=1e-6)
  with pytest.raises(synthesis.SynthesisError, match="utterance 1 is shorter than one token"):
    synth.resynthesis_mel_errors([mels[0], mels[0][:synth.ds - 1]])


def test_eval_cli_workdir_mode_uses_the_synthesizer(workdir, utts, tmp_path):
  from e2etts_jax.cli import evaluate as evaluate_cli
  lst = tmp_path / "meta.lst"
  # Short targets: the default vocoder is slow on the noise-like mels of untrained parameters.
  lst.write_text("".join(f"u{i}|{utts[i]['text']}|{utts[i]['audio']}|{target}|{utts[i + 1]['audio']}\n"
                         for i, target in enumerate(["Good morning.", "Thank you."])))
  out = tmp_path / "eval"
  rc = evaluate_cli.main(["e2etts-eval", f"--list={lst}", f"--out={out}", f"--workdir={workdir['run']}",
                          "--bootstrap=50", "--mel_plots=0", "--noprogress"])
  results = json.loads((out / "results.json").read_text())
  assert rc == 0
  assert results["summary"]["counts"]["scored"] == 2 and results["summary"]["counts"]["failed"] == 0
  assert sorted(os.listdir(out / "wavs")) == ["u0.wav", "u1.wav"]
  info = sf.info(str(out / "wavs" / "u0.wav"))
  assert info.samplerate == 16000 and info.frames > 0


def test_cli_single_and_batch(workdir, utts, tmp_path):
  from e2etts_jax.cli import synthesize as synth_cli
  out = tmp_path / "one.wav"
  assert synth_cli.main(["e2etts-synthesize", f"--workdir={workdir['run']}", f"--text={TEXT}", f"--out={out}",
                         "--seed=1", f"--vocoder={FAST_VOCODER}"]) == 0
  assert out.exists() and (tmp_path / "one.png").exists()

  lines = tmp_path / "lines.txt"
  lines.write_text("Hello there.\n\n?!?\nThe dog barked twice.\nGood night.\n")
  out_dir = tmp_path / "batch"
  rc = synth_cli.main(["e2etts-synthesize", f"--workdir={workdir['run']}", f"--input={lines}",
                       f"--out_dir={out_dir}", "--noprogress", "--nopng", f"--vocoder={FAST_VOCODER}"])
  assert rc == 1   # one line failed
  assert sorted(f for f in os.listdir(out_dir) if f.endswith(".wav")) == [
      "line_0001.wav", "line_0004.wav", "line_0005.wav"]
  report = [json.loads(l) for l in (out_dir / "synthesis.jsonl").read_text().splitlines()]
  assert [r["status"] for r in report] == ["ok", "failed", "ok", "ok"]
  assert "nothing speakable" in report[1]["error"]

  lst = tmp_path / "meta.lst"
  p = utts[0]
  lst.write_text(f"a|{p['text']}|{p['audio']}|Hello there.\n"
                 "broken line without fields\n"
                 f"b|{p['text']}|{p['audio']}|Good night.|\n")
  out_dir = tmp_path / "batch_lst"
  rc = synth_cli.main(["e2etts-synthesize", f"--workdir={workdir['run']}", f"--input={lst}",
                       f"--out_dir={out_dir}", "--noprogress", "--nopng", f"--vocoder={FAST_VOCODER}"])
  assert rc == 1
  assert sorted(f for f in os.listdir(out_dir) if f.endswith(".wav")) == ["a.wav", "b.wav"]
  report = [json.loads(l) for l in (out_dir / "synthesis.jsonl").read_text().splitlines()]
  assert [r["status"] for r in report] == ["ok", "failed", "ok"]


def test_batch_helper_reports_bad_entries_and_goes_on(synth):
  out = synth.synthesize_batch(["Hello.", "   ", "Good night."], seeds=[0, 0, 1])
  assert isinstance(out[0], synthesis.Result) and isinstance(out[2], synthesis.Result)
  assert isinstance(out[1], synthesis.SynthesisError)
  np.testing.assert_array_equal(out[0].wav, synth.synthesize("Hello.", seed=0).wav)
  with pytest.raises(synthesis.SynthesisError):
    synth.synthesize_batch(["Hello.", ""], raise_errors=True)


def test_prior_mel_is_the_fm_prior_head_denormalised(synth, utts):
  """With the prior head's kernel zeroed, every token's frames are its bias (normalised), so prior_mel must be the
  bias, per frame of each token, mapped back to log-mel and clipped."""
  from e2etts_jax.models import flow_matching
  tokens = synth.tokenize_mel(synth.mel_of(audio.load_audio(utts[0]["audio"], 16000), 16000))
  m = int(synth.config.audio.n_mels)
  bias = np.linspace(-3.0, 1.0, synth.ds * m, dtype=np.float32)
  head = {"kernel": np.zeros_like(synth.params["fm"]["prior_out"]["kernel"]), "bias": bias}
  params = synth.params
  synth.params = {**params, "fm": {**params["fm"], "prior_out": head}}
  try:
    mel = synth.prior_mel(tokens)
  finally:
    synth.params = params
  per_token = np.clip(flow_matching.denormalize_mel(bias.reshape(synth.ds, m)), *synth.mel_range)
  np.testing.assert_allclose(mel, np.tile(per_token, (tokens.shape[0], 1)), rtol=1e-6, atol=1e-6)
  with pytest.raises(synthesis.SynthesisError, match="no speech tokens"):
    synth.prior_mel(np.zeros((0,), np.int32))


def test_prior_decoder_vocodes_the_prior_head_of_prompt_and_new_tokens(synth, utts):
  mel = synth.mel_of(audio.load_audio(utts[0]["audio"], 16000), 16000)
  tokens = synth.tokenize_mel(mel)
  prior = synthesis.Synthesizer(synth.system, synth.params, synth.sp, inference=["fm.decoder=prior"])
  got = prior.decode_tokens(tokens, jax.random.key(0))
  np.testing.assert_array_equal(got, synth.prior_mel(tokens))
  np.testing.assert_array_equal(got, prior.decode_tokens(tokens, jax.random.key(1)))   # no noise
  assert not np.allclose(got, synth.decode_tokens(tokens, jax.random.key(0)))          # not the flow
  # With a prompt: the prior of prompt + new tokens (the prompt is context), from the first new frame on.
  prompt = prior._load_prompt(utts[1]["audio"], utts[1]["text"])
  with_prompt = prior.decode_tokens(tokens, jax.random.key(0), prompt)
  full = synth.prior_mel(np.concatenate([prompt.indices, tokens]))
  np.testing.assert_array_equal(with_prompt, full[prompt.indices.shape[0] * synth.ds:])
  with pytest.raises(ValueError, match="fm.decoder='vocoder'"):
    synthesis.Synthesizer(synth.system, synth.params, synth.sp, inference=["fm.decoder=vocoder"])


def test_inference_settings_change_only_how_the_system_samples(synth, utts, workdir):
  mel = synth.mel_of(audio.load_audio(utts[0]["audio"], 16000), 16000)[: synth.ds * 8]
  key = jax.random.key(3)
  one_step = synthesis.Synthesizer(synth.system, synth.params, synth.sp,
                                   inference=["fm.ode_steps=1", "fm.temperature=0", "fm.start_t=0.4",
                                              "llm.top_k=5"])
  assert (one_step.config.fm.ode_steps, one_step.config.fm.temperature, one_step.config.fm.start_t,
          one_step.sampling["top_k"]) == (1, 0.0, 0.4, 5)
  assert synth.config.fm.ode_steps != 1 and synth.sampling["top_k"] != 5   # the trained config is untouched
  # The same as a system whose config says so: the settings reach the LLM sampler and the FM's ODE solve.
  edited = ml_collections.ConfigDict(synth.config.to_dict())
  edited.fm.update(ode_steps=1, temperature=0.0, start_t=0.4)
  reference = synthesis.Synthesizer(System(edited, synth.system.info), synth.params, synth.sp)
  got = one_step.resynthesize_mel(mel, key)
  np.testing.assert_array_equal(got, reference.resynthesize_mel(mel, key))
  assert not np.allclose(got, synth.resynthesize_mel(mel, key))
  with pytest.raises(ValueError, match="'fm.d_model' is not an inference setting"):
    synthesis.Synthesizer(synth.system, synth.params, synth.sp, inference={"fm.d_model": 8})
  with pytest.raises(ValueError, match="fm.ode_steps.*cannot parse 'many'"):
    synthesis.Synthesizer(synth.system, synth.params, synth.sp, inference=["fm.ode_steps=many"])
  with pytest.raises(ValueError, match="has no value"):
    synthesis.Synthesizer(synth.system, synth.params, synth.sp, inference=["fm.guidance"])
  from absl import app
  from e2etts_jax.cli import synthesize as synth_cli
  with pytest.raises(app.UsageError, match="not an inference setting"):
    synth_cli.main(["e2etts-synthesize", f"--workdir={workdir['run']}", f"--text={TEXT}",
                    "--inference=fm.d_model=8"])
