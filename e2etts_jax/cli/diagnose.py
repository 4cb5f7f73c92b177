"""e2etts-diagnose: where a trained workdir loses intelligibility (see e2etts_jax.diagnosis).

  e2etts-diagnose --workdir runs/main --manifest runs/main/corpus/manifest.jsonl --out runs/main/diagnosis
  e2etts-diagnose --workdir W --manifest M --out D --split train --items 16   # sentences it was trained on
  ... [--variants ground_truth,envelope,prior,resynthesis[,tts]] [--envelope_coeffs 20] [--seed 0]
  ... [--inference fm.temperature=0.5,fm.ode_steps=32]   # sample the FM otherwise than the trained config says
  ... [--asr_workers 2]   # the judge transcribes in 2 worker processes while the next items are synthesised
  e2etts-diagnose --collect docs/diagnosis --md docs/diagnosis/table.md    # one table of many diagnoses
  e2etts-diagnose --collect D --baseline STUDY   # ... with each study's paired resynthesis WER against STUDY's
                                                 # (and, for recipes run with several seeds, paired over seeds)
  e2etts-diagnose --workdir W --held_out_steps 2050,2200 --held_out_stage stage3 --draws 64 [--out D]
      # how far each held-out loss term moved between two checkpoints, against its spread over 64 draw sets

Scores the judge (pocketsphinx) on the ground truth, its spectral envelope, the FM prior of its tokens and their
resynthesis, for the same sentences; writes OUT/diagnosis.md (the table), OUT/diagnosis.json and each variant's
evaluation report under OUT/<variant>/.
"""
from __future__ import annotations

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
flags.DEFINE_string("manifest", None, "Corpus manifest (JSONL) holding the sentences.", flag_values=FLAGS)
flags.DEFINE_string("split", "test", "Manifest split to take sentences from (train: ones the model has seen).",
                    flag_values=FLAGS)
