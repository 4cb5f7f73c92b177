"""Data preparation: a manifest -> ArrayRecord shards of mel, waveform, text ids, CTC labels, speaker and aux labels.

Manifest layouts (auto-detected by `detect_layout`):
  jsonl     one JSON object per line: `id`, `audio` (path relative to the manifest's folder), `text`, and optional
            `speaker`, `rate_class`/`pitch_class` (0-2), `split` (`train`/`test`; `dev`/`valid` count as test);
            other keys (`rate`, `pitch`, `duration`, `sample_rate`) are informational.
  ljspeech  `metadata.csv` with `id|text|normalized` lines and `wavs/{id}.wav`; one speaker ("LJ"); the
            `normalized` column is used when non-empty.
  libritts  a tree `[subset/]speaker/chapter/{id}.wav` with `{id}.normalized.txt`; a subset folder starting with
            `test` or `dev` is the test split, `train...` the train split.
  seedtts   Seed-TTS-Eval `meta.lst`: `utt|prompt_text|prompt_wav|target_text[|gt_wav]`. Where the gt_wav field
            is non-empty the utterance is gt_wav + target_text (the reference recording of the target); otherwise
            prompt_wav + prompt_text (the only recording with its transcript). The speaker is the prompt wav's
            name: every target is spoken by its prompt's speaker.
Items without a split are held out deterministically: the `data.test_fraction` of them with the smallest
SHA-1 of their id (at least one when there are two or more) go to `test`.

Per item: text checks, then (in a process pool) audio loading with `audio.load_audio` (multi-channel and other
sample rates are CONVERTED and counted), trimming to a multiple of hop, `audio.log_mel` of the int16-quantised
waveform (so the stored mel is exactly `log_mel(waveform / 32767)`), then sentencepiece and CTC limits.
Nothing bad aborts the run and nothing is dropped silently: each rejected item is written to `rejects.jsonl`
with one of REJECT_REASONS and a detail, and the per-reason counts are printed at the end.

Output folder:
  {split}-{i:05d}-of-{n:05d}.array_record   records (`records.py`), sorted by id, group_size 1
  {split}-index.json                          per-record ids, lengths and speakers in data-source order (for bucketing)
  spm.model / spm.vocab / spm.json            sentencepiece (trained on the train transcripts unless given)
  speakers.json                               {"num_speakers": n, "speakers": {name: id}}
  info.json                                   what `input_pipeline.dataset_info` returns
  stats.json, length_hist.png, rejects.jsonl
  DONE.json                                   completion marker with the config/manifest hash
  .cache/                                     per-item features while running (resume after a crash); removed
                                              at the end unless keep_cache
A re-run whose hash matches DONE.json does nothing.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import struct
import time
from typing import Any, Iterator

import numpy as np
import soundfile as sf

from e2etts_jax import audio as audio_lib
from e2etts_jax import records
from e2etts_jax import text as text_lib

FORMAT_VERSION = 1
LAYOUTS = ("jsonl", "ljspeech", "libritts", "seedtts")
SPLITS = ("train", "test")
REJECT_REASONS = (
    "bad_manifest_entry",      # a line that does not parse (bad JSON, too few fields, no id/audio)
    "non_utf8_text",           # transcript bytes are not valid UTF-8
    "empty_transcript",        # no transcript at all
    "whitespace_transcript",   # transcript is only whitespace
    "no_speakable_text",       # nothing left after normalisation (e.g. only punctuation)
    "missing_audio",           # audio file does not exist
    "unreadable_audio",        # soundfile cannot decode it
    "truncated_audio",         # WAV header promises more data than the file holds
    "nan_or_inf_samples",
    "silent_audio",            # peak below SILENCE_PEAK_DBFS
    "too_short",               # < data.min_seconds
    "too_long",                # > data.max_seconds or > data.max_frames frames
    "frontend_failed",         # text.frontend could not turn the transcript into the LLM's text (t2p failed)
    "frontend_empty",          # text.frontend gave nothing for it
    "too_many_text_tokens",    # > text.max_text_tokens sentencepiece ids
    "ctc_too_long",            # > text.max_ctc_len CTC labels
    "ctc_infeasible",          # more CTC labels (+ repeats) than CTC frames: transcript too long for the audio
    "processing_error",        # anything unexpected while computing features (detail has the exception)
)
SILENCE_PEAK_DBFS = -60.0
_CACHE_VERSION = 1


@dataclasses.dataclass
class Item:
  """One manifest entry; `reject` is set when it already failed while parsing."""
  id: str
  audio: str
  text: str
  speaker: str = "unknown"
  split: str | None = None
  aux: tuple[int, ...] = (-1, -1)
  reject: str | None = None
  detail: str = ""


# ------------------------------------------------------------------------------------------------ manifests


def detect_layout(manifest: str) -> str:
  """Which of LAYOUTS `manifest` (a file or a folder) is."""
  if os.path.isdir(manifest):
    if os.path.exists(os.path.join(manifest, "metadata.csv")):
      return "ljspeech"
    if os.path.exists(os.path.join(manifest, "meta.lst")):
      return "seedtts"
    if [f for f in os.listdir(manifest) if f.endswith(".jsonl")]:
      return "jsonl"
    for _, _, files in os.walk(manifest):
      if any(f.endswith(".normalized.txt") for f in files):
        return "libritts"
    raise ValueError(f"cannot detect the manifest layout of folder {manifest}: expected metadata.csv, meta.lst, "
                     "a .jsonl file or a LibriTTS tree of *.normalized.txt")
  name = os.path.basename(manifest)
  if name.endswith((".jsonl", ".json")):
    return "jsonl"
  if name.endswith(".csv"):
    return "ljspeech"
  if name.endswith(".lst"):
    return "seedtts"
  with open(manifest, "rb") as f:
    first = f.readline().decode("utf-8", "replace").strip()
  if first.startswith("{"):
    return "jsonl"
  if first.count("|") == 2:
    return "ljspeech"
  if first.count("|") >= 3:
    return "seedtts"
  raise ValueError(f"cannot detect the manifest layout of {manifest}; name it *.jsonl, metadata.csv or meta.lst")


def _lines(path: str) -> Iterator[tuple[int, str | None, str]]:
  """(line number, strictly decoded line or None if not UTF-8, leniently decoded line); blank lines skipped."""
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      raw = raw.rstrip(b"\r\n")
      if not raw.strip():
        continue
      lenient = raw.decode("utf-8", "replace")
      try:
        yield n, raw.decode("utf-8"), lenient
      except UnicodeDecodeError:
        yield n, None, lenient


def _resolve(base: str, path: str) -> str:
  return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def _split_name(value: Any) -> str | None:
  if value is None or value == "":
    return None
  v = str(value).lower()
  return "train" if v == "train" else "test"


def _aux_class(value: Any) -> int:
  try:
    v = int(value)
  except (TypeError, ValueError):
    return -1
  return v if 0 <= v <= 2 else -1


def _read_jsonl(path: str) -> list[Item]:
  base, items = os.path.dirname(os.path.abspath(path)), []
  for n, line, lenient in _lines(path):
    if line is None:
      # The id is usually plain ASCII, so the lenient decode still names the item in rejects.jsonl.
      try:
        rid = str(json.loads(lenient).get("id", f"line{n}"))
      except (json.JSONDecodeError, AttributeError):
        rid = f"line{n}"
      items.append(Item(rid, "", "", reject="non_utf8_text", detail=f"{path}:{n} is not valid UTF-8"))
      continue
    try:
      row = json.loads(line)
      rid, wav = str(row["id"]), str(row["audio"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      items.append(Item(f"line{n}", "", "", reject="bad_manifest_entry", detail=f"{path}:{n}: {e!r}"))
      continue
    aux = (_aux_class(row.get("rate_class")), _aux_class(row.get("pitch_class")))
    items.append(Item(rid, _resolve(base, wav), row.get("text") or "", str(row.get("speaker", "unknown")),
                      _split_name(row.get("split")), aux))
  return items


def _read_ljspeech(path: str) -> list[Item]:
  if os.path.isdir(path):
    path = os.path.join(path, "metadata.csv")
  base, items = os.path.dirname(os.path.abspath(path)), []
  for n, line, lenient in _lines(path):
    fields = (line if line is not None else lenient).split("|")
    rid = fields[0].strip() or f"line{n}"
    wav = os.path.join(base, "wavs", rid + ".wav")
    if line is None:
      items.append(Item(rid, wav, "", "LJ", reject="non_utf8_text", detail=f"{path}:{n} is not valid UTF-8"))
      continue
    if len(fields) < 2:
      items.append(Item(rid, wav, "", "LJ", reject="bad_manifest_entry", detail=f"{path}:{n}: need id|text"))
      continue
    text = fields[2] if len(fields) > 2 and fields[2].strip() else fields[1]
    items.append(Item(rid, wav, text, "LJ"))
  return items


def _read_libritts(root: str) -> list[Item]:
  items = []
  for dirpath, dirnames, files in os.walk(root):
    dirnames.sort()
    for f in sorted(files):
      if not f.endswith(".normalized.txt"):
        continue
      rid = f[:-len(".normalized.txt")]
      txt_path = os.path.join(dirpath, f)
      rel = os.path.relpath(dirpath, root).split(os.sep)
      speaker = rel[-2] if len(rel) >= 2 else "unknown"
      subset = rel[0].lower() if len(rel) >= 3 else ""
      split = "test" if subset.startswith(("test", "dev")) else "train" if subset.startswith("train") else None
      wav = os.path.join(dirpath, rid + ".wav")
      with open(txt_path, "rb") as fh:
        raw = fh.read()
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:
        items.append(Item(rid, wav, "", speaker, split, reject="non_utf8_text",
                          detail=f"{txt_path} is not valid UTF-8"))
        continue
      items.append(Item(rid, wav, text.strip(), speaker, split))
  return items


def _read_seedtts(path: str) -> list[Item]:
  if os.path.isdir(path):
    path = os.path.join(path, "meta.lst")
  base, items = os.path.dirname(os.path.abspath(path)), []
  for n, line, lenient in _lines(path):
    fields = (line if line is not None else lenient).split("|")
    rid = fields[0].strip() or f"line{n}"
    if len(fields) < 4:
      items.append(Item(rid, "", "", reject="bad_manifest_entry",
                        detail=f"{path}:{n}: need utt|prompt_text|prompt_wav|target_text[|gt_wav]"))
      continue
    prompt_text, prompt_wav, target_text = fields[1], fields[2].strip(), fields[3]
    gt_wav = fields[4].strip() if len(fields) > 4 else ""
    speaker = os.path.splitext(os.path.basename(prompt_wav))[0] or "unknown"
    wav, text = (gt_wav, target_text) if gt_wav else (prompt_wav, prompt_text)
    if line is None:
      items.append(Item(rid, _resolve(base, wav), "", speaker, reject="non_utf8_text",
                        detail=f"{path}:{n} is not valid UTF-8"))
      continue
    items.append(Item(rid, _resolve(base, wav), text, speaker))
  return items


_READERS = {"jsonl": _read_jsonl, "ljspeech": _read_ljspeech, "libritts": _read_libritts,
            "seedtts": _read_seedtts}


def read_manifest(manifest: str, layout: str | None = None) -> list[Item]:
  """Parses any of LAYOUTS into Items (entries that fail to parse come back with `reject` set)."""
  layout = layout or detect_layout(manifest)
  if layout not in _READERS:
    raise ValueError(f"unknown manifest layout {layout!r}; choose one of {LAYOUTS}")
  if layout == "jsonl" and os.path.isdir(manifest):
    manifest = os.path.join(manifest, sorted(f for f in os.listdir(manifest) if f.endswith(".jsonl"))[0])
  items = _READERS[layout](manifest)
  seen = collections.Counter(it.id for it in items)
  for it in items:
    # Duplicate ids would make the per-id cache and the split ambiguous: reject all copies loudly.
    if seen[it.id] > 1 and not it.reject:
      it.reject, it.detail = "bad_manifest_entry", f"duplicate id {it.id!r} ({seen[it.id]} entries)"
  return items


def assign_splits(items: list[Item], test_fraction: float) -> None:
  """Deterministic hold-out for items without a split (see module docstring)."""
  free = [it for it in items if it.split is None]
  if not free:
    return
  ranked = sorted(free, key=lambda it: hashlib.sha1(it.id.encode("utf-8")).hexdigest())
  k = int(round(test_fraction * len(ranked)))
  if test_fraction > 0 and len(ranked) >= 2:
    k = max(1, k)
  for i, it in enumerate(ranked):
    it.split = "test" if i < k else "train"


def check_text(raw: str) -> tuple[str | None, str]:
  """(reject reason or None, normalised text)."""
  if raw is None or raw == "":
    return "empty_transcript", ""
  if not raw.strip():
    return "whitespace_transcript", ""
  norm = text_lib.normalize_text(raw)
  if not norm:
    return "no_speakable_text", ""
  return None, norm


# ---------------------------------------------------------------------------------------------- audio work


def wav_truncation(path: str) -> str | None:
  """For RIFF/WAVE files, why the file is shorter than its header says (None if complete or not a WAV).

  libsndfile silently returns the frames that are present for a cut-off WAV, so the truncation has to be
  found by comparing the `data` chunk size with the bytes on disk.
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
      return None
    pos = 12
    while pos + 8 <= size:
      f.seek(pos)
      cid, clen = struct.unpack("<4sI", f.read(8))
      if cid == b"data":
        # 0 and 0xFFFFFFFF mark streamed WAVs whose length was never patched in: nothing to compare.
        if clen in (0, 0xFFFFFFFF):
          return None
        have = size - pos - 8
        return f"data chunk declares {clen} bytes, file has {have}" if have < clen else None
      pos += 8 + clen + (clen & 1)
  return "no data chunk before end of file"


