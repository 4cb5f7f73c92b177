"""Data preparation: rejects with reasons, conversions, idempotence, stats, and the four manifest layouts."""
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import sine_wave
from e2etts_jax import audio, config_lib, prepare, records, text
from array_record.python.array_record_module import ArrayRecordReader

SR = 16000
HOP = 320
GOOD = {  # id: (seconds, text, speaker, split)
    "good0": (0.8, "Hello there.", "alice", "train"),
    "good1": (1.0, "Good morning, Bob!", "bob", "train"),
    "good2": (1.3, "It is 5 o'clock.", "alice", "train"),
    "good3": (0.9, "See you soon.", "bob", "train"),
    "good4": (1.6, "The cat sat on a mat.", "carol", "train"),
    "good5": (1.1, "Nice to meet you.", "carol", "test"),
    "good6": (0.7, "Thank you.", "alice", "test"),
}
# Bad inputs: id -> expected reject reason.
BAD = {
    "bad_unreadable": "unreadable_audio",
    "bad_truncated": "truncated_audio",
    "bad_empty": "empty_transcript",
    "bad_space": "whitespace_transcript",
    "bad_utf8": "non_utf8_text",
    "bad_nan": "nan_or_inf_samples",
    "bad_silent": "silent_audio",
    "bad_short": "too_short",
    "bad_long": "too_long",
}
CONVERTED = {"conv_stereo": (1.0, 50), "conv_22k": (1.2, 60)}  # id -> (seconds, expected mel frames)


def _wav(path, seconds, sr=SR, seed=0, channels=1, subtype="PCM_16", freq=180.0):
  w = sine_wave(seconds, sr, freq=freq, seed=seed)
  if channels > 1:
    w = np.stack([w, 0.5 * w], axis=1)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sf.write(path, w, sr, subtype=subtype)