flags.DEFINE_integer("items", 16, "Sentences to score (spread over speakers; 0 = all).", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output folder.", flag_values=FLAGS)
flags.DEFINE_list("variants", ["ground_truth", "envelope", "prior", "resynthesis"],
                  "Variants to score (tts: the whole system, text -> LLM -> FM).", flag_values=FLAGS)
flags.DEFINE_integer("envelope_coeffs", 20, "DCT coefficients over mel bins kept by the envelope variant.",
                     flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "FM noise and bootstrap seed.", flag_values=FLAGS)
flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for confidence intervals.", flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "Show progress bars.", flag_values=FLAGS)
flags.DEFINE_integer("asr_workers", 1, "Processes the judge transcribes in, beside synthesis "
                     "(evaluation.ASRPool; same results); 1 = in this process.", flag_values=FLAGS)
flag_parsing.define_inference_flag(FLAGS)
flags.DEFINE_list("held_out_steps", None, "Instead of diagnosing: re-read the run's held-out loss terms at these "
                  "checkpoint steps (held_out.reread) and print each term's move from the first to the last.",
                  flag_values=FLAGS)
flags.DEFINE_string("held_out_stage", None, "With --held_out_steps: whose loss terms to read (default: each "
                    "checkpoint's own stage; a stage's first checkpoint was written by the stage before).",
                    flag_values=FLAGS)
flags.DEFINE_integer("draws", 4, "With --held_out_steps: draw sets to read (set d as train.eval_draws's d-th).",
                     flag_values=FLAGS)
flags.DEFINE_string("collect", None, "Instead of diagnosing: render every DIR/*/diagnosis.json as one table, "
                    "then the recipes run with several training seeds (into --md, else stdout).", flag_values=FLAGS)
flags.DEFINE_string("md", None, "With --collect: the markdown file to write the table into.", flag_values=FLAGS)
flags.DEFINE_string("baseline", None, "With --collect: a study folder under DIR; adds each study's paired resynthesis "
                    "WER difference to it (bootstrap CI and p on the sentences both scored).", flag_values=FLAGS)


def _collect_from_flags() -> int:
  from e2etts_jax import diagnosis
  try:
    table = diagnosis.collect(FLAGS.collect, baseline=FLAGS.baseline, n_resamples=FLAGS.bootstrap)
    seeds = diagnosis.collect_seeds(FLAGS.collect, baseline=FLAGS.baseline, n_resamples=FLAGS.bootstrap)
    if seeds:
      table += "\nRecipes run with several training seeds:\n\n" + seeds
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from e
  if FLAGS.md:
    with open(FLAGS.md, "w", encoding="utf-8") as f:
      f.write(table)
    print(f"[e2etts-diagnose] wrote {FLAGS.md}")
  else:
    print(table)
  return 0


def _held_out_from_flags() -> int:
  import json
  from e2etts_jax import checkpoint, config_lib, held_out, perf
  if not FLAGS.workdir:
    raise app.UsageError("--held_out_steps needs --workdir")
  stage = FLAGS.held_out_stage
  if stage is not None and stage not in config_lib.STAGES:
    raise app.UsageError(f"--held_out_stage={stage!r}: choose from {', '.join(config_lib.STAGES)}")
  try:
    steps = [int(s) for s in FLAGS.held_out_steps]
  except ValueError as e:
    raise app.UsageError(f"--held_out_steps={','.join(FLAGS.held_out_steps)}: steps are integers") from e
  perf.enable_compilation_cache()
  try:
    read = held_out.reread(FLAGS.workdir, steps, stage=stage, draws=FLAGS.draws, progress=FLAGS.progress)
  except (checkpoint.CheckpointError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  first, last = steps[0], steps[-1]
  moved = held_out.moves(read[first], read[last])
  lines = [f"{FLAGS.workdir}: held-out terms at steps {first} -> {last} ({stage or 'each checkpoint its own stage'}), "
           f"{FLAGS.draws} draw sets", "",
           f"| term | step {first} | step {last} | move | move SE | sets rising |", "|---|---|---|---|---|---|"]
  for k, m in moved.items():
    se = "-" if m["move_se"] is None else f"{m['move_se']:.4f}"
    lines.append(f"| {k} | {m['start']:.4f} | {m['end']:.4f} | {m['move']:+.4f} | {se} | "
                 f"{m['sets_rising']} of {m['sets']} |")
  print("\n".join(lines))
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    path = os.path.join(FLAGS.out, "held_out.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"workdir": FLAGS.workdir, "stage": stage, "draws": FLAGS.draws, "moves": moved,
                 "sets": {str(s): v for s, v in read.items()}}, f, indent=1)
    print(f"[e2etts-diagnose] wrote {path}")
  return 0


def _diagnose_from_flags() -> int:
  if FLAGS.collect:
    return _collect_from_flags()
  if FLAGS.held_out_steps:
    return _held_out_from_flags()
  for name in ("workdir", "manifest", "out"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  if FLAGS.asr_workers < 1:
    raise app.UsageError(f"--asr_workers={FLAGS.asr_workers}: need at least 1")
  from e2etts_jax import checkpoint, diagnosis, evaluation, main_job, perf, synthesis
  bad = [v for v in FLAGS.variants if v not in diagnosis.VARIANTS]
  if bad:
    raise app.UsageError(f"unknown --variants {', '.join(bad)}; choose from {', '.join(diagnosis.VARIANTS)}")
  perf.enable_compilation_cache()
  try:
    synth = synthesis.Synthesizer.from_workdir(FLAGS.workdir, step=FLAGS.step, seed=FLAGS.seed,
                                               inference=FLAGS.inference)
    # Prompts the model can take (tts): no longer than its training utterances. Only tts reads the prompt.
    items = evaluation.items_from_manifest(FLAGS.manifest, split=FLAGS.split, seed=FLAGS.seed,
                                           max_prompt_seconds=synth.config.data.max_seconds)
  except (FileNotFoundError, checkpoint.CheckpointError, evaluation.MetalistError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  items = main_job.pick_items(items, FLAGS.items)
  if not items:
    raise app.UsageError(f"{FLAGS.manifest} has no {FLAGS.split!r} sentences")
  t0 = time.perf_counter()
  with evaluation.judge("pocketsphinx", FLAGS.asr_workers) as asr:
    diagnosis.diagnose(synth, items, FLAGS.out, asr=asr,
                       variants=FLAGS.variants, envelope_coeffs=FLAGS.envelope_coeffs, seed=FLAGS.seed,
                       n_resamples=FLAGS.bootstrap, progress=FLAGS.progress,
                       meta={"split": FLAGS.split, "manifest": FLAGS.manifest})
  with open(os.path.join(FLAGS.out, "diagnosis.md"), encoding="utf-8") as f:
    print(f.read())   # the table diagnose() wrote, with its own record of the run
  print(f"[e2etts-diagnose] {len(items)} {FLAGS.split} sentences in {time.perf_counter() - t0:.0f} s -> {FLAGS.out}")
  return 0


def main(argv: Sequence[str]) -> int:
  """Runs with argv = [program, --flag=value, ...] and returns the exit status (for scripts and tests)."""
  rest = flag_parsing.parse_own(FLAGS, __doc__, argv)
  if len(rest) > 1:
    raise app.UsageError(f"unknown arguments: {' '.join(rest[1:])}")
  return _diagnose_from_flags()


def _app_main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unknown arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)   # checkpoint loading logs every file at INFO
  sys.exit(_diagnose_from_flags())


def run() -> None:
  """Console-script entry point (e2etts-diagnose)."""
  app.run(_app_main, flags_parser=flag_parsing.app_flags_parser(FLAGS, __doc__))


if __name__ == "__main__":
  run()