def _audio_task(item_id: str, path: str, cache_path: str, audio_cfg: dict, limits: dict) -> dict:
  """Computes (or reads cached) features for one file. Returns metadata only; arrays stay in `cache_path`.

  Returns {"reject": reason, "detail": str} or {"num_frames", "seconds", "converted": [...], "cached": bool}.
  """
  if os.path.exists(cache_path):
    try:
      with np.load(cache_path) as z:
        meta = json.loads(str(z["meta"]))
      meta["cached"] = True
      return meta
    except Exception:  # a half-written cache from a killed run: recompute
      pass
  try:
    meta = _compute_features(path, cache_path, audio_cfg, limits)
  except Exception as e:  # never abort the run on one item
    meta = {"reject": "processing_error", "detail": f"{type(e).__name__}: {e}"}
  meta["cached"] = False
  if "reject" in meta and meta["reject"] != "processing_error":
    _save_cache(cache_path, meta)
  return meta


def _save_cache(cache_path: str, meta: dict, **arrays: np.ndarray) -> None:
  os.makedirs(os.path.dirname(cache_path), exist_ok=True)
  tmp = cache_path + f".tmp{os.getpid()}.npz"
  np.savez(tmp, meta=json.dumps(meta), **arrays)
  os.replace(tmp, cache_path)