def _build_jsonl_corpus(root):
  os.makedirs(root / "wavs", exist_ok=True)
  rows = []
  for i, (rid, (sec, txt, spk, split)) in enumerate(GOOD.items()):
    _wav(str(root / "wavs" / f"{rid}.wav"), sec, seed=i, freq=150 + 20 * i)
    rows.append({"id": rid, "audio": f"wavs/{rid}.wav", "text": txt, "speaker": spk, "split": split,
                 "rate_class": i % 3, "pitch_class": 2 if i == 0 else None, "duration": sec, "sample_rate": SR})
  w = lambda rid: str(root / "wavs" / f"{rid}.wav")
  with open(w("bad_unreadable"), "wb") as f:
    f.write(b"this is not audio at all" * 10)
  _wav(w("bad_truncated"), 1.0)
  data = open(w("bad_truncated"), "rb").read()
  open(w("bad_truncated"), "wb").write(data[:len(data) // 2])
  _wav(w("bad_empty"), 1.0)
  _wav(w("bad_space"), 1.0)
  _wav(w("bad_utf8"), 1.0)
  nan = sine_wave(1.0, SR)
  nan[100:110] = np.nan
  sf.write(w("bad_nan"), nan, SR, subtype="FLOAT")
  sf.write(w("bad_silent"), np.zeros(SR, np.float32), SR, subtype="PCM_16")
  _wav(w("bad_short"), 0.2)
  _wav(w("bad_long"), 5.0)
  _wav(w("conv_stereo"), 1.0, channels=2)
  _wav(w("conv_22k"), 1.2, sr=22050)
  texts = {"bad_empty": "", "bad_space": "  \t "}
  for rid in list(BAD) + list(CONVERTED):
    if rid != "bad_utf8":
      rows.append({"id": rid, "audio": f"wavs/{rid}.wav", "text": texts.get(rid, "Short words."),
                   "speaker": "dave", "split": "train"})
  lines = [json.dumps(r).encode() for r in rows]
  lines.insert(3, b'{"id": "bad_utf8", "audio": "wavs/bad_utf8.wav", "text": "caf\xe9 time", "speaker": "dave"}')
  (root / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  return root / "manifest.jsonl"


def _config():
  return config_lib.get_config("tiny")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  manifest = _build_jsonl_corpus(root)
  out = root / "shards"
  summary = prepare.prepare(_config(), str(manifest), str(out), num_workers=1, progress=False, keep_cache=True)
  return {"manifest": manifest, "out": out, "summary": summary}


def _rejects(out):
  return {r["id"]: r for r in map(json.loads, open(out / "rejects.jsonl"))}


def _ids(out, split=None):
  splits = [split] if split else ["train", "test"]
  return {i for s in splits for i in json.load(open(out / f"{s}-index.json"))["ids"]}


def _records(out, split):
  recs = {}
  for name in sorted(os.listdir(out)):
    if name.startswith(split + "-") and name.endswith(".array_record"):
      reader = ArrayRecordReader(str(out / name))
      for blob in reader.read_all():
        r = records.decode(blob)
        recs[r["id"]] = r
      reader.close()
  return recs


@pytest.mark.parametrize("rid", sorted(BAD))
def test_bad_input_is_rejected_with_reason(prepared, rid):
  rejects = _rejects(prepared["out"])
  assert rejects[rid]["reason"] == BAD[rid], rejects[rid]
  assert rejects[rid]["detail"]
  kept = _ids(prepared["out"])
  assert set(GOOD) | set(CONVERTED) <= kept  # every good item survives
  assert not set(BAD) & kept
  assert prepared["summary"]["rejected"][BAD[rid]] == 1


def test_stereo_and_other_rates_are_converted(prepared):
  out = prepared["out"]
  assert prepared["summary"]["converted"] == {"downmixed": 1, "resampled": 1}
  recs = _records(out, "train")
  cfg = _config()
  for rid, (sec, frames) in CONVERTED.items():
    r = recs[rid]
    assert r["num_frames"] == frames and r["mel"].shape == (frames, cfg.audio.n_mels)
    assert r["waveform"].shape == (frames * HOP,) and r["waveform"].dtype == np.int16
  # The stored mel is exactly THE log-mel of the stored PCM.
  r = recs["conv_22k"]
  np.testing.assert_allclose(r["mel"], audio.log_mel(r["waveform"].astype(np.float32) / 32767.0, cfg.audio),
                             atol=1e-5)


def test_record_contents(prepared):
  out = prepared["out"]
  sp = text.load_sentencepiece(str(out / "spm.model"))
  speakers = json.load(open(out / "speakers.json"))
  assert speakers == {"num_speakers": 4, "speakers": {"alice": 0, "bob": 1, "carol": 2, "dave": 3}}
  r = _records(out, "train")["good0"]
  assert r["text"] == "hello there" and sp.decode(r["text_ids"].tolist()) == "hello there"
  assert r["text_ids"].dtype == np.int32 and r["ctc_ids"].dtype == np.int32
  assert text.ctc_to_text(r["ctc_ids"], _config()) == "hello there"
  assert r["speaker"] == 0 and r["aux"].tolist() == [0, 2]
  assert r["num_frames"] == 40 and r["mel"].dtype == np.float32
  assert _records(out, "train")["good1"]["aux"].tolist() == [1, -1]  # pitch_class missing -> -1


def test_stats_and_outputs(prepared):
  out = prepared["out"]
  stats = json.load(open(out / "stats.json"))
  assert stats["counts"] == {"train": 7, "test": 2}
  assert stats["splits"]["train"]["speakers"] == {"alice": 2, "bob": 2, "carol": 1, "dave": 2}
  assert stats["splits"]["test"]["speakers"] == {"alice": 1, "carol": 1}
  train_secs = sum(GOOD[i][0] for i in GOOD if GOOD[i][3] == "train") + 1.0 + 1.2
  assert stats["splits"]["train"]["hours"] == pytest.approx(train_secs / 3600, rel=1e-3)
  assert stats["splits"]["test"]["utterances"] == 2
  assert sum(stats["rejected"].values()) == len(BAD) and stats["input_items"] == len(GOOD) + len(BAD) + 2
  assert (out / "length_hist.png").stat().st_size > 1000
  assert _ids(out, "test") == {"good5", "good6"}
  names = sorted(f for f in os.listdir(out) if f.endswith(".array_record"))
  assert names[0] == "test-00000-of-00002.array_record" and "train-00006-of-00007.array_record" in names


def test_rerun_is_idempotent_and_resumes_from_cache(prepared, tmp_path):
  out = prepared["out"]
  shard = out / "train-00000-of-00007.array_record"
  before = (shard.stat().st_mtime_ns, shard.read_bytes())
  again = prepare.prepare(_config(), str(prepared["manifest"]), str(out), num_workers=1, progress=False)
  assert again["status"] == "up_to_date" and again["counts"] == prepared["summary"]["counts"]
  assert (shard.stat().st_mtime_ns, shard.read_bytes()) == before
  # An interrupted run (no DONE.json) resumes: features come from the per-item cache, output is identical.
  copy = tmp_path / "shards"
  shutil.copytree(out, copy)
  os.remove(copy / "DONE.json")
  os.remove(copy / "train-00000-of-00007.array_record")
  resumed = prepare.prepare(_config(), str(prepared["manifest"]), str(copy), num_workers=1, progress=False)
  assert resumed["status"] == "done" and resumed["computed"] == 0 and resumed["cached"] > 0
  assert (copy / "train-00000-of-00007.array_record").read_bytes() == before[1]
  assert not (copy / ".cache").exists()  # removed after success unless keep_cache


def test_changed_config_reprepares(prepared, tmp_path):
  copy = tmp_path / "shards"
  shutil.copytree(prepared["out"], copy)
  cfg = _config()
  cfg.audio.n_mels = 16
  s = prepare.prepare(cfg, str(prepared["manifest"]), str(copy), num_workers=1, progress=False)
  assert s["status"] == "done" and s["computed"] == len(GOOD) + len(CONVERTED) + 6  # all audio-checked items
  assert _records(copy, "test")["good5"]["mel"].shape[1] == 16


def test_phones_frontend(prepared, tmp_path, monkeypatch):
  """The LLM's text ids are one piece per phone of each raw transcript; the RM's CTC labels stay the normalised text;
  synthesis encodes a sentence to the same ids; a transcript the front end fails on is rejected, the rest kept."""
  from e2etts_jax import synthesis
  cfg = _config()
  cfg.text.update(frontend="phones", model_type="word")
  config_lib.validate(cfg, num_devices=1)
  real = text.to_phones

  def to_phones(raw):
    if raw == "Thank you.":
      raise text.FrontendError("t2p failed on 'Thank you.'")
    return real(raw)

  monkeypatch.setattr(text, "to_phones", to_phones)
  out = tmp_path / "shards"
  s = prepare.prepare(cfg, str(prepared["manifest"]), str(out), num_workers=2, progress=False)
  assert s["rejected"] == {**prepared["summary"]["rejected"], "frontend_failed": 1}
  assert _rejects(out)["good6"]["detail"] == "t2p failed on 'Thank you.'"
  assert _ids(out) == _ids(prepared["out"]) - {"good6"}
  sp = text.load_sentencepiece(str(out / "spm.model"))
  raw = {rid: GOOD[rid][1] for rid in GOOD}
  raw.update({rid: "Short words." for rid in CONVERTED})
  encoder = types.SimpleNamespace(config=cfg, sp=sp, max_text=cfg.text.max_text_tokens)
  before = {**_records(prepared["out"], "train"), **_records(prepared["out"], "test")}
  for split in ("train", "test"):
    for rid, r in _records(out, split).items():
      assert sp.decode(r["text_ids"].tolist()) == real(raw[rid])
      assert len(r["text_ids"]) == len(real(raw[rid]).split())
      assert r["text_ids"].tolist() == synthesis.Synthesizer.encode_text(encoder, raw[rid])
      assert r["ctc_ids"].tolist() == before[rid]["ctc_ids"].tolist()
  assert _records(out, "train")["good0"]["text_ids"].tolist() == text.encode_text("hh ax l ow1 dh eh1 r", sp)


# ------------------------------------------------------------------------------------------------ layouts


def test_layout_ljspeech(tmp_path):
  lines = []
  for i, (rid, (sec, txt, _, _)) in enumerate(GOOD.items()):
    lj = f"LJ001-{i:04d}"
    _wav(str(tmp_path / "wavs" / f"{lj}.wav"), sec, seed=i)
    lines.append(f"{lj}|{txt} raw|{txt}" if i % 2 else f"{lj}|{txt}|")
  (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
  assert prepare.detect_layout(str(tmp_path)) == "ljspeech"
  assert prepare.detect_layout(str(tmp_path / "metadata.csv")) == "ljspeech"
  s = prepare.prepare(_config(), str(tmp_path), str(tmp_path / "out"), num_workers=1, progress=False)
  # No split in LJSpeech: a deterministic hold-out of data.test_fraction (at least one utterance).
  assert s["counts"] == {"train": 6, "test": 1} and not s["rejected"]
  recs = {**_records(tmp_path / "out", "train"), **_records(tmp_path / "out", "test")}
  assert recs["LJ001-0001"]["text"] == "good morning bob"  # the normalized column, not "... raw"
  assert json.load(open(tmp_path / "out" / "speakers.json"))["speakers"] == {"LJ": 0}


def test_layout_libritts(tmp_path):
  spec = [("train-clean-100", "19", "198", 0), ("train-clean-100", "19", "198", 1),
          ("train-clean-100", "26", "495", 2), ("test-clean", "61", "70968", 3)]
  for subset, spk, chap, i in spec:
    rid = f"{spk}_{chap}_{i:06d}_000000"
    d = tmp_path / subset / spk / chap
    _wav(str(d / f"{rid}.wav"), 1.0, seed=i)
    (d / f"{rid}.normalized.txt").write_text(list(GOOD.values())[i][1])
    (d / f"{rid}.original.txt").write_text("ignored")
  assert prepare.detect_layout(str(tmp_path)) == "libritts"
  s = prepare.prepare(_config(), str(tmp_path), str(tmp_path / "out"), num_workers=1, progress=False)
  assert s["counts"] == {"train": 3, "test": 1}
  stats = json.load(open(tmp_path / "out" / "stats.json"))
  assert stats["splits"]["train"]["speakers"] == {"19": 2, "26": 1}
  assert _ids(tmp_path / "out", "test") == {"61_70968_000003_000000"}


def test_layout_seedtts(tmp_path):
  lines = []
  for i in range(5):
    _wav(str(tmp_path / "prompt-wavs" / f"p{i}.wav"), 1.0, seed=i)
    gt = ""
    if i % 2 == 0:
      _wav(str(tmp_path / "wavs" / f"utt{i}.wav"), 1.4, seed=10 + i)
      gt = f"|wavs/utt{i}.wav"
    lines.append(f"utt{i}|Prompt number {i}.|prompt-wavs/p{i}.wav|Target sentence {i}.{gt}")
  (tmp_path / "meta.lst").write_text("\n".join(lines) + "\n")
  assert prepare.detect_layout(str(tmp_path / "meta.lst")) == "seedtts"
  s = prepare.prepare(_config(), str(tmp_path / "meta.lst"), str(tmp_path / "out"), num_workers=1,
                      progress=False)
  assert s["counts"]["train"] + s["counts"]["test"] == 5 and not s["rejected"]
  recs = {**_records(tmp_path / "out", "train"), **_records(tmp_path / "out", "test")}
  # gt_wav + target text where the gt field exists, else the prompt wav + prompt text.
  assert recs["utt0"]["text"] == "target sentence zero" and recs["utt0"]["num_frames"] == 70
  assert recs["utt1"]["text"] == "prompt number one" and recs["utt1"]["num_frames"] == 50
  assert json.load(open(tmp_path / "out" / "speakers.json"))["num_speakers"] == 5


def test_layout_jsonl_detection(prepared):
  assert prepare.detect_layout(str(prepared["manifest"])) == "jsonl"
  assert prepare.detect_layout(str(prepared["manifest"].parent)) == "jsonl"
  items = prepare.read_manifest(str(prepared["manifest"]))
  assert len(items) == len(GOOD) + len(BAD) + len(CONVERTED)
  good0 = next(it for it in items if it.id == "good0")
  assert good0.aux == (0, 2) and good0.speaker == "alice" and os.path.isabs(good0.audio)


def test_cli_with_parallel_workers(tmp_path):
  _build_jsonl_corpus(tmp_path)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "cli_out"
  cmd = [sys.executable, "-m", "e2etts_jax.cli.prepare", "--manifest", str(tmp_path / "manifest.jsonl"),
         "--out", str(out), "--config", os.path.join(repo, "configs", "tiny.py"), "--config.audio.n_mels=16",
         "--workers=2"]
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, timeout=120)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "too_long" in res.stdout and "truncated_audio" in res.stdout  # per-reason counts are printed
  assert json.load(open(out / "stats.json"))["counts"] == {"train": 7, "test": 2}
  assert _records(out, "test")["good6"]["mel"].shape == (35, 16)
