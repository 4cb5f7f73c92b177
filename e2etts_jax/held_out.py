"""Held-out loss terms on fixed batches and fixed random draws: read during training, re-read from checkpoints.

Training logs each stage's loss terms on the first `train.eval_batches` full batches of the test split, with the
same flow times, noise, CFG drops and Gumbel draws every time (`HeldOut`), so that successive values differ only by
what the parameters learnt. A term that takes draws still reads differently under another set of draws, so each
value is the mean over `train.eval_draws` sets. `reread` reads a finished run's checkpoints under as many sets as
asked (set d's keys are those training used for its set d), and `moves` says how far each term moved between two
checkpoints against the spread of that move over the sets.
"""
from __future__ import annotations

import copy
import itertools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from e2etts_jax import config_lib, input_pipeline, train_step

log = logging.getLogger(__name__)

# Held-out metrics kept beside the loss terms (objectives.loss_fn computes them only with train=False).
METRICS = ("llm/text_gain",)
# Draw sets read in one call: the main job's held-out read of 4 sets took 16.9 s on a CPU core against 22.7 s set
# by set (stage 3; stage 1 10.0 s against 15.2 s), and a re-read of 64 sets keeps to 8 times one set's activations.
CHUNK = 8


def eval_batches(config: ml_collections.ConfigDict, mesh) -> list[dict]:
  """The first `train.eval_batches` global batches of the test split, in a fixed order (every full one if that is
  -1; none if it is 0, or if the data has no test split: a warning says so and training goes on), each of
  data.batch_size rows padded to data.max_frames.

  One shape, whatever the length buckets: each shape is an eval program to compile per stage (13-15 s on 2 CPU
  cores), which costs more than the padding of a few dozen batches."""
  n = int(config.train.eval_batches)
  if n == 0:
    return []
  config = copy.deepcopy(config)
  config.data.bucket_boundaries = (int(config.data.max_frames),)
  try:   # full batches only: padded rows would enter the losses' means
    it = input_pipeline.make_global_iterator(config, mesh, "test", seed=config.seed, num_epochs=1, shuffle=False,
                                             drop_remainder=True)
    return list(itertools.islice(it, n if n > 0 else None))
  except ValueError as e:
    log.warning("train.eval_batches=%d, but no held-out losses: %s", n, e)
    return []


class HeldOut:
  """The stage's loss terms on fixed held-out batches with fixed rngs, at each stage's start and end and every
  `train.eval_every` steps. Each value is the mean over the batches and over `draws` sets of draws: one set fixes
  the noise, but the terms that take draws (the E2E speaker term most) differ between sets by more than a 75-step
  stage moves them, so a single set can read a stage's fall as a rise. Set 0's keys are the same whatever `draws`
  is. Rows go to the writer (split 'eval', with `stage` = 1, 2, 3) and to `rows`; with several sets, each set's
  values go to the JSONL log too (split 'eval_set', with `stage` and `draw`), for `moves`."""

  def __init__(self, system, mesh, writer, batches: list[dict], rng: jax.Array, draws: int = 1):
    self.system, self.mesh, self.writer, self.batches = system, mesh, writer, batches
    self.rng = jax.random.fold_in(rng, 0x5EED)
    self.draws = int(draws)
    self.fns: dict = {}
    self.rows: list[dict] = []

  def key(self, draw: int, batch: int) -> jax.Array:
    """The rng of one batch in one draw set: set 0's are fold_in(rng, batch), as before sets existed."""
    key = jax.random.fold_in(self.rng, batch)
    return key if draw == 0 else jax.random.fold_in(key, draw)

  def read(self, stage: str, params, params_shardings) -> list[list[dict]]:
    """[set][batch] -> {term: value}: the stage's held-out terms of every batch under each of the draw sets, read
    `CHUNK` sets per call."""
    outs = []   # (sets, batch, {term: [len(sets)]})
    for lo in range(0, self.draws, CHUNK):
      sets = range(lo, min(lo + CHUNK, self.draws))
      for i, batch in enumerate(self.batches):
        shape = (stage, batch["mel"].shape[1], len(sets))   # one compiled eval step per stage and chunk size
        if shape not in self.fns:
          self.fns[shape] = train_step.make_eval_step(self.system, stage, self.mesh, params_shardings, batch)
        metrics = self.fns[shape](params, batch, jnp.stack([self.key(d, i) for d in sets]))
        outs.append((sets, i, {k: v for k, v in metrics.items() if k.startswith("loss/") or k in METRICS}))
    # One transfer for all batches: the host waits once, not once per batch.
    host = jax.device_get([m for _, _, m in outs])
    per_set = [[None] * len(self.batches) for _ in range(self.draws)]
    for (sets, i, _), m in zip(outs, host):
      for j, d in enumerate(sets):
        per_set[d][i] = {k: float(v[j]) for k, v in m.items()}
    return per_set

  def __call__(self, stage: str, step: int, params, params_shardings) -> None:
    if not self.batches:
      return
    means = set_means(self.read(stage, params, params_shardings))   # every set holds the same batches
    row = {k: sum(m[k] for m in means) / len(means) for k in means[0]}
    row["stage"] = float(config_lib.STAGES.index(stage) + 1)
    self.writer.scalars(step, row, prefix="eval")
    self.rows.append({"step": step, **row})
    if self.draws > 1:   # each set's own values, so a stage's move can be set against its spread over the sets
      for d, values in enumerate(means):
        self.writer.scalars(step, {**values, "stage": row["stage"], "draw": float(d)}, prefix="eval_set",
                            tensorboard=False)


