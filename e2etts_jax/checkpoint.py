"""Orbax checkpoints of the train state, the data iterator and run metadata (stage, config).

Steps are global across stages. Saving is asynchronous; the save-decision policy saves every
`train.checkpoint_every` steps (and whenever forced: end of a stage, SIGTERM), the preservation policy keeps the
latest `train.keep_checkpoints`. Restoring takes an abstract state whose leaves carry shardings, so a checkpoint
written on one mesh restores onto any other.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import grain
import orbax.checkpoint as ocp

STATE, DATA, META = "state", "data", "meta"


class CheckpointError(RuntimeError):
  """A checkpoint is missing or unreadable; the message names the directory."""


class Checkpointer:
  def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every),
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any, meta: dict, force: bool = False) -> bool:
    args = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      args[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> tuple[Any, dict]:
    """(state placed per `abstract_state`'s shardings, meta); also rewinds `data_iterator` in place."""
    meta = self.restore_meta(step)
    args = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises many types for damaged trees; name the checkpoint either way
      raise CheckpointError(f"cannot restore step {step} from {self.directory}: {type(e).__name__}: {e}") from e
    return restored[STATE], meta

  def restore_meta(self, step: int) -> dict:
    if step not in self.manager.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                            f"(have: {sorted(self.manager.all_steps()) or 'none'})")
    return self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