def _compute_features(path: str, cache_path: str, audio_cfg: dict, limits: dict) -> dict:
  cfg = _AudioCfg(**audio_cfg)
  if not os.path.exists(path):
    return {"reject": "missing_audio", "detail": f"no such file: {path}"}
  try:
    info = sf.info(path)
  except Exception as e:
    return {"reject": "unreadable_audio", "detail": f"{type(e).__name__}: {e}"}
  truncated = wav_truncation(path)
  if truncated:
    return {"reject": "truncated_audio", "detail": truncated}
  try:
    wav = audio_lib.load_audio(path, cfg.sample_rate)
  except audio_lib.AudioError as e:
    reason = "nan_or_inf_samples" if "NaN" in str(e) else "unreadable_audio"
    return {"reject": reason, "detail": str(e)}
  converted = []
  if info.channels > 1:
    converted.append("downmixed")
  if info.samplerate != cfg.sample_rate:
    converted.append("resampled")
  hop = cfg.hop_length
  wav = wav[: (wav.shape[0] // hop) * hop]
  seconds = wav.shape[0] / cfg.sample_rate
  peak = float(np.max(np.abs(wav))) if wav.size else 0.0
  if peak < 10 ** (SILENCE_PEAK_DBFS / 20):
    return {"reject": "silent_audio", "detail": f"peak {20 * np.log10(max(peak, 1e-12)):.1f} dBFS"}
  if seconds < limits["min_seconds"]:
    return {"reject": "too_short", "detail": f"{seconds:.3f} s < data.min_seconds={limits['min_seconds']}"}
  frames = wav.shape[0] // hop
  if seconds > limits["max_seconds"] or frames > limits["max_frames"]:
    return {"reject": "too_long", "detail": f"{seconds:.3f} s ({frames} frames) > data.max_seconds="
                                            f"{limits['max_seconds']} / data.max_frames={limits['max_frames']}"}
  # Store the int16 PCM and the mel of exactly that PCM, so log_mel(waveform / 32767) reproduces `mel`.
  pcm = np.round(np.clip(wav, -1.0, 1.0) * 32767.0).astype(np.int16)
  mel = audio_lib.log_mel(pcm.astype(np.float32) / 32767.0, cfg)
  meta = {"num_frames": int(mel.shape[0]), "seconds": seconds, "converted": converted}
  _save_cache(cache_path, meta, mel=mel, waveform=pcm)
  return meta


@dataclasses.dataclass(frozen=True)
class _AudioCfg:
  """A picklable stand-in for the `audio` ConfigDict (attribute access, as `audio.log_mel` expects)."""
  sample_rate: int
  n_fft: int
  win_length: int
  hop_length: int
  n_mels: int
  fmin: float
  fmax: float
  center: bool
  log_floor: float
  griffin_lim_iters: int


def _audio_task_star(args: tuple) -> tuple[int, dict]:
  idx, *rest = args
  return idx, _audio_task(*rest)


# ------------------------------------------------------------------------------------------------ prepare


def _hash(obj: Any) -> str:
  return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _file_sig(path: str) -> list:
  try:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]
  except OSError:
    return [None, None]


def _settings(config) -> dict:
  """The config fields that change the prepared output (anything else can change without re-preparing)."""
  d = config.data
  return {
      "format": FORMAT_VERSION,
      "audio": config.audio.to_dict(),
      "text": config.text.to_dict(),
      "data": {k: d[k] for k in ("min_seconds", "max_seconds", "max_frames", "num_shards", "test_fraction")},
      "downsample": config.tokenizer.downsample,
      "ctc_upsample": config.rm.ctc_upsample,
  }


def _ctc_frames_needed(labels: list[int]) -> int:
  """CTC needs a blank between equal neighbours, so the alignment needs len + repeats frames."""
  return len(labels) + sum(a == b for a, b in zip(labels, labels[1:]))


def _front_end(survivors: list, frontend: str, num_workers: int, reject, progress: bool) -> tuple[list, list[str]]:
  """The LLM's text of each (item, norm, ...) row (`text.llm_text`); rows it fails on are rejected, not fatal."""
  if frontend == "text":
    return survivors, [norm for _, norm, *_ in survivors]
  text_lib.check_frontend(frontend)  # a missing program is the machine's problem: say so once, up front
  from tqdm import tqdm

  def one(row):
    try:
      return text_lib.llm_text(row[0].text, row[1], frontend), ""
    except text_lib.FrontendError as e:
      return None, str(e)

  kept, texts = [], []
  # Threads suffice: each call waits on a t2p process.
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    for row, (t, err) in zip(survivors, tqdm(pool.map(one, survivors), total=len(survivors),
                                              desc=f"front end ({frontend})", disable=not progress)):
      if t is None:
        reject(row[0], "frontend_failed", err)
      elif not t:
        reject(row[0], "frontend_empty", f"text.frontend={frontend!r} gives nothing for {row[0].text[:200]!r}")
      else:
        kept.append(row)
        texts.append(t)
  return kept, texts


def _load_or_train_spm(out_dir: str, spm_model: str | None, texts: list[str], config, log) -> Any:
  dest = os.path.join(out_dir, "spm.model")
  want = {"vocab_size": config.text.vocab_size, "model_type": config.text.model_type}
  if spm_model:
    if os.path.abspath(spm_model) != os.path.abspath(dest):
      shutil.copyfile(spm_model, dest)
    with open(os.path.join(out_dir, "spm.json"), "w") as f:
      json.dump({**want, "source": os.path.abspath(spm_model), "texts_hash": None}, f)
    log(f"sentencepiece: using {spm_model}")
    return text_lib.load_sentencepiece(dest)
  texts_hash = _hash(sorted(texts))
  meta_path = os.path.join(out_dir, "spm.json")
  if os.path.exists(dest):
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    # A model we trained for different settings or other transcripts is stale; one put there by hand
    # (no spm.json) is the user's choice and is kept.
    stale = meta and (any(meta.get(k) != v for k, v in want.items())
                      or meta.get("texts_hash") not in (None, texts_hash))
    if not stale:
      log(f"sentencepiece: loaded existing {dest}")
      return text_lib.load_sentencepiece(dest)
    log("sentencepiece: existing model was trained for other settings/transcripts; retraining")
  if not texts:
    raise ValueError("no usable train transcripts to train sentencepiece on; pass an existing model")
  sp = text_lib.train_sentencepiece(texts, os.path.join(out_dir, "spm"), config.text.vocab_size,
                                    config.text.model_type)
  with open(meta_path, "w") as f:
    json.dump({**want, "source": "trained", "texts_hash": texts_hash}, f)
  log(f"sentencepiece: trained {config.text.model_type} model, vocab {sp.vocab_size()} "
      f"(asked {config.text.vocab_size}) on {len(texts)} train transcripts")
  return sp


def _write_shards(out_dir: str, split: str, rows: list[dict], num_shards: int, cache_dir: str,
                  progress: bool) -> list[str]:
  from array_record.python.array_record_module import ArrayRecordWriter
  from tqdm import tqdm
  n = len(rows)
  num_shards = max(1, min(num_shards, n))
  names = [f"{split}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
  for f in os.listdir(out_dir):  # shards of an earlier run with another shard count
    if f.startswith(f"{split}-") and f.endswith(".array_record") and f not in names:
      os.remove(os.path.join(out_dir, f))
  bounds = np.linspace(0, n, num_shards + 1).round().astype(int)
  bar = tqdm(total=n, desc=f"write {split}", disable=not progress, leave=False)
  for s, name in enumerate(names):
    tmp = os.path.join(out_dir, name + ".tmp")
    # group_size:1 makes every record individually addressable: grain reads records in random order.
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for row in rows[bounds[s]:bounds[s + 1]]:
      with np.load(os.path.join(cache_dir, row.pop("_cache"))) as z:
        row["mel"], row["waveform"] = z["mel"], z["waveform"]
      writer.write(records.encode(row))
      row.pop("mel"), row.pop("waveform")
      bar.update(1)
    writer.close()
    os.replace(tmp, os.path.join(out_dir, name))
  bar.close()
  return names


def _length_hist(path: str, seconds: dict[str, list[float]], config) -> None:
  # Figure, not pyplot: no global backend switch (that would break a notebook's inline plots).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(7, 4), layout='tight')
  ax = fig.subplots()
  hi = float(config.data.max_seconds)
  for split, secs in seconds.items():
    if secs:
      ax.hist(secs, bins=40, range=(0, hi), alpha=0.6, label=f"{split} ({len(secs)})")
  rate = config.audio.sample_rate / config.audio.hop_length
  for b in config.data.bucket_boundaries:
    ax.axvline(b / rate, color="k", lw=0.5, ls="--")
  ax.set_xlabel("seconds (dashed: length buckets)")
  ax.set_ylabel("utterances")
  ax.legend()
  fig.savefig(path, dpi=100)


def prepare(config, manifest: str, out_dir: str, *, num_workers: int | None = None, spm_model: str | None = None,
            layout: str | None = None, force: bool = False, keep_cache: bool = False, progress: bool = True,
            verbose: bool = True) -> dict:
  """Prepares `manifest` into shards in `out_dir` (see the module docstring). Returns the summary dict.

  num_workers: feature processes (default: all cores; <= 1 runs in this process).
  spm_model: an existing sentencepiece model to use instead of training one.
  force: redo everything (the feature cache is still reused unless deleted).
  Summary keys: status ('done' | 'up_to_date'), counts {split: n}, rejected {reason: n}, converted {kind: n},
  computed / cached (feature items computed now / read from the cache), seconds (wall time).
  """
  t0 = time.time()
  log = print if verbose else (lambda *a, **k: None)
  os.makedirs(out_dir, exist_ok=True)
  layout = layout or detect_layout(manifest)
  items = read_manifest(manifest, layout)
  assign_splits(items, config.data.test_fraction)
  settings = _settings(config)
  fingerprint = _hash({
      "settings": settings, "layout": layout, "spm_model": spm_model and _file_sig(spm_model),
      "items": [[it.id, it.audio, it.text, it.speaker, it.split, it.aux, it.reject, _file_sig(it.audio)]
                for it in items]})
  done_path = os.path.join(out_dir, "DONE.json")
  if not force and os.path.exists(done_path):
    done = json.load(open(done_path))
    if done.get("hash") == fingerprint and all(os.path.exists(os.path.join(out_dir, f)) for f in done["files"]):
      log(f"{out_dir} is up to date with {manifest} (DONE.json hash matches); nothing to do")
      return {**done["summary"], "status": "up_to_date", "computed": 0, "cached": 0,
              "seconds": time.time() - t0}
  if os.path.exists(done_path):
    os.remove(done_path)  # the folder is about to change: it is not a finished preparation until rewritten

  rejects: list[dict] = []

  def reject(it: Item, reason: str, detail: str = "") -> None:
    rejects.append({"id": it.id, "audio": it.audio, "split": it.split, "reason": reason, "detail": detail})

  pending = []  # (item, normalised text)
  for it in items:
    if it.reject:
      reject(it, it.reject, it.detail)
      continue
    reason, norm = check_text(it.text)
    if reason:
      reject(it, reason, repr(it.text)[:200])
      continue
    pending.append((it, norm))

  # ---- audio features (parallel, cached per item) ----
  cache_dir = os.path.join(out_dir, ".cache")
  audio_cfg = {k: config.audio[k] for k in (f.name for f in dataclasses.fields(_AudioCfg))}
  limits = {"min_seconds": float(config.data.min_seconds), "max_seconds": float(config.data.max_seconds),
            "max_frames": int(config.data.max_frames)}
  feat_key = _hash({"audio": audio_cfg, "limits": limits, "v": _CACHE_VERSION})[:16]
  tasks = []
  for i, (it, _) in enumerate(pending):
    key = hashlib.sha1(json.dumps([it.audio, _file_sig(it.audio), feat_key]).encode()).hexdigest()
    tasks.append((i, it.id, it.audio, os.path.join(cache_dir, key[:2], key + ".npz"), audio_cfg, limits))
  from tqdm import tqdm
  num_workers = (os.cpu_count() or 1) if num_workers is None else num_workers
  results: list[dict | None] = [None] * len(tasks)
  bar = tqdm(total=len(tasks), desc="features", disable=not progress)
  if num_workers <= 1 or len(tasks) <= 1:
    for t in tasks:
      i, r = _audio_task_star(t)
      results[i] = r
      bar.update(1)
  else:
    # spawn, not fork: the parent may hold JAX/threads, and a forked copy of those can deadlock.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(num_workers, len(tasks))) as pool:
      for i, r in pool.imap_unordered(_audio_task_star, tasks, chunksize=4):
        results[i] = r
        bar.update(1)
  bar.close()

  converted = collections.Counter()
  survivors = []  # (item, norm, meta, cache relpath)
  for (it, norm), meta, t in zip(pending, results, tasks):
    if "reject" in meta:
      reject(it, meta["reject"], meta.get("detail", ""))
      continue
    converted.update(meta["converted"])
    survivors.append((it, norm, meta, os.path.relpath(t[3], cache_dir)))

  # ---- text: the LLM's front end, sentencepiece on the train transcripts, then the token limits ----
  survivors, llm_texts = _front_end(survivors, config.text.frontend, num_workers, reject, progress)
  train_texts = [t for (it, *_), t in zip(survivors, llm_texts) if it.split == "train"]
  sp = _load_or_train_spm(out_dir, spm_model, train_texts, config, log)
  downsample, ctc_up = config.tokenizer.downsample, config.rm.ctc_upsample
  accepted = []
  for (it, norm, meta, cache_rel), llm_text in zip(survivors, llm_texts):
    ids = text_lib.encode_text(llm_text, sp)
    ctc = text_lib.text_to_ctc(norm, config, sp)
    if len(ids) > config.text.max_text_tokens:
      reject(it, "too_many_text_tokens", f"{len(ids)} > text.max_text_tokens={config.text.max_text_tokens}")
    elif len(ctc) > config.text.max_ctc_len:
      reject(it, "ctc_too_long", f"{len(ctc)} > text.max_ctc_len={config.text.max_ctc_len}")
    elif _ctc_frames_needed(ctc) > (meta["num_frames"] // downsample) * ctc_up:
      reject(it, "ctc_infeasible", f"{_ctc_frames_needed(ctc)} CTC frames needed, "
                                   f"{(meta['num_frames'] // downsample) * ctc_up} available")
    else:
      accepted.append((it, norm, meta, cache_rel, ids, ctc))

  # ---- speakers, shards, index ----
  speakers = {name: i for i, name in enumerate(sorted({a[0].speaker for a in accepted}))}
  files = ["spm.model", "speakers.json", "info.json", "stats.json", "rejects.jsonl", "length_hist.png"]
  split_info, stats_splits, seconds_by_split = {}, {}, {}
  for split in SPLITS:
    rows = sorted((a for a in accepted if a[0].split == split), key=lambda a: a[0].id)
    recs = [{"id": it.id, "text": norm, "speaker": speakers[it.speaker], "num_frames": meta["num_frames"],
             "text_ids": ids, "ctc_ids": ctc, "aux": list(it.aux), "_cache": cache_rel}
            for it, norm, meta, cache_rel, ids, ctc in rows]
    for f in os.listdir(out_dir):  # an empty split must not leave shards of an earlier run behind
      if not recs and f.startswith(f"{split}-") and f.endswith(".array_record"):
        os.remove(os.path.join(out_dir, f))
    shard_names = _write_shards(out_dir, split, recs, config.data.num_shards, cache_dir, progress) if recs else []
    index = {"ids": [r[0].id for r in rows], "num_frames": [r[2]["num_frames"] for r in rows],
             "num_text_tokens": [len(r[4]) for r in rows], "num_ctc": [len(r[5]) for r in rows],
             "speakers": [speakers[r[0].speaker] for r in rows]}
    with open(os.path.join(out_dir, f"{split}-index.json"), "w") as f:
      json.dump(index, f)
    files += shard_names + [f"{split}-index.json"]
    secs = [r[2]["seconds"] for r in rows]
    seconds_by_split[split] = secs
    per_spk = collections.Counter(r[0].speaker for r in rows)
    stats_splits[split] = {
        "utterances": len(rows), "hours": sum(secs) / 3600.0,
        "min_seconds": min(secs) if secs else 0.0, "max_seconds": max(secs) if secs else 0.0,
        "mean_seconds": float(np.mean(secs)) if secs else 0.0,
        "speakers": dict(sorted(per_spk.items())),
    }
    split_info[split] = {"num_records": len(rows), "shards": shard_names, "hours": sum(secs) / 3600.0}

  with open(os.path.join(out_dir, "speakers.json"), "w") as f:
    json.dump({"num_speakers": len(speakers), "speakers": speakers}, f, indent=1)
  with open(os.path.join(out_dir, "rejects.jsonl"), "w") as f:
    for r in rejects:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  reject_counts = dict(sorted(collections.Counter(r["reason"] for r in rejects).items()))
  summary = {
      "status": "done", "layout": layout, "manifest": os.path.abspath(manifest), "input_items": len(items),
      "counts": {s: split_info[s]["num_records"] for s in SPLITS}, "rejected": reject_counts,
      "converted": dict(sorted(converted.items())),
  }
  stats = {**summary, "splits": stats_splits, "hours": sum(s["hours"] for s in stats_splits.values())}
  stats.pop("status")
  with open(os.path.join(out_dir, "stats.json"), "w") as f:
    json.dump(stats, f, indent=1)
  info = {
      "format_version": FORMAT_VERSION, "hash": fingerprint,
      "audio": settings["audio"], "ctc_units": config.text.ctc_units,
      "text_vocab_size": int(sp.vocab_size()), "ctc_vocab_size": text_lib.ctc_vocab_size(config, sp),
      "num_speakers": len(speakers), "speakers": sorted(speakers, key=speakers.get),
      "aux_names": list(records.AUX_NAMES), "splits": split_info,
      "max_text_tokens": config.text.max_text_tokens, "max_ctc_len": config.text.max_ctc_len,
      "max_frames": config.data.max_frames,
  }
  with open(os.path.join(out_dir, "info.json"), "w") as f:
    json.dump(info, f, indent=1)
  _length_hist(os.path.join(out_dir, "length_hist.png"), seconds_by_split, config)

  if not keep_cache:
    shutil.rmtree(cache_dir, ignore_errors=True)
  computed = sum(1 for r in results if not r.get("cached"))
  with open(done_path, "w") as f:  # written last: its presence means every file above is complete
    json.dump({"hash": fingerprint, "files": files, "summary": summary, "time": time.time()}, f, indent=1)

  summary = {**summary, "computed": computed, "cached": len(results) - computed, "seconds": time.time() - t0}
  log(f"prepared {manifest} ({layout}) -> {out_dir} in {summary['seconds']:.1f} s: "
      + ", ".join(f"{s} {split_info[s]['num_records']} utts / {split_info[s]['hours']:.3f} h" for s in SPLITS))
  log(f"features: {computed} computed, {len(results) - computed} from cache; converted: "
      + (", ".join(f"{k} {v}" for k, v in summary["converted"].items()) or "none"))
  log(f"rejected {len(rejects)} of {len(items)}" + (" (see rejects.jsonl):" if rejects else ""))
  for reason, n in reject_counts.items():
    log(f"  {reason:24s} {n}")
  return summary