def set_means(per_set: list[list[dict]]) -> list[dict]:
  """[set][batch] -> {term: value} to [set] -> {term: mean over the batches}."""
  return [{k: sum(m[k] for m in batches) / len(batches) for k in batches[0]} for batches in per_set]


def reread(workdir: str, steps: Sequence[int], *, stage: str | None = None, draws: int = 4, mesh=None,
           progress: bool = True) -> dict[int, list[dict]]:
  """{step: [set] -> {term: value}}: a run's held-out terms at each checkpoint step, under draw sets 0 .. draws-1,
  each the mean over the run's own held-out batches (its config's test split and `train.eval_batches`) with the
  keys its training used; so set 0 of a step where training read held-out values gives those values with
  `train.eval_draws=1`, and the mean over sets 0 .. N-1 gives them with N.

  stage: whose loss terms to read (default: each checkpoint's own stage; a checkpoint at a stage's first step
  was written by the stage before, so pass the stage to read both ends of one stage with its terms).
  Raises CheckpointError if a step has no checkpoint, ValueError if the run's held-out batches cannot be read.
  """
  from e2etts_jax import trainer   # trainer imports this module: loading checkpoints is its job
  from tqdm.auto import tqdm
  if draws < 1:
    raise ValueError(f"draws={draws}: read at least one draw set")
  out, held = {}, None
  for step in tqdm(list(steps), desc="held-out re-read", unit="ckpt", disable=not progress):
    system, params, meta = trainer.load_trained(workdir, step, mesh=mesh)
    config = system.config
    if held is None:
      mesh = mesh or next(iter(jax.tree_util.tree_leaves(params))).sharding.mesh
      batches = eval_batches(config, mesh)
      if not batches:
        raise ValueError(f"{workdir}: no full held-out batch to read (train.eval_batches="
                         f"{config.train.eval_batches}, shards {config.data.shards}); is its test split there?")
      held = HeldOut(system, mesh, None, batches, jax.random.key(config.seed), draws=draws)
    which = stage or meta["stage"]
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
    out[int(step)] = set_means(held.read(which, params, shardings))
  return out


def moves(start: list[dict], end: list[dict]) -> dict[str, dict]:
  """{term: {start, end, move, move_se, sets_rising, sets}}: each term's mean over draw sets at two readings of the
  same sets (`reread`'s values at two steps), its move (end - start, the mean over sets of each set's own move)
  and that move's standard error over the sets (None with one set), so a move can be told from draw noise."""
  if len(start) != len(end):
    raise ValueError(f"{len(start)} draw sets at the start but {len(end)} at the end: read both under the same sets")
  out = {}
  for k in start[0]:
    if k not in end[0]:
      continue
    a = np.array([s[k] for s in start])
    b = np.array([s[k] for s in end])
    m = b - a
    out[k] = {"start": float(a.mean()), "end": float(b.mean()), "move": float(m.mean()),
              "move_se": float(m.std(ddof=1) / np.sqrt(len(m))) if len(m) > 1 else None,
              "sets_rising": int((m > 0).sum()), "sets": len(m)}
  return out
