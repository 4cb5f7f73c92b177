"""Tests of the embedded synthetic-speech corpus: text source, voices, determinism, splits, cache and failures."""
import json
import os
import subprocess
import sys

import librosa
import numpy as np
import pytest
import soundfile as sf

from e2etts_jax import corpus

FLITE = [f"flite_{v}" for v in ("awb", "rms", "slt", "kal16")]
MBROLA_INSTALLED = any(v.family == "mbrola" for v in corpus.available_voices())


def _build(out_dir, n, seed=0, **kw):
  kw.setdefault("workers", 2)
  kw.setdefault("progress", False)
  return corpus.build_corpus(str(out_dir), n, seed=seed, **kw)


def _read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


def _median_f0(path):
  wav, sr = sf.read(path, dtype="float32")
  f0 = librosa.yin(wav, fmin=50, fmax=400, sr=sr)
  energy = librosa.feature.rms(y=wav)[0]
  n = min(len(f0), len(energy))
  return float(np.median(f0[:n][energy[:n] > 0.3 * energy.max()]))  # voiced-ish frames only


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A 40-utterance corpus with a 25% test split: 10 test utterances over the 4 flite voices."""
  out = tmp_path_factory.mktemp("corpus")
  manifest = _build(out, 40, seed=0, test_fraction=0.25)
  return manifest, corpus.read_manifest(manifest)


# ---------------------------------------------------------------------------------------------------- text


def test_sentences_are_many_clean_distinct_english():
  sentences = corpus.load_sentences()
  assert len(sentences) >= 5000
  assert sentences == sorted(sentences)
  assert len({corpus.normalize_text(s) for s in sentences}) == len(sentences)
  assert all(corpus.is_clean_sentence(s) for s in sentences)
  # Real English, not templates: function words are everywhere and the vocabulary is large.
  common = {"the", "a", "is", "to", "of", "and", "i", "you", "it", "in", "that", "be", "not", "are", "what"}
  words = [set(corpus.normalize_text(s).split()) for s in sentences]
  assert np.mean([bool(w & common) for w in words]) > 0.9
  assert len(set().union(*words)) > 10000
  assert "A friend is a present you give yourself." in sentences  # fortunes' `people`, Stevenson


@pytest.mark.parametrize("sentence,ok", [
    ("A friend is a present you give yourself.", True),
    ("If I were you, I'd take the well-known road; it's shorter!", True),
    ("Why not?", False),                                        # too short
    (" ".join(["word"] * 21) + ".", False),                     # too long
    ("There are 10 kinds of people in the world.", False),      # digits
    ("The NASA budget was cut again this year.", False),        # all-caps abbreviation
    ('He said "hello" to the whole room.', False),              # quotes
    ("Rule of friendship: a friend will help.", False),         # colon: headings and dialogue
    ("The Preacher, the Teacher, Were each of them once a kiddie.", False),  # joined verse lines
    ("It was written by J Smith last year.", False),            # initial
    ("She went to the bar for a quick drink.", True),
    ("What the hell is going on here?", False),                 # blocked word
    ("This sentence has no final punctuation", False),
    ("Caf\u00e9 culture is a fine thing to have.", False),       # non-ASCII
])
def test_sentence_filter(sentence, ok):
  assert corpus.is_clean_sentence(sentence) is ok


def test_missing_fortunes_names_the_package(tmp_path):
  with pytest.raises(corpus.CorpusError, match="fortunes"):
    corpus.load_sentences(str(tmp_path))


# -------------------------------------------------------------------------------------------------- voices


def test_flite_voices_available_and_primary():
  names = {v.name: v for v in corpus.available_voices()}
  for name in FLITE:
    assert name in names and names[name].primary
  assert not any(v.primary for v in corpus.KNOWN_VOICES if v.family != "flite")
  default = [v.name for v in corpus.resolve_voices(None)]
  assert default[:4] == FLITE and not any(n.startswith("espeak_") for n in default)


def test_bad_voice_name_is_a_clear_error(tmp_path):
  with pytest.raises(corpus.CorpusError, match="unknown voice 'flite_bogus'.*flite_awb"):
    corpus.resolve_voices(["flite_awb", "flite_bogus"])
  with pytest.raises(corpus.CorpusError, match="unknown voice 'nope'"):
    _build(tmp_path, 4, voices="nope")
  assert not os.path.exists(tmp_path / "manifest.jsonl")


def test_missing_synthesizer_binary_is_named(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
  with pytest.raises(corpus.CorpusError, match="'flite', which is not on PATH"):
    corpus.resolve_voices(["flite_slt"])
  with pytest.raises(corpus.CorpusError, match="'espeak-ng', which is not on PATH"):
    corpus.resolve_voices(["espeak_en-us"])


@pytest.mark.skipif(MBROLA_INSTALLED, reason="checks the behaviour without MBROLA voices")
def test_mbrola_missing_is_skipped_by_groups_and_named_when_asked_for():
  assert not any(v.family == "mbrola" for v in corpus.resolve_voices(["default"]))
  with pytest.raises(corpus.CorpusError, match="mbrola_us1.*mbrola"):
    corpus.resolve_voices(["mbrola_us1"])


@pytest.mark.skipif(not MBROLA_INSTALLED, reason="MBROLA voices (Debian contrib) are not installed")
def test_mbrola_voice_synthesizes(tmp_path):
  voice = next(v for v in corpus.available_voices() if v.family == "mbrola")
  duration = corpus.synthesize("A friend is a present you give yourself.", voice, str(tmp_path / "m.wav"))
  assert 1.0 < duration < 5.0 and sf.info(str(tmp_path / "m.wav")).samplerate == corpus.SAMPLE_RATE


# ------------------------------------------------------------------------------------------- rate and pitch


@pytest.mark.parametrize("name", ["flite_awb", "flite_kal16", "espeak_en-us"])
def test_rate_changes_duration(tmp_path, name):
  voice, = corpus.resolve_voices([name])
  text = "Experience is that marvelous thing that enables you to recognize a mistake when you make it again."
  slow = corpus.synthesize(text, voice, str(tmp_path / "slow.wav"), rate=0.75)
  fast = corpus.synthesize(text, voice, str(tmp_path / "fast.wav"), rate=1.3)
  assert slow / fast > 1.4  # 1.3 / 0.75 = 1.73 nominal; pauses scale a little less
  assert sf.info(str(tmp_path / "slow.wav")).samplerate == corpus.SAMPLE_RATE  # espeak-ng's 22.05 kHz resampled


@pytest.mark.parametrize("name", ["flite_slt", "flite_rms", "espeak_en-gb-x-rp"])
def test_pitch_changes_f0(tmp_path, name):
  # flite_rms ignores flite's F0 features and goes through sox; slt uses f0_shift; espeak-ng uses -p.
  voice, = corpus.resolve_voices([name])
  text = "Television has proved that people will look at anything rather than each other."
  corpus.synthesize(text, voice, str(tmp_path / "low.wav"), pitch=0.82)
  corpus.synthesize(text, voice, str(tmp_path / "high.wav"), pitch=1.22)
  assert _median_f0(str(tmp_path / "high.wav")) / _median_f0(str(tmp_path / "low.wav")) > 1.3


def test_librosa_numba_cache_is_private_to_this_test_worker():
  # The pitch tests run librosa.yin on several workers at once; a shared numba cache races (see conftest).
  from tests.conftest import NUMBA_CACHE_ROOT, sine_wave
  mine = os.path.realpath(os.path.join(NUMBA_CACHE_ROOT, os.environ.get("PYTEST_XDIST_WORKER", "main")))
  librosa.yin(sine_wave(0.5, 16000), fmin=50, fmax=400, sr=16000)
  cached = [f for _, _, files in os.walk(mine) for f in files if "_localmin" in f]
  assert any(f.endswith(".nbi") for f in cached) and any(f.endswith(".nbc") for f in cached), cached


# ------------------------------------------------------------------------------------------------ manifest


def test_manifest_format(built):
  manifest, records = built
  lines = open(manifest, encoding="utf-8").read().splitlines()
  assert len(lines) == 40
  raw = [json.loads(line) for line in lines]
  assert [r["id"] for r in raw] == sorted(r["id"] for r in raw)
  for line, r, rec in zip(lines, raw, records):
    assert set(r) == set(corpus.MANIFEST_KEYS)
    assert line == json.dumps(r, sort_keys=True)
    assert r["audio"] == f"wavs/{r['id']}.wav"
    assert rec["audio"] == os.path.join(os.path.dirname(manifest), "wavs", r["id"] + ".wav")
    info = sf.info(rec["audio"])
    assert info.samplerate == r["sample_rate"] == 16000 and info.channels == 1
    assert r["duration"] == pytest.approx(info.frames / info.samplerate, abs=1e-4)
    assert 0.5 < r["duration"] < 12.0
    lo, hi = corpus.RATE_BANDS[r["rate_class"]]
    assert lo - 0.005 <= r["rate"] <= hi + 0.005
    lo, hi = corpus.PITCH_BANDS[r["pitch_class"]]
    assert lo - 0.01 <= r["pitch"] <= hi + 0.01
    assert r["text"] in corpus.load_sentences()
  # All three classes show up for both labels.
  assert {r["rate_class"] for r in raw} == {0, 1, 2} and {r["pitch_class"] for r in raw} == {0, 1, 2}


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
  a = _build(tmp_path / "a", 12, seed=3, workers=1)
  b = _build(tmp_path / "b", 12, seed=3, workers=2)
  c = _build(tmp_path / "c", 12, seed=4)
  assert _read_bytes(a) == _read_bytes(b)
  for rec in corpus.read_manifest(a):  # the audio too, not only the manifest
    assert _read_bytes(rec["audio"]) == _read_bytes(rec["audio"].replace(str(tmp_path / "a"), str(tmp_path / "b")))
  assert _read_bytes(a) != _read_bytes(c)
  assert {r["text"] for r in corpus.read_manifest(a)} != {r["text"] for r in corpus.read_manifest(c)}


def test_held_out_sentences_and_test_speakers(built):
  _, records = built
  test = [r for r in records if r["split"] == "test"]
  train = [r for r in records if r["split"] == "train"]
  assert len(test) == 10
  assert not {corpus.normalize_text(r["text"]) for r in test} & {corpus.normalize_text(r["text"]) for r in train}
  assert {r["speaker"] for r in test} == set(FLITE)
  for speaker in FLITE:  # evaluation prompts come from the same speaker's other utterances
    assert sum(r["speaker"] == speaker for r in test) >= 2
    assert sum(r["speaker"] == speaker for r in train) >= 2


def test_plan_splits_with_extra_voices_and_reused_sentences():
  voices = corpus.resolve_voices(["default", "espeak"])
  assert any(not v.primary for v in voices)
  sentences = corpus.load_sentences()[:300]  # fewer sentences than utterances: sentences repeat
  plan = corpus.plan_corpus(1000, 7, voices, 0.1, sentences)
  test = [u for u in plan if u.split == "test"]
  train = [u for u in plan if u.split == "train"]
  assert len(test) == 100 and len({u.id for u in plan}) == 1000
  assert all(u.voice.primary for u in test)
  assert not {u.text for u in test} & {u.text for u in train}
  assert {u.voice.name for u in train} == {v.name for v in voices}
  counts = [sum(u.voice.name == v.name for u in train) for v in voices]
  assert max(counts) - min(counts) <= 1


def test_cache_skips_existing_and_redoes_damaged(tmp_path, monkeypatch):
  manifest = _build(tmp_path, 8, seed=5)
  first = _read_bytes(manifest)
  wavs = sorted((tmp_path / "wavs").iterdir())
  mtimes = {p.name: p.stat().st_mtime_ns for p in wavs}

  def no_synthesis(*args, **kwargs):
    raise AssertionError("a cached wav was synthesized again")

  with monkeypatch.context() as m:
    m.setattr(corpus, "_run_engine", no_synthesis)
    assert _read_bytes(_build(tmp_path, 8, seed=5)) == first
  assert {p.name: p.stat().st_mtime_ns for p in sorted((tmp_path / "wavs").iterdir())} == mtimes

  # A missing wav and a truncated one (as a crash mid-write of a non-atomic writer would leave) are redone.
  wavs[0].unlink()
  wavs[1].write_bytes(wavs[1].read_bytes()[:30])
  calls = []
  real = corpus._run_engine
  monkeypatch.setattr(corpus, "_run_engine", lambda *a, **k: (calls.append(a[1]), real(*a, **k)))
  assert _read_bytes(_build(tmp_path, 8, seed=5)) == first
  assert len(calls) == 2
  assert not [p for p in (tmp_path / "wavs").iterdir() if not p.name.endswith(".wav") or p.name.startswith(".")]


def test_one_failure_is_recorded_not_fatal(tmp_path, monkeypatch):
  plan_text = corpus.read_manifest(_build(tmp_path / "probe", 6, seed=9))[2]["text"]
  real = corpus._run_engine

  def flaky(voice, text, rate, pitch, out_path):
    if text == plan_text:
      raise corpus.CorpusError("'flite' exited with status 1: boom")
    real(voice, text, rate, pitch, out_path)

  monkeypatch.setattr(corpus, "_run_engine", flaky)
  manifest = _build(tmp_path / "out", 6, seed=9)
  records = corpus.read_manifest(manifest)
  assert len(records) == 5 and plan_text not in {r["text"] for r in records}
  failures = [json.loads(line) for line in open(tmp_path / "out" / corpus.FAILURES_NAME)]
  assert len(failures) == 1 and failures[0]["text"] == plan_text and "boom" in failures[0]["error"]
  assert not list((tmp_path / "out" / "wavs").glob(".*"))  # no temp files left behind

  monkeypatch.setattr(corpus, "_run_engine", real)
  assert len(corpus.read_manifest(_build(tmp_path / "out", 6, seed=9))) == 6
  assert not os.path.exists(tmp_path / "out" / corpus.FAILURES_NAME)


def test_interrupted_write_leaves_no_finished_looking_wav(tmp_path, monkeypatch):
  real = corpus.audio.save_wav

  def dies_mid_write(path, wav, sample_rate):
    real(path, wav[: len(wav) // 3], sample_rate)  # a readable wav, but only a third of the audio
    raise KeyboardInterrupt

  monkeypatch.setattr(corpus.audio, "save_wav", dies_mid_write)
  with pytest.raises(KeyboardInterrupt):
    _build(tmp_path, 1, seed=2, workers=1, test_fraction=0.0)
  assert not list((tmp_path / "wavs").iterdir())  # neither <id>.wav nor temp files
  monkeypatch.setattr(corpus.audio, "save_wav", real)
  rec, = corpus.read_manifest(_build(tmp_path, 1, seed=2, workers=1, test_fraction=0.0))
  assert rec["duration"] == pytest.approx(sf.info(rec["audio"]).frames / 16000, abs=1e-4) and rec["duration"] > 1.0


def test_two_runs_rewriting_one_manifest_both_succeed(tmp_path, monkeypatch):
  """Runs sharing a corpus folder each rewrite manifest.jsonl. Interleave two writers: the second writes and
  replaces the file between the first one's write and its replace; both must finish, leaving no temp file."""
  path = str(tmp_path / "manifest.jsonl")
  real_replace = os.replace
  calls = []

  def replace(src, dst):
    calls.append(src)
    if len(calls) == 1:   # the first writer's replace: let a second writer run to completion first
      corpus._write_jsonl(path, [{"id": "b"}])
    real_replace(src, dst)

  monkeypatch.setattr(corpus.os, "replace", replace)
  corpus._write_jsonl(path, [{"id": "a"}])
  assert len(calls) == 2 and calls[0] != calls[1]
  assert [json.loads(line) for line in open(path)] == [{"id": "a"}]   # the last replace wins, whole
  assert os.listdir(tmp_path) == ["manifest.jsonl"]


def test_read_manifest_rejects_bad_lines(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"id": "x"}\n')
  with pytest.raises(corpus.CorpusError, match="m.jsonl:1: missing keys"):
    corpus.read_manifest(str(path))


def test_cli(tmp_path):
  cmd = [sys.executable, "-m", "e2etts_jax.cli.corpus", "--out", str(tmp_path), "--num_utterances", "4",
         "--voices", "flite_slt,flite_awb", "--workers", "2"]
  ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
  assert ok.returncode == 0, ok.stderr
  assert json.loads(ok.stdout)["utterances"] == 4
  assert {r["speaker"] for r in corpus.read_manifest(str(tmp_path / "manifest.jsonl"))} <= {"flite_slt", "flite_awb"}
  bad = subprocess.run(cmd[:-4] + ["--voices", "flite_nobody"], capture_output=True, text=True, timeout=60)
  assert bad.returncode == 1 and "unknown voice 'flite_nobody'" in bad.stderr
