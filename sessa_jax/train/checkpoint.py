"""Orbax checkpoints of the train state and the data iterator's position.

A checkpoint is one directory per step under `WORKDIR/checkpoints/` holding
two items: `state` (parameters, optimizer state, step and RNG key; restored
straight onto the mesh with the target's shardings) and `data` (the grain
iterator state, one JSON file per process). Restoring walks the steps from the
newest down: a checkpoint that fails to read is skipped with a warning, so a
corrupt latest falls back to the one before.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import grain
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs by step.

  Args:
    directory: where the step directories live (created if missing).
    keep: how many of the newest checkpoints to keep.
  """

  def __init__(self, directory: str | pathlib.Path, keep: int = 3):
    self.directory = pathlib.Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data"))

  def all_steps(self) -> list[int]:
    """Steps saved on disk (re-read, so other writers' saves are seen)."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, data_iter: Any) -> None:
    """Saves at `step` unless that step is already saved (all processes call).

    Args:
      step: the number of optimizer updates applied to `state`.
      state: pytree of jax arrays.
      data_iter: the grain DatasetIterator positioned after the last batch
        consumed by `state`.
    """
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter)), force=True)

  def restore(self, abstract_state: Any, data_iter: Any
             ) -> tuple[int, Any] | None:
    """Restores the newest readable checkpoint.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings; the
        restored arrays take these shapes, dtypes and shardings.
      data_iter: the grain iterator, whose position is set in place.

    Returns:
      (step, state), or None when no checkpoint can be read.
    """
    for step in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iter)))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint %s/%d cannot be restored (%s: %s); "
                        "falling back to an earlier one", self.directory, step,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        continue
      return step, restored["state"]
    return None

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
