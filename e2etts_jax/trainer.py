"""The train loop, big_vision style and linear: mesh -> input -> state (restored or new) -> stages of updates.

`train(config, workdir)` runs the configured stages (E2E: 1 -> 2 -> 3; cascaded: recognition tokenizer -> separate
training), checkpointing params, optimizer, step, data-iterator state and metadata with Orbax, resuming from the
latest checkpoint automatically (also onto another mesh), saving and exiting cleanly on SIGTERM, skipping
non-finite updates and aborting after `train.max_bad_steps` in a row.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from typing import Any, Optional

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from e2etts_jax import (checkpoint, config_lib, flops, held_out, input_pipeline, metric_writer, optim, perf,
                        sharding, train_step)
from e2etts_jax.system import DataInfo, System

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. too many non-finite steps in a row); the message says why."""


class ResumeError(TrainingError):
  """A workdir's checkpoint cannot go on under this config (another stage budget, or keys that change training);
  raised before anything in the workdir is touched."""


@dataclasses.dataclass
class TrainResult:
  state: Any                      # the final TrainState (params of all four networks)
  system: System
  global_step: int
  stage: str
  history: list[dict]             # one dict of host metrics per logged step
  preempted: bool = False
  evals: list[dict] = dataclasses.field(default_factory=list)   # held-out loss rows (held_out.HeldOut)
  # Wall seconds spent in `train` on this workdir's run, summed over every call that resumed it (compiles and
  # held-out evals included); None where a checkpoint it resumed from was saved without the sum.
  train_seconds: Optional[float] = None


def stage_plan(config: ml_collections.ConfigDict) -> list[tuple[str, int, int]]:
  """[(stage, first global step, steps)] for the stages with steps > 0, in order."""
  plan, offset = [], 0
  for stage in config_lib.STAGES:
    steps = config.train[stage].steps
    if steps > 0:
      plan.append((stage, offset, steps))
      offset += steps
  return plan


