"""Metrics out of the train loop: TensorBoard scalars/images/audio, a JSONL log, and loss-curve pictures.

Only process 0 writes; other processes get a writer that does nothing.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import numpy as np


JSONL = "metrics.jsonl"   # one row per write, in the workdir


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    self._tb = None
    self.closed = False
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, JSONL), "a")

  def scalars(self, step: int, values: Mapping[str, float], prefix: str = "train", tensorboard: bool = True) -> None:
    """One JSONL row (split `prefix`) and, unless `tensorboard` is False, one TensorBoard scalar per value."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in values.items()}
    for k, v in clean.items() if tensorboard else ():
      self._tb.add_scalar(f"{prefix}/{k}", v, step)
    self._jsonl.write(json.dumps({"step": step, "split": prefix, **clean}) + "\n")
    self._jsonl.flush()

  def image(self, step: int, tag: str, figure) -> None:
    if self.enabled:
      self._tb.add_figure(tag, figure, step)

  def audio(self, step: int, tag: str, wav: np.ndarray, sample_rate: int) -> None:
    if self.enabled:
      self._tb.add_audio(tag, np.asarray(wav, np.float32)[None], step, sample_rate=sample_rate)

  def close(self) -> None:
    """Flushes and closes the files; a second call does nothing."""
    if self.enabled and not self.closed:
      self._tb.close()
      self._jsonl.close()
    self.closed = True


def read_metrics(workdir: str, split: str = "train") -> list[dict]:
  path = os.path.join(workdir, JSONL)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if r.get("split") == split]


def plot_loss_curves(workdir: str, out_path: str | None = None) -> str:
  """Draws every `loss/*` series of metrics.jsonl into one picture (a panel per term: training values as a line,
  held-out values, where the run has them, as markers); returns its path."""
  # Figure, not pyplot: no global backend switch (that would break a notebook's inline plots).
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  rows, held = read_metrics(workdir), read_metrics(workdir, split="eval")
  keys = sorted({k for r in rows for k in r if k.startswith("loss/")})
  out_path = out_path or os.path.join(workdir, "loss_curves.png")
  cols = max(1, min(4, len(keys)))
  n_rows = max(1, -(-len(keys) // cols))
  fig = Figure(figsize=(4 * cols, 3 * n_rows), layout='tight')
  axes = fig.subplots(n_rows, cols, squeeze=False)
  for ax, key in zip(axes.flat, keys):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    ax.plot(*zip(*pts), label="train")
    held_pts = [(r["step"], r[key]) for r in held if key in r]
    if held_pts:
      ax.plot(*zip(*held_pts), "o", label="held-out")
      ax.legend(fontsize="small")
    ax.set_title(key)
    ax.set_xlabel("step")
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  fig.savefig(out_path, dpi=80)
  return out_path
