"""Evaluation item lists: Seed-TTS-Eval `meta.lst` files and our JSONL manifests.

A Seed-TTS-Eval list has one item per line, `utt|prompt_text|prompt_wav|target_text[|gt_wav]`, with wav paths
relative to the list file's folder; the system writes `<out>/<utt>.wav`. For our own corpora we build the same
items from a JSONL manifest: each test utterance is the target and another utterance of the SAME speaker is the
prompt (train-split utterances first, so the prompt audio was never a test target), chosen reproducibly.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import random
from typing import Iterable, NamedTuple, Sequence

MANIFEST_SUFFIXES = (".jsonl", ".json")


class EvalItem(NamedTuple):
  """One zero-shot test: say `target_text` in the voice of `prompt_wav` (whose transcript is `prompt_text`).

  Paths are absolute (resolved when the list is read); `gt_wav` is the real recording of `target_text`, or
  None when the list has none.
  """
  utt: str
  prompt_text: str
  prompt_wav: str
  target_text: str
  gt_wav: str | None = None


class MetalistError(ValueError):
  """A malformed list or manifest; the message names the file and line."""


def _resolve(path: str, folder: str) -> str:
  return os.path.normpath(os.path.join(folder, os.path.expanduser(path)))


def read_metalist(path: str) -> list[EvalItem]:
  """Parses a Seed-TTS-Eval list (4 or 5 `|`-separated fields a line; blank lines skipped)."""
  folder = os.path.dirname(os.path.abspath(path))
  items, seen = [], {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      fields = line.split("|")
      if len(fields) not in (4, 5):
        raise MetalistError(f"{path}:{lineno}: expected 4 or 5 '|'-separated fields "
                            f"(utt|prompt_text|prompt_wav|target_text[|gt_wav]), got {len(fields)}: {line!r}")
      utt, prompt_text, prompt_wav, target_text = (x.strip() for x in fields[:4])
      gt_wav = fields[4].strip() if len(fields) == 5 else ""
      for name, value in (("utt", utt), ("prompt_wav", prompt_wav), ("target_text", target_text)):
        if not value:
          raise MetalistError(f"{path}:{lineno}: empty {name} field: {line!r}")
      if utt in seen:
        raise MetalistError(f"{path}:{lineno}: utterance id {utt!r} already used on line {seen[utt]}")
      seen[utt] = lineno
      items.append(EvalItem(utt, prompt_text, _resolve(prompt_wav, folder), target_text,
                            _resolve(gt_wav, folder) if gt_wav else None))
  return items


def _read_manifest_rows(path: str) -> list[dict]:
  folder = os.path.dirname(os.path.abspath(path))
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise MetalistError(f"{path}:{lineno}: not valid JSON: {e}") from e
      if not isinstance(row, dict):
        raise MetalistError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
      missing = [k for k in ("id", "audio", "text", "speaker") if k not in row]
      if missing:
        raise MetalistError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
      row = dict(row)
      row["id"] = str(row["id"])
      row["speaker"] = str(row["speaker"])
      row["audio"] = _resolve(str(row["audio"]), folder)
      row.setdefault("split", "train")
      row["_line"] = lineno
      rows.append(row)
  return rows


def items_from_manifest(path: str, *, split: str = "test", seed: int = 0,
                        max_prompt_seconds: float | None = None) -> list[EvalItem]:
  """Builds zero-shot items from a JSONL manifest (`id`, `audio`, `text`, `speaker`, `split`, ...).

  Every utterance of `split` becomes a target (in file order); its prompt is another utterance of the same
  speaker: a train-split one when the speaker has any, else any other utterance of that speaker. The choice is
  a function of (seed, target id) alone, so adding or removing other items does not change it. Targets whose
  speaker has no other utterance are skipped with a warning.

  max_prompt_seconds: prompts only from utterances at most this long (by the manifest's `duration`; rows without
  one stay eligible), e.g. a model's data.max_seconds; targets keep any length.
  """
  rows = _read_manifest_rows(path)
  seen: dict[str, int] = {}
  for r in rows:
    if r["id"] in seen:
      raise MetalistError(f"{path}:{r['_line']}: utterance id {r['id']!r} already used on line {seen[r['id']]}")
    seen[r["id"]] = r["_line"]
  by_speaker: dict[str, list[dict]] = collections.defaultdict(list)
  for r in rows:
    by_speaker[r["speaker"]].append(r)
  items, skipped = [], []
  for r in rows:
    if r["split"] != split:
      continue
    others = [o for o in by_speaker[r["speaker"]] if o["id"] != r["id"] and o["audio"] != r["audio"]
              and (max_prompt_seconds is None or float(o.get("duration", 0.0)) <= max_prompt_seconds)]
    preferred = [o for o in others if o["split"] == "train"]
    pool = sorted(preferred or others, key=lambda o: o["id"])
    if not pool:
      skipped.append(r["id"])
      continue
    # random.Random seeds a str through SHA-512, so the pick is stable across processes and Python versions.
    prompt = pool[random.Random(f"{seed}:{r['id']}").randrange(len(pool))]
    items.append(EvalItem(r["id"], str(prompt["text"]), prompt["audio"], str(r["text"]), r["audio"]))
  if skipped:
    limit = "" if max_prompt_seconds is None else f" of at most {max_prompt_seconds:g} s"
    logging.warning("%d %s utterance(s) skipped: their speaker has no other utterance%s to prompt with: %s",
                    len(skipped), split, limit, ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
  if not items:
    raise MetalistError(f"{path}: no usable {split!r} utterances (need a split={split!r} row whose speaker has "
                        "another utterance)")
  return items


def is_manifest(path: str) -> bool:
  return path.lower().endswith(MANIFEST_SUFFIXES)


def load_items(path: str, *, split: str = "test", seed: int = 0, limit: int | None = None) -> list[EvalItem]:
  """Reads a meta.lst or (by its .jsonl/.json suffix) a manifest; keeps the first `limit` items if given."""
  items = items_from_manifest(path, split=split, seed=seed) if is_manifest(path) else read_metalist(path)
  return items[:limit] if limit else items


def _check_field(value: str, what: str, utt: str) -> str:
  if "|" in value or "\n" in value or "\r" in value:
    raise MetalistError(f"item {utt!r}: {what} contains '|' or a line break, which the list format cannot hold")
  return value


def write_metalist(items: Iterable[EvalItem | Sequence], path: str, *, absolute: bool = False) -> None:
  """Writes items as a Seed-TTS-Eval list; paths relative to the list's folder unless `absolute`."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)

  def rel(p: str) -> str:
    return os.path.abspath(p) if absolute else os.path.relpath(os.path.abspath(p), folder)

  lines = []
  for it in items:
    it = EvalItem(*it)
    fields = [it.utt, it.prompt_text, rel(it.prompt_wav), it.target_text]
    if it.gt_wav:
      fields.append(rel(it.gt_wav))
    names = ("utt", "prompt_text", "prompt_wav", "target_text", "gt_wav")
    lines.append("|".join(_check_field(v, n, it.utt) for v, n in zip(fields, names)))
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))
