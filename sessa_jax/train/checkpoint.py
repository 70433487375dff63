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
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


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
    """Saves (asynchronously) at `step`; all processes call this.

    Args:
      step: the number of optimizer updates applied to `state`.
      state: pytree of jax arrays.
      data_iter: the grain DatasetIterator positioned after the last batch
        consumed by `state`.
    """
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iter)), force=True)

  def restore(self, abstract_state: Any, data_iter: Any = None, *,
              step: int | None = None) -> tuple[int, Any] | None:
    """Restores the newest readable checkpoint, or the one at `step`.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings; the
        restored arrays take these shapes, dtypes and shardings.
      data_iter: the grain iterator, whose position is set in place; None
        restores the state only.
      step: restore exactly this step; a missing or unreadable one raises,
        and nothing is moved.

    Returns:
      (step, state), or None when no checkpoint can be read. Unreadable
      checkpoints newer than the restored one are moved to
      `<directory>.unreadable/` so that training can save those steps again.

    Raises:
      FileNotFoundError: `step` was given and no checkpoint has it.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    if step is not None:
      saved = self.all_steps()
      if step not in saved:
        raise FileNotFoundError(
            f"no checkpoint of step {step} in {self.directory}; saved steps: "
            f"{', '.join(map(str, saved)) or 'none'}")
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      return step, restored["state"]
    unreadable = []
    for newest in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(newest,
                                         args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        first_line = str(e).splitlines()[0] if str(e) else ""
        logging.warning("checkpoint %s/%d cannot be restored (%s: %s); "
                        "falling back to an earlier one", self.directory,
                        newest, type(e).__name__, first_line)
        unreadable.append(newest)
        continue
      self._set_aside(unreadable)
      return newest, restored["state"]
    return None

  def _set_aside(self, steps: list[int]) -> None:
    if not steps:
      return
    aside = self.directory.with_name(self.directory.name + ".unreadable")
    if jax.process_index() == 0:
      aside.mkdir(exist_ok=True)
      for step in steps:
        target = aside / f"{step}-{int(time.time())}"
        (self.directory / str(step)).rename(target)
        logging.warning("moved unreadable checkpoint %d to %s", step, target)
    multihost_utils.sync_global_devices("checkpoints set aside")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
