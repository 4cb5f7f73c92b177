"""e2etts-diagnose: where a trained workdir loses intelligibility (see e2etts_jax.diagnosis).

  e2etts-diagnose --workdir runs/main --manifest runs/main/corpus/manifest.jsonl --out runs/main/diagnosis
  e2etts-diagnose --workdir W --manifest M --out D --split train --items 16   # sentences it was trained on
  ... [--variants ground_truth,envelope,prior,resynthesis[,tts]] [--envelope_coeffs 20] [--seed 0]
  ... [--inference fm.temperature=0.5,fm.ode_steps=32]   # sample the FM otherwise than the trained config says
  e2etts-diagnose --collect docs/diagnosis --md docs/diagnosis/table.md    # one table of many diagnoses
  e2etts-diagnose --collect D --baseline STUDY   # ... with each study's paired resynthesis WER against STUDY's
                                                 # (and, for recipes run with several seeds, paired over seeds)

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
flag_parsing.define_inference_flag(FLAGS)
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


def _diagnose_from_flags() -> int:
  if FLAGS.collect:
    return _collect_from_flags()
  for name in ("workdir", "manifest", "out"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
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
  diagnosis.diagnose(synth, items, FLAGS.out, asr=evaluation.make_asr("pocketsphinx"),
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
