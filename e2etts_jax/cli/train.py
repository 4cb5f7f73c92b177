"""e2etts-train: train the configured stages in a workdir (resumes automatically).

  e2etts-train --config configs/small.py --workdir runs/small --config.train.stage1.steps=2000
  e2etts-train --config configs/small.py:cascaded --workdir runs/small-cascaded
  e2etts-train --workdir runs/s3-lr1e-4 --branch_from runs/small:1367 --config.train.stage3.learning_rate=1e-4
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/small.py", "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and run files.", required=True)
_BRANCH = flags.DEFINE_string("branch_from", None, "SOURCE_WORKDIR:STEP: start --workdir at that checkpoint "
                              "(trainer.branch) and train on under SOURCE's config.json with this command's "
                              "--config.a.b=v overrides (the --config file then only checks and types the overrides; its "
                              "values are not used).")
_ALLOW = flags.DEFINE_bool("allow_config_change", False, "Resume a workdir under a config that differs from its "
                           "config.json in keys that change training (else refused, naming them); the changes "
                           "are logged to its config_changes.jsonl.")
_STOP_AFTER = flags.DEFINE_integer("stop_after", None, "Stop (with a checkpoint) after this many global steps.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed.initialize: auto = when SLURM/E2ETTS_COORDINATOR say multi-host.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # keep Orbax's per-save INFO lines off the progress bar
  from e2etts_jax import distributed, perf
  if distributed.wanted(_DISTRIBUTED.value):
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  perf.enable_compilation_cache()   # after initialize: multi-process runs keep their own entries
  from e2etts_jax import config_lib, trainer
  if _BRANCH.value:
    config = _branch(_BRANCH.value, _WORKDIR.value, trainer)
  else:
    config = _CONFIG.value
  try:
    import jax
    config_lib.validate(config, jax.device_count())
  except config_lib.ConfigError as e:
    raise app.UsageError(f"bad config: {e}")
  try:
    # A branch goes on under its own config by design: its overrides are the changes logged.
    result = trainer.train(config, _WORKDIR.value, stop_after=_STOP_AFTER.value,
                           allow_config_change=_ALLOW.value or bool(_BRANCH.value))
  except trainer.ResumeError as e:
    raise app.UsageError(str(e))
  state = "preempted, checkpoint saved" if result.preempted else "done"
  logging.info("%s at global step %d (stage %s); workdir %s", state, result.global_step, result.stage,
               _WORKDIR.value)
  last = result.history[-1] if result.history else {}
  print(f"[e2etts-train] {state}: step {result.global_step}, stage {result.stage}, "
        f"loss/total={last.get('loss/total', float('nan')):.6f}, workdir {_WORKDIR.value}")


def _branch(spec: str, workdir: str, trainer):
  """--branch_from SOURCE:STEP: copies the checkpoint (process 0) and returns SOURCE's config with the overrides."""
  import jax
  from jax.experimental import multihost_utils
  from e2etts_jax import checkpoint, config_lib
  source, _, step = spec.rpartition(":")
  if not source or not step.isdigit():
    raise app.UsageError(f"--branch_from must be SOURCE_WORKDIR:STEP, got {spec!r}")
  try:
    config = trainer.load_config(source)
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    config_lib.apply_overrides(config, overrides)
    trainer.branch(source, int(step), workdir)
  except (checkpoint.CheckpointError, config_lib.ConfigError) as e:
    raise app.UsageError(str(e))
  # The branch trains under SOURCE's recipe, not the --config file's: say where they part, since a key the source
  # run was given on its command line (a loss weight, a budget default) is easily taken for the file's.
  differ = config_lib.differences(_CONFIG.value, config)
  if differ and jax.process_index() == 0:
    print(f"[e2etts-train] {workdir} goes on under {source}/config.json with the overrides, not under --config: "
          f"{len(differ)} key(s) differ from it (--config -> {source}): {config_lib.describe_differences(differ)}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("e2etts-train branch")
  return config


def run():
  app.run(main)


if __name__ == "__main__":
  run()
