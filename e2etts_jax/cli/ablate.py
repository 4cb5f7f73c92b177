"""e2etts-ablate: train and score variants x seeds (the paper's claims as paired A/Bs), then render the results page.

  e2etts-ablate --config configs/small.py --variants e2e,cascaded,recognition_tokenizer --seeds 0,1,2 \
      --out runs/ablate --md docs/results.md
  e2etts-ablate --report_only --out runs/ablate --md docs/results.md     # re-render from saved results.json
  e2etts-ablate --report_only --backfill --out runs/ablate ...   # fields newer than the saved runs, then render

Every run is the main job's (e2etts_jax.main_job; its 2-core budget defaults apply unless --nobudget_defaults or the
key is given as --config.*). See e2etts_jax/ablate.py for the variants and claims.
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/small.py", "Config file (path[:arg]).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", "runs/ablate", "Study folder: shards, one run folder per variant and seed.")
_VARIANTS = flags.DEFINE_list("variants", ["e2e", "cascaded", "recognition_tokenizer"], "Variants to run.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (model init, data order, prompts).")
_CORPUS = flags.DEFINE_string("corpus_dir", "data/corpus", "Embedded corpus folder (wavs are reused).")
_NUM_UTTS = flags.DEFINE_integer("num_utterances", 1000, "Corpus size (utterances).")
_EVAL_ITEMS = flags.DEFINE_integer("eval_items", 20, "Test items scored per system and run.")
_BUDGET = flags.DEFINE_bool("budget_defaults", True, "Apply the main job's 2-core budget defaults.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only render --md from the results.json under --out.")
_MD = flags.DEFINE_string("md", "docs/results.md", "Results page to write.")
_EXTRA = flags.DEFINE_list("report_from", [], "More study folders whose results.json go into the page.")
_BACKFILL = flags.DEFINE_bool("backfill", False, "Before rendering, add to the results.json under --out what "
                              "they were saved without: per-utterance resynthesis mel errors (recomputed from each "
                              "run's checkpoint; the saved mean must come back), the judge's WER components and "
                              "each sentence's words missed (from the run's eval folders; they must average to the "
                              "components).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from e2etts_jax import ablate
  refused = None
  if not _REPORT_ONLY.value:
    from e2etts_jax import config_lib, main_job
    config = _CONFIG.value
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    if _BUDGET.value:
      main_job.apply_defaults(config, set(overrides))
    try:
      seeds = [int(s) for s in _SEEDS.value]
    except ValueError:
      raise app.UsageError(f"--seeds must be integers, got {_SEEDS.value}")
    unknown = [v for v in _VARIANTS.value if v not in ablate.VARIANTS]
    if unknown:
      raise app.UsageError(f"unknown variant(s) {unknown}; choose from {', '.join(ablate.VARIANTS)}")
    try:
      import jax
      config_lib.validate(config, jax.device_count())
    except config_lib.ConfigError as e:
      raise app.UsageError(f"bad config: {e}")
    from e2etts_jax import trainer
    try:
      ablate.run_study(config, _OUT.value, _VARIANTS.value, seeds, corpus_dir=_CORPUS.value,
                       num_utterances=_NUM_UTTS.value, eval_items=_EVAL_ITEMS.value,
                       overrides=overrides)
    except trainer.ResumeError as e:   # the report still covers the runs that finished
      refused = e
  if _BACKFILL.value:
    _backfill(ablate, _OUT.value)
  text = ablate.write_report([_OUT.value, *_EXTRA.value], _MD.value)
  print(text)
  print(f"[e2etts-ablate] wrote {_MD.value}")
  if refused is not None:
    raise app.UsageError(str(refused))


def _backfill(ablate, out: str) -> None:
  """ablate.add_wer_components and ablate.add_mel_errors on every run under `out`; what cannot be filled in is
  named, the other runs and fields go on, and both are counted."""
  from e2etts_jax.checkpoint import CheckpointError
  done, failed = 0, 0
  for row in ablate.load_results([out]):
    path = row["path"]
    try:
      if ablate.add_wer_components(path):
        done += 1
        print(f"[e2etts-ablate] WER components / per-utterance words missed added to {path}", flush=True)
    except (OSError, ValueError) as e:
      failed += 1
      print(f"[e2etts-ablate] backfill: {e}", flush=True)
    try:
      rel = ablate.add_mel_errors(path)
      if rel is not None:
        done += 1
        print(f"[e2etts-ablate] per-utterance mel errors added to {path} (saved mean reproduced to {rel:.1e})",
              flush=True)
    except (OSError, ValueError, CheckpointError) as e:
      failed += 1
      print(f"[e2etts-ablate] backfill: {e}", flush=True)
  print(f"[e2etts-ablate] backfill: {done} fields filled in, {failed} failed", flush=True)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
