"""e2etts-ablate: train and score variants x seeds (the paper's claims as paired A/Bs), then render the results page.

  e2etts-ablate --config configs/small.py --variants e2e,cascaded,recognition_tokenizer --seeds 0,1,2 \
      --out runs/ablate --md docs/results.md
  e2etts-ablate --report_only --out runs/ablate --md docs/results.md     # re-render from saved results.json
  e2etts-ablate --report_only --add_mel_errors --out runs/ablate ...      # per-utterance mel errors, then render

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
_ADD_MEL = flags.DEFINE_bool("add_mel_errors", False, "Before rendering, add per-utterance resynthesis mel errors "
                             "to the results.json under --out saved without them (recomputed from each run's "
                             "checkpoint; the run's saved mean must come back) so `mel_mse` claims get an "
                             "utterance bootstrap.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from e2etts_jax import ablate
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
    ablate.run_study(config, _OUT.value, _VARIANTS.value, seeds, corpus_dir=_CORPUS.value,
                     num_utterances=_NUM_UTTS.value, eval_items=_EVAL_ITEMS.value,
                     overrides=[f"{k}={v}" for k, v in sorted(overrides.items())])
  if _ADD_MEL.value:
    _add_mel_errors(ablate, _OUT.value)
  text = ablate.write_report([_OUT.value, *_EXTRA.value], _MD.value)
  print(text)
  print(f"[e2etts-ablate] wrote {_MD.value}")


def _add_mel_errors(ablate, out: str) -> None:
  """ablate.add_mel_errors on every run under `out`; a run it cannot redo is named and the others go on."""
  from e2etts_jax.checkpoint import CheckpointError
  done, failed = 0, []
  for row in ablate.load_results([out]):
    try:
      rel = ablate.add_mel_errors(row["path"])
    except (OSError, ValueError, CheckpointError) as e:
      failed.append(row["path"])
      print(f"[e2etts-ablate] add_mel_errors: {e}", flush=True)
      continue
    if rel is not None:
      done += 1
      print(f"[e2etts-ablate] per-utterance mel errors added to {row['path']} (saved mean reproduced to "
            f"{rel:.1e})", flush=True)
  print(f"[e2etts-ablate] add_mel_errors: {done} runs filled in, {len(failed)} failed", flush=True)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
