"""e2etts-synthesize: speak text with a trained workdir.

  e2etts-synthesize --workdir runs/quickstart --text "Hello there." --out hello.wav
  e2etts-synthesize --workdir runs/quickstart --text "Hello there." --prompt_wav ref.wav \
      --prompt_text "What the reference says." --out hello.wav --seed 3
  e2etts-synthesize --workdir runs/quickstart --input lines.txt --out_dir out/   # one text per line
  e2etts-synthesize --workdir runs/quickstart --input meta.lst --out_dir out/    # Seed-TTS-Eval list

Single mode writes the wav and a picture of its mel (same name, .png) and prints the real-time factor.
Batch mode (--input): a `.lst` file is a Seed-TTS-Eval list (utt|prompt_text|prompt_wav|target_text[|gt_wav],
paths relative to the list) and each line is spoken with its own prompt into <out_dir>/<utt>.wav; any other file
holds one text per line (blank lines skipped), spoken into <out_dir>/line_<line number>.wav, all with
--prompt_wav/--prompt_text if given. A bad line (malformed, unspeakable, unreadable prompt) is reported and
counted and the rest goes on; <out_dir>/synthesis.jsonl records every line's outcome. Exit status: 0 when every
line was synthesised, 1 otherwise.

The flags live in their own FlagValues, so this module can be imported next to other command-line modules.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

from absl import app, flags
from absl import logging as absl_logging

from e2etts_jax.cli import flag_parsing

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "Training workdir (config.json, spm.model, checkpoints/).", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
flags.DEFINE_string("text", None, "Text to speak (single mode).", flag_values=FLAGS)
flags.DEFINE_string("prompt_wav", None, "Voice prompt audio (any rate, mono or stereo).", flag_values=FLAGS)
flags.DEFINE_string("prompt_text", None, "Transcript of --prompt_wav (without it the prompt only sets the voice "
                    "of the mel decoder, not the LLM's continuation).", flag_values=FLAGS)
flags.DEFINE_string("out", "out.wav", "Output wav (single mode); its .png gets the mel picture.", flag_values=FLAGS)
flags.DEFINE_string("input", None, "Batch mode: a text file (one text per line) or a Seed-TTS-Eval .lst list.",
                    flag_values=FLAGS)
flags.DEFINE_enum("input_format", "auto", ["auto", "text", "metalist"],
                  "How to read --input (auto: .lst is a Seed-TTS-Eval list, anything else text lines).",
                  flag_values=FLAGS)
flags.DEFINE_string("out_dir", None, "Batch mode output folder.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same wav).", flag_values=FLAGS)
flags.DEFINE_string("vocoder", "griffin_lim", "Registered vocoder name.", flag_values=FLAGS)
flags.DEFINE_bool("png", True, "Write a mel picture next to every wav.", flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "Show a progress bar in batch mode.", flag_values=FLAGS)
flag_parsing.define_inference_flag(FLAGS)

REPORT_NAME = "synthesis.jsonl"


def _parse_own(argv: Sequence[str]) -> list[str]:
  return flag_parsing.parse_own(FLAGS, __doc__, argv)


def _read_requests(path: str, fmt: str) -> tuple[list[dict], list[dict]]:
  """(requests, bad lines). A request: {line, name, text, prompt_wav, prompt_text}; a bad line: {line, error}."""
  if fmt == "auto":
    fmt = "metalist" if path.lower().endswith(".lst") else "text"
  folder = os.path.dirname(os.path.abspath(path))
  requests, bad, seen = [], [], {}
  with open(path, encoding="utf-8", errors="replace") as f:
    for lineno, raw in enumerate(f, start=1):
      line = raw.rstrip("\r\n")
      if not line.strip():
        continue
      if fmt == "text":
        requests.append({"line": lineno, "name": f"line_{lineno:04d}", "text": line.strip(),
                         "prompt_wav": FLAGS.prompt_wav, "prompt_text": FLAGS.prompt_text})
        continue
      fields = [x.strip() for x in line.split("|")]
      error = None
      if len(fields) not in (4, 5):
        error = f"expected 4 or 5 '|'-separated fields (utt|prompt_text|prompt_wav|target_text[|gt_wav]), " \
                f"got {len(fields)}"
      elif not fields[0] or "/" in fields[0] or fields[0] in (".", ".."):
        error = f"utterance id {fields[0]!r} cannot be a file name"
      elif fields[0] in seen:
        error = f"utterance id {fields[0]!r} already used on line {seen[fields[0]]}"
      elif not fields[2]:
        error = "empty prompt_wav field"
      if error:
        bad.append({"line": lineno, "name": fields[0] if fields else "", "status": "failed", "error": error})
        continue
      seen[fields[0]] = lineno
      requests.append({"line": lineno, "name": fields[0], "text": fields[3],
                       "prompt_wav": os.path.normpath(os.path.join(folder, os.path.expanduser(fields[2]))),
                       "prompt_text": fields[1]})
  return requests, bad


def _single(synth) -> int:
  result = synth.synthesize(FLAGS.text, prompt_wav=FLAGS.prompt_wav, prompt_text=FLAGS.prompt_text,
                            seed=FLAGS.seed)
  if FLAGS.png:
    wav_path, png_path = result.save(FLAGS.out, title=FLAGS.text[:80])
  else:
    from e2etts_jax import audio
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    audio.save_wav(FLAGS.out, result.wav, result.sample_rate)
    wav_path, png_path = FLAGS.out, None
  t = result.timings
  print(f"wrote {wav_path} ({result.duration:.2f} s, {result.tokens.shape[0]} tokens)"
        + (f" and {png_path}" if png_path else ""))
  print(f"RTF {result.rtf:.3f} (synthesis {t['total']:.2f} s: llm {t['llm']:.2f}, fm {t['fm']:.2f}, "
        f"vocoder {t['vocoder']:.2f}, prompt {t['prompt']:.2f}; the first call includes compilation)")
  return 0


def _batch(synth) -> int:
  from tqdm.auto import tqdm
  from e2etts_jax import audio
  out_dir = FLAGS.out_dir
  os.makedirs(out_dir, exist_ok=True)
  requests, bad = _read_requests(FLAGS.input, FLAGS.input_format)
  for b in bad:
    print(f"{FLAGS.input}:{b['line']}: skipped: {b['error']}", file=sys.stderr)
  rows = list(bad)
  synth_s = audio_s = 0.0
  bar = tqdm(requests, desc="synthesize", unit="utt", disable=not FLAGS.progress)
  for req in bar:
    row = {"line": req["line"], "name": req["name"], "status": "failed", "error": None}
    rows.append(row)
    try:
      r = synth.synthesize(req["text"], prompt_wav=req["prompt_wav"], prompt_text=req["prompt_text"],
                           seed=FLAGS.seed)
      wav_path = os.path.join(out_dir, req["name"] + ".wav")
      if FLAGS.png:
        r.save(wav_path, title=req["text"][:80])
      else:
        audio.save_wav(wav_path, r.wav, r.sample_rate)
      synth_s += r.timings["total"]
      audio_s += r.duration
      row.update(status="ok", wav=wav_path, seconds=round(r.duration, 3), tokens=int(r.tokens.shape[0]),
                 rtf=round(r.rtf, 4))
    except Exception as e:  # pylint: disable=broad-except  # one line must never end the batch
      row["error"] = f"{type(e).__name__}: {e}"
      tqdm.write(f"{FLAGS.input}:{req['line']}: failed: {row['error']}", file=sys.stderr)
    failed = sum(1 for r in rows if r["status"] != "ok")
    bar.set_postfix(failed=failed, rtf=f"{synth_s / audio_s:.2f}" if audio_s else "-")
  rows.sort(key=lambda r: r["line"])
  with open(os.path.join(out_dir, REPORT_NAME), "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  ok = sum(1 for r in rows if r["status"] == "ok")
  print(f"{ok} synthesised, {len(rows) - ok} failed of {len(rows)} lines into {out_dir} "
        f"(RTF {synth_s / audio_s:.3f} over {audio_s:.1f} s of audio)" if audio_s else
        f"{ok} synthesised, {len(rows) - ok} failed of {len(rows)} lines into {out_dir}")
  return 0 if ok == len(rows) else 1


def _synthesize_from_flags() -> int:
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  if (FLAGS.text is None) == (FLAGS.input is None):
    raise app.UsageError("give exactly one of --text (single mode) or --input (batch mode)")
  if FLAGS.input is not None:
    if not os.path.exists(FLAGS.input):
      raise app.UsageError(f"--input not found: {FLAGS.input}")
    if not FLAGS.out_dir:
      raise app.UsageError("batch mode (--input) needs --out_dir")
  if FLAGS.prompt_wav and not os.path.exists(FLAGS.prompt_wav):
    raise app.UsageError(f"--prompt_wav not found: {FLAGS.prompt_wav}")
  from e2etts_jax import checkpoint, perf, synthesis  # pylint: disable=import-outside-toplevel  # after flag checks
  perf.enable_compilation_cache()
  t0 = time.perf_counter()
  try:
    synth = synthesis.Synthesizer.from_workdir(FLAGS.workdir, step=FLAGS.step, seed=FLAGS.seed,
                                               vocoder=FLAGS.vocoder, inference=FLAGS.inference)
  except (FileNotFoundError, checkpoint.CheckpointError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  print(f"loaded {FLAGS.workdir} (step {synth.meta.get('global_step')}, stage {synth.meta.get('stage')}) "
        f"in {time.perf_counter() - t0:.1f} s")
  if FLAGS.input is not None:
    return _batch(synth)
  try:
    return _single(synth)
  except synthesis.SynthesisError as e:
    raise app.UsageError(str(e)) from e


def main(argv: Sequence[str]) -> int:
  """Runs with argv = [program, --flag=value, ...] and returns the exit status (for scripts and tests)."""
  rest = _parse_own(argv)
  if len(rest) > 1:
    raise app.UsageError(f"unknown arguments: {' '.join(rest[1:])}")
  return _synthesize_from_flags()


def _app_main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unknown arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    # Checkpoint loading logs every file it reads at INFO; the tool's own output is printed.
    absl_logging.set_verbosity(absl_logging.WARNING)
  sys.exit(_synthesize_from_flags())


def run() -> None:
  """Console-script entry point (e2etts-synthesize)."""
  app.run(_app_main, flags_parser=flag_parsing.app_flags_parser(FLAGS, __doc__))


if __name__ == "__main__":
  run()