class _Preemption:
  """When to stop early for a SIGTERM (a preemption notice), so the step in flight finishes and a checkpoint is
  written.

  One process: a Python handler turns the first SIGTERM into a flag the loop polls; it then puts the previous
  handler back, so a second SIGTERM acts as it would without us (by default: terminate now, e.g. during a long
  compile). Several processes: every step and the save are collective, so all must stop after the same step, while
  a scheduler may notify one host or each at a different step. There the stop is JAX's preemption sync point: the
  SIGTERM handler `jax.distributed.initialize` installs reports the notice to the coordination service, which picks
  the step after the furthest process's current one, and `reached(step)` turns true on every process at that step.
  """

  def __init__(self):
    self.requested = False
    self._old = None
    self._synced = False

  def __enter__(self):
    if jax.process_count() > 1:
      # A Python handler would replace JAX's notifier; without the service (jax_enable_preemption_service off),
      # SIGTERM keeps its default action: the processes stop at once, and resume from the last checkpoint.
      self._synced = bool(jax.config.jax_enable_preemption_service)
      if not self._synced:
        log.warning("jax_enable_preemption_service is off: SIGTERM stops this run without a checkpoint")
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler, nothing to restore
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.requested = True
    # getsignal() is None for a handler installed outside Python; the default action is then the honest fallback.
    signal.signal(signal.SIGTERM, signal.SIG_DFL if self._old is None else self._old)
    self._old = None

  def reached(self, step: int) -> bool:
    """Whether to stop after global `step`; call it after every step, with the same steps on every process."""
    if self._synced and not self.requested:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def write_run_files(workdir: str, config: ml_collections.ConfigDict, info: DataInfo) -> None:
  """The config, data info and sentencepiece model beside the checkpoints, so a workdir is self-contained."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  info.save(os.path.join(workdir, "data_info.json"))
  spm = os.path.join(config.data.shards, "spm.model")
  if os.path.exists(spm):
    shutil.copyfile(spm, os.path.join(workdir, "spm.model"))


def branch(source: str, step: int, workdir: str) -> None:
  """Starts `workdir` at `source`'s checkpoint of global `step` (params, optimizer, EMA and data-iterator state),
  with the run files a resume reads and the metrics logged up to that step, so `train` on `workdir` continues from
  there under its own config: e.g. stage 3 with another recipe from one stage-2 checkpoint, every arm from the same
  start. `train` then checks the config as on any resume (the step must lie in the same stage; a state that does
  not restore names the keys changed against `source`'s config.json); its first `train` takes
  `allow_config_change=True` to go on under other keys than `source`'s, which it logs to the workdir's
  config_changes.jsonl, and later resumes compare with the branch's own config. `branch.json` records `source` and
  `step`. `source` is left untouched. Process 0 copies;
  the others must wait for it (`multihost_utils.sync_global_devices`) before training."""
  src = os.path.join(source, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(src) if d.isdigit()) if os.path.isdir(src) else []
  if step not in steps:
    raise checkpoint.CheckpointError(f"cannot branch from {source} at step {step}: its checkpoints are at "
                                     f"{', '.join(map(str, steps)) or 'no step'} ({src})")
  dst = os.path.join(workdir, "checkpoints")
  if os.path.isdir(dst) and any(d.isdigit() for d in os.listdir(dst)):
    raise checkpoint.CheckpointError(f"cannot branch into {workdir}: it already holds checkpoints ({dst}); "
                                     "branch into a new workdir")
  # A checkpoint at a stage's last step is that stage's: the next stage's held-out read at the same step is made
  # again when training enters that stage here, so it is left behind rather than logged twice. Read before anything
  # is written: a source without its config.json is refused with W2 untouched.
  ending = [float(config_lib.STAGES.index(s) + 1) for s, first, n in stage_plan(load_config(source))
            if first + n == step]
  if jax.process_index() != 0:
    return
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(workdir, BRANCH), "w") as f:
    json.dump({"source": os.path.abspath(source), "step": step}, f)
  for name in ("config.json", "data_info.json", "spm.model"):
    if os.path.exists(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(workdir, name))
  metrics = os.path.join(source, metric_writer.JSONL)
  if os.path.exists(metrics):
    def keep(row: dict) -> bool:
      if row["step"] != step or not ending or row.get("split") not in ("eval", "eval_set"):
        return row["step"] <= step
      return row["stage"] == ending[0]
    with open(metrics) as f, open(os.path.join(workdir, metric_writer.JSONL), "w") as out:
      out.writelines(line for line in f if line.strip() and keep(json.loads(line)))
  # Last: a copy cut short leaves no checkpoint, so a second try is not refused as a workdir in use.
  shutil.copytree(os.path.join(src, str(step)), os.path.join(dst, str(step)))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise checkpoint.CheckpointError(f"{workdir} is not a training workdir: {path} is missing")
  with open(path) as f:
    return config_lib.from_dict(json.load(f))


def load_trained(workdir: str, step: Optional[int] = None, mesh=None, ema: bool = False
                 ) -> tuple[System, dict, dict]:
  """(system, params, meta) of a workdir's latest (or given) checkpoint, for synthesis and evaluation.

  ema: the averaged networks' weight averages in place of their weights, where the run kept them (train.ema_decay);
  meta['weights'] then says 'ema' (else 'raw').
  Raises CheckpointError naming what is missing (config, data info, checkpoints) or unreadable.
  """
  config = load_config(workdir)
  info_path = os.path.join(workdir, "data_info.json")
  if not os.path.exists(info_path):
    raise checkpoint.CheckpointError(f"{workdir} has no data_info.json (was training started there?)")
  system = System(config, DataInfo.load(info_path))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise checkpoint.CheckpointError(f"no checkpoints in {workdir} (expected {ckpt_dir})")
  ckpt = checkpoint.Checkpointer(ckpt_dir, every=1, keep=1 << 30, async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise checkpoint.CheckpointError(f"no checkpoints in {ckpt_dir}")
  meta = ckpt.restore_meta(step)
  if mesh is None:
    mesh_cfg = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
  abstract, _ = train_step.state_shardings(system, optim.make_optimizer(config, meta["stage"]), mesh)
  state, _ = ckpt.restore(step, abstract)
  ckpt.close()
  params = state.params
  if ema and state.ema is not None:
    params = train_step.ema_params(params, state.ema)
  meta = {**meta, "weights": "ema" if params is not state.params else "raw"}
  return system, params, meta


def warm_start(params: dict, params_shardings: dict, source: str, networks, mesh) -> dict:
  """`params` ({network: tree}) with `networks` replaced by those of the latest checkpoint in the workdir `source`,
  placed with `params_shardings`; the other networks are kept as given.

  Raises CheckpointError if `source` has no readable checkpoint and TrainingError if a network's parameters do
  not fit this config's (another width, depth, vocabulary or speaker count).
  """
  _, src, meta = load_trained(source, mesh=mesh)
  out = dict(params)
  for net in networks:
    mine = {jax.tree_util.keystr(k): x.shape for k, x in jax.tree_util.tree_leaves_with_path(params[net])}
    theirs = {jax.tree_util.keystr(k): x.shape for k, x in jax.tree_util.tree_leaves_with_path(src[net])}
    if mine != theirs:
      bad = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
      raise TrainingError(
          f"train.init_from={source}: its {net} does not fit this config's ({len(bad)} parameter(s) differ; "
          f"{net}{bad[0]} is {theirs.get(bad[0], 'absent')} there and {mine.get(bad[0], 'absent')} here). "
          f"Leave {net} out of train.init_networks or match its config")
    out[net] = jax.device_put(src[net], params_shardings[net])
  log.info("initialised %s from %s (step %d)", ", ".join(networks), source, meta["global_step"])
  return out


def _host(metrics: dict) -> dict:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: Optional[int] = None,
          progress: bool = True, mesh=None, allow_config_change: bool = False) -> TrainResult:
  """Trains the stages of `config` in `workdir` (resuming if it holds checkpoints).

  stop_after: stop once this many global steps are done (checkpointing there), e.g. to test resumption.
  allow_config_change: resume under a config that differs from the workdir's config.json in keys outside
  RESUME_FREE (else ResumeError names them); the changes are logged and appended to its config_changes.jsonl.
  """
  t0 = time.perf_counter()
  config_lib.validate(config, mesh.size if mesh is not None else jax.device_count())
  mesh = mesh or sharding.make_mesh(config.mesh)
  info = input_pipeline.dataset_info(config.data.shards, config)
  plan = stage_plan(config)
  if not plan:
    raise TrainingError("every stage has 0 steps: nothing to train (set train.stageN.steps)")
  total_steps = plan[-1][1] + plan[-1][2]
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.train.checkpoint_every,
                                 config.train.keep_checkpoints)
  try:
    latest, meta, changed = _resume_point(ckpt, plan, workdir, config, allow_config_change)
  except (TrainingError, checkpoint.CheckpointError):
    ckpt.close()
    raise
  # The run's training time so far rides in each checkpoint's metadata, so a resumed (preempted, re-scored) run still
  # reports what its training cost rather than what its last call did.
  before = 0.0 if meta is None else meta.get("train_seconds")
  def seconds_so_far() -> Optional[float]:
    return None if before is None else before + time.perf_counter() - t0

  system = System(config, info)
  rng = jax.random.key(config.seed)
  # The iterator of the current stage's batches (`_train_iterator`); a stage with another batch size or other length
  # buckets makes its own.
  iter_stage = meta["stage"] if meta is not None else plan[0][0]
  train_iter = _train_iterator(config, mesh, iter_stage)
  writer = metric_writer.MetricWriter(workdir)
  # Closed on every way out: a run that raises (a refused warm start, too many bad steps) would otherwise leave
  # its TensorBoard writer to an atexit hook, which Python 3.12 can no longer run (no new threads at shutdown).
  try:
    # Resume: the latest checkpoint says which stage and step we are in.
    state, start_global, shard_tree = None, 0, None
    if meta is not None:
      stage = meta["stage"]
      abstract, shard_tree = train_step.state_shardings(system, optim.make_optimizer(config, stage), mesh)
      try:
        state, _ = ckpt.restore(latest, abstract, train_iter)
      except checkpoint.CheckpointError as e:
        ckpt.close()
        raise checkpoint.CheckpointError(f"{e}\n{_config_changes(workdir, config)}") from e
      start_global = latest
      log.info("resumed from %s step %d (stage %s)", ckpt.directory, latest, stage)
      if changed:
        log.warning("resuming %s at step %d under %d changed key(s): %s", workdir, latest, len(changed),
                    config_lib.describe_differences(changed))
        if jax.process_index() == 0:
          with open(os.path.join(workdir, CONFIG_CHANGES), "a") as f:
            f.write(json.dumps({"step": latest, "changes": {k: [a, b] for k, a, b in changed}}) + "\n")
    # Only now: a refused resume leaves the workdir's config.json as the run that wrote its checkpoints left it.
    write_run_files(workdir, config, info)

    peak = perf.matmul_peak_flops()
    history: list[dict] = []
    held = held_out.HeldOut(system, mesh, writer, held_out.eval_batches(config, mesh), rng,
                            draws=config.train.eval_draws)
    bar = tqdm(total=total_steps, initial=start_global, disable=not progress or jax.process_index() != 0,
               desc="train", unit="step", dynamic_ncols=True)
    global_step, stage = start_global, plan[0][0]
    with _Preemption() as preemption:
      for stage, first, steps in plan:
        if global_step >= first + steps:
          continue   # finished before the restart
        tx = optim.make_optimizer(config, stage)
        if _batches(config, iter_stage) != _batches(config, stage):
          train_iter = _train_iterator(config, mesh, stage)
        iter_stage = stage
        if state is None:
          state, shard_tree = train_step.create_train_state(system, tx, mesh, rng)
          if config.train.init_from:
            params = warm_start(state.params, shard_tree.params, config.train.init_from,
                                config_lib.parse_list(config.train.init_networks), mesh)
            state, shard_tree = train_step.create_train_state(system, tx, mesh, rng, params=params)
        elif global_step == first:   # entering a new stage: keep params, fresh optimizer for its networks
          state, shard_tree = train_step.create_train_state(system, tx, mesh, rng, params=state.params,
                                                            ema=state.ema)
        step_fns: dict = {}
        logger = _StepLogger(writer, config, info, stage, first, steps, peak, bar, history, ckpt.directory)
        if global_step == first:
          held(stage, global_step, state.params, shard_tree.params)
        for _ in range(global_step - first, steps):
          batch = next(train_iter)
          rows, frames = batch["mel"].shape[:2]
          if (rows, frames) not in step_fns:   # one compile per bucket (its length, and with dynamic batches rows)
            step_fns[rows, frames] = train_step.make_train_step(system, tx, stage, mesh, shard_tree, batch)
          state, metrics = step_fns[rows, frames](state, batch, rng)
          global_step += 1
          bar.update(1)
          # Metrics are read one step late, so the host never waits on the step it just dispatched.
          logger.push((global_step, metrics, rows, frames))
          meta = {"stage": stage, "global_step": global_step, "mode": config.train.mode,
                  "train_seconds": seconds_so_far()}
          stopping = preemption.reached(global_step) or (stop_after is not None and global_step >= stop_after)
          if global_step == first + steps or (config.train.eval_every and
                                              (global_step - first) % config.train.eval_every == 0):
            held(stage, global_step, state.params, shard_tree.params)
          ckpt.save(global_step, state, train_iter, meta, force=global_step == first + steps or stopping)
          if stopping:
            break
        logger.flush()
        # Asked again, not `stopping`: a SIGTERM that came during the stage's last held-out eval or save stops the
        # run here rather than one step into the next stage (with its new optimizer and compile).
        if preemption.requested or (stop_after is not None and global_step >= stop_after):
          break
    bar.close()
    ckpt.close()
    if writer.enabled and history:
      metric_writer.plot_loss_curves(workdir)
    return TrainResult(state=state, system=system, global_step=global_step, stage=stage, history=history,
                       preempted=preemption.requested, evals=held.rows, train_seconds=seconds_so_far())
  finally:
    writer.close()


def _batches(config: ml_collections.ConfigDict, stage: str) -> tuple:
  """What shapes `stage`'s training batches: its global batch size and its length buckets."""
  return config_lib.stage_batch_size(config, stage), config_lib.stage_buckets(config, stage)


def _train_iterator(config: ml_collections.ConfigDict, mesh, stage: str):
  """The training iterator of `stage`'s batches (`config_lib.stage_data`: its global batch and length buckets).
  Stages that keep the batches of the stage before them continue its iterator; one that changes them starts a
  fresh pass of the same seed's order in its own batches. So the checkpointed iterator is always the current
  stage's, and a resume restores into a fresh one of that stage's batches."""
  return input_pipeline.make_global_iterator(config_lib.stage_data(config, stage), mesh, "train", seed=config.seed)


def check_resume(config: ml_collections.ConfigDict, workdir: str, *,
                 allow_config_change: bool = False) -> list[tuple[str, Any, Any]]:
  """The changed keys (`config_lib.differences`, outside RESUME_FREE) that `train` would resume `workdir` under ([]
  for a workdir without checkpoints). Raises ResumeError where `train` would refuse, so a caller can ask before it
  rewrites anything the workdir's run was made from (main_job: its shards)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  ckpt = checkpoint.Checkpointer(directory, every=1, keep=1 << 30, async_save=False)
  try:
    return _resume_point(ckpt, stage_plan(config), workdir, config, allow_config_change)[2]
  finally:
    ckpt.close()


def _resume_point(ckpt: checkpoint.Checkpointer, plan: list, workdir: str, config: ml_collections.ConfigDict,
                  allow: bool) -> tuple[Optional[int], Optional[dict], list[tuple[str, Any, Any]]]:
  """(latest step, its checkpoint metadata, the changed keys it resumes under) of `ckpt`, or (None, None, []) when
  it holds no checkpoint. Raises ResumeError where that step lies outside its stage in `plan`
  (`_check_resumable`) or the config changes keys outside RESUME_FREE without `allow` (`_resume_changes`)."""
  latest = ckpt.latest_step()
  if latest is None:
    return None, None, []
  meta = ckpt.restore_meta(latest)
  _check_resumable(plan, latest, meta["stage"], ckpt.directory)
  return latest, meta, _resume_changes(workdir, config, latest, allow)


def _check_resumable(plan: list, step: int, stage: str, directory: str) -> None:
  """Raises ResumeError unless global `step`, saved in `stage`, lies within that stage of `plan`: another stage
  budget would continue the checkpoint in the wrong stage, schedule or optimizer state."""
  spans = {s: (first, first + steps) for s, first, steps in plan}
  if stage in spans and spans[stage][0] <= step <= spans[stage][1]:
    return
  where = ", ".join(f"{s} steps {a}-{b}" for s, (a, b) in spans.items())
  raise ResumeError(
      f"{directory} holds global step {step} of {stage}, which this config's stages ({where}) do not place in "
      f"{stage}: resume with the stage budgets that wrote it (its workdir's config.json), or start another "
      f"workdir (train.init_from takes its parameters)")


def _config_changes(workdir: str, config: ml_collections.ConfigDict) -> str:
  """What a refused resume's config changed against the workdir's config.json (the run that wrote the checkpoint),
  one `key: old -> new` per differing key, since a changed optimizer, network shape or EMA setting changes the
  state tree Orbax is asked for."""
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      changed = config_lib.differences(json.load(f), config)
  except (OSError, ValueError) as e:
    return f"its config ({path}) cannot be read to compare: {type(e).__name__}: {e}"
  if not changed:
    return (f"this config matches {path}, so the checkpoint itself is damaged or was written by another version "
            f"of the code")
  return (f"this config differs from the one that wrote it ({path}) in {len(changed)} key(s): "
          f"{config_lib.describe_differences(changed)}. Resume with that config, or start another workdir "
          f"(train.init_from takes its parameters)")


# Keys a resume may change without changing what the checkpoint's run goes on to compute: where the data lies
# (a moved workdir), how it is read, how often it logs, evaluates and checkpoints, the mesh (a resume reshards),
# rematerialisation, and the warm start (read only by a run's first step).
RESUME_FREE = ("data.manifest", "data.shards", "data.num_workers", "data.prefetch", "mesh.", "model.remat",
               "model.scan_unroll", "train.log_every", "train.eval_every", "train.eval_batches", "train.eval_draws",
               "train.checkpoint_every", "train.keep_checkpoints", "train.max_bad_steps", "train.init_from",
               "train.init_networks")
CONFIG_CHANGES = "config_changes.jsonl"   # one row per resume that went on under changed keys
BRANCH = "branch.json"                    # where trainer.branch started a workdir: {"source", "step"}


def _resume_changes(workdir: str, config: ml_collections.ConfigDict, step: int,
                    allow: bool) -> list[tuple[str, Any, Any]]:
  """The keys outside RESUME_FREE in which `config` differs from the workdir's config.json (the run that wrote the
  checkpoint at `step`). Raises ResumeError naming them unless `allow`: resuming under another loss weight,
  learning rate or budget would train a run its config.json no longer describes."""
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ResumeError(f"cannot resume {workdir}: its config ({path}) cannot be read to compare this config "
                      f"with: {type(e).__name__}: {e}") from e
  changed = [d for d in config_lib.differences(saved, config)
             if not any(d[0] == k or (k.endswith(".") and d[0].startswith(k)) for k in RESUME_FREE)]
  if not changed or allow:
    return changed
  raise ResumeError(
      f"{workdir} was trained to step {step} under another config ({path}), which this one changes in "
      f"{len(changed)} key(s): {config_lib.describe_differences(changed)}. Resume with that config; or go on "
      f"under this one on purpose with allow_config_change (e2etts-train/main_job --allow_config_change; the "
      f"changes are then logged to {CONFIG_CHANGES}); or start another workdir (e2etts-train --branch_from "
      f"{workdir}:{step} keeps this one as it is)")


class _StepLogger:
  """Reads each step's metrics one step late, checks the non-finite counter, and logs every `log_every` steps
  (and a stage's last step) with throughput and MFU measured over the steps since the previous log (summed step by
  step: with dynamic batches the steps between two logs have different shapes)."""

  def __init__(self, writer, config, info, stage, first, steps, peak, bar, history, ckpt_dir):
    self.writer, self.config, self.info, self.stage = writer, config, info, stage
    self.first, self.last = first, first + steps
    self.peak, self.bar, self.history, self.ckpt_dir = peak, bar, history, ckpt_dir
    self.lr = optim.schedule(config, stage)
    self.pending = None
    self.t_mark, self.step_mark = time.perf_counter(), None
    self.flop_cache: dict = {}
    self.since = {"flops": 0.0, "frames": 0}   # analytic FLOPs and padded mel frames of the steps since the mark

  def push(self, item) -> None:
    if self.pending is not None:
      self._process(self.pending)
    self.pending = item

  def flush(self) -> None:
    if self.pending is not None:
      self._process(self.pending)
      self.pending = None

  def _process(self, item) -> None:
    step, metrics, batch, frames = item
    host = _host(metrics)
    if host["bad_steps"] >= self.config.train.max_bad_steps:
      raise TrainingError(
          f"{int(host['bad_steps'])} consecutive steps had a non-finite loss or gradient (stage {self.stage}, "
          f"step {step}); their updates were skipped and the last good checkpoint in {self.ckpt_dir} is intact. "
          f"Lower train.{self.stage}.learning_rate or check the data.")
    c = self.config
    if (batch, frames) not in self.flop_cache:
      self.flop_cache[batch, frames] = flops.step_flops(c, self.info, batch, frames, self.stage)
    self.since["flops"] += self.flop_cache[batch, frames]
    self.since["frames"] += batch * frames
    first = self.step_mark is None
    if not first and step % c.train.log_every and step != self.last:
      return
    now = time.perf_counter()
    host.update(step=step, lr=float(self.lr(step - self.first - 1)), batch_size=batch, frames=frames)
    if not first:   # the first step after a (re)start includes compilation: throughput is timed from it on
      seconds = max(now - self.t_mark, 1e-9)
      steps_per_s = (step - self.step_mark) / seconds
      host.update(
          steps_per_s=steps_per_s,
          tokens_per_s=self.since["frames"] / c.tokenizer.downsample / seconds,
          audio_s_per_s=self.since["frames"] * c.audio.hop_length / c.audio.sample_rate / seconds,
          mfu=self.since["flops"] / seconds / self.peak)
      self.bar.set_postfix(stage=self.stage, loss=f"{host['loss/total']:.3f}", sps=f"{steps_per_s:.2f}")
    self.t_mark, self.step_mark = now, step
    self.since = {"flops": 0.0, "frames": 0}
    self.writer.scalars(step, host)
    self.history.append({"stage": self.stage, **host})
