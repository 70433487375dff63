"""Orbax checkpoints of the train state and the data iterator's position.

A checkpoint is one directory per step under `WORKDIR/checkpoints/` holding
two items: `state` (parameters, optimizer state and step; restored
straight onto the mesh with the target's shardings) and `data` (the grain
iterator state, one JSON file per process). Restoring walks the steps from the
newest down: a checkpoint that fails to read is skipped with a warning, so a
corrupt latest falls back to the one before.

Orbax keeps process-wide state (a counter naming the signals of its
operations), so runs sharing a process from several threads (a packed
sweep's points) take turns: off the main thread, creating a manager, saving
(until on disk) and restoring hold one lock.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import threading
import time
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


_TURNS = threading.Lock()


def _off_main_thread() -> bool:
  return threading.current_thread() is not threading.main_thread()


def _turn():
  """The shared lock off the main thread; no lock on it."""
  return _TURNS if _off_main_thread() else contextlib.nullcontext()


class CheckpointRestoreError(RuntimeError):
  """No checkpoint in the directory can be restored into the given target."""


def _first_sentence(error: Exception) -> str:
  """'Type: first sentence' of an error (orbax's run on with advice)."""
  text = str(error).strip().split("\n")[0]
  text = text.split(". ")[0].rstrip(".")
  return f"{type(error).__name__}: {text}"


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs by step.

  Args:
    directory: where the step directories live (created if missing, unless
      `read_only`).
    keep: how many of the newest checkpoints to keep.
    read_only: never create, save, delete or move anything (evaluation).
  """

  def __init__(self, directory: str | pathlib.Path, keep: int = 3, *,
               read_only: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    self.read_only = read_only
    options = (ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0) if read_only else
               ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    with _turn():
      self._manager = ocp.CheckpointManager(
          self.directory, options=options, item_names=("state", "data"))

  def all_steps(self) -> list[int]:
    """Steps saved on disk (re-read, so other writers' saves are seen)."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def describe_latest(self) -> str:
    """A sentence naming the newest checkpoint, or saying there is none."""
    step = self.latest_step()
    if step is None:
      return (f"No checkpoint has been saved in {self.directory}; a relaunch "
              "starts from step 0")
    return f"The last good checkpoint is step {step} in {self.directory}"

  def save(self, step: int, state: Any, data_iter: Any) -> None:
    """Saves at `step` (asynchronously on the main thread); all processes call.

    Args:
      step: the number of optimizer updates applied to `state`.
      state: pytree of jax arrays.
      data_iter: the grain DatasetIterator positioned after the last batch
        consumed by `state`.
    """
    with _turn():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iter)), force=True)
      if _off_main_thread():
        self._manager.wait_until_finished()

  def restore(self, abstract_state: Any, data_iter: Any = None,
              accept: Callable[[Any], bool] | None = None, *,
              step: int | None = None) -> tuple[int, Any]:
    """Restores the newest readable checkpoint, or the one at `step`.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings; the
        restored arrays take these shapes, dtypes and shardings.
      data_iter: the grain iterator, whose position is set in place; None
        restores the state alone.
      accept: optional test of a restored state (e.g. all values finite); a
        state it rejects is treated as unreadable.
      step: restore this step only (no fallback to an earlier one).

    Returns:
      (step, state). Unless read-only, unreadable checkpoints newer than the
      restored one are moved to `<directory>.unreadable/` so that training
      can save those steps again.

    Raises:
      CheckpointRestoreError: no checkpoint can be restored; the message
        gives each one's reason.
      FileNotFoundError: `step` is not among the saved steps (the message
        lists them).
    """
    candidates = self.all_steps()
    if step is not None:
      if step not in candidates:
        raise FileNotFoundError(
            f"no checkpoint of step {step} in {self.directory}; saved steps: "
            f"{', '.join(map(str, candidates)) or 'none'}")
      candidates = [step]
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    unreadable, reasons = [], {}
    for candidate in reversed(candidates):
      try:
        with _turn():
          restored = self._manager.restore(candidate,
                                           args=ocp.args.Composite(**items))
        if accept is not None and not accept(restored["state"]):
          raise ValueError("it holds non-finite values")
      except Exception as e:  # pylint: disable=broad-except
        reason = _first_sentence(e)
        logging.warning("checkpoint %s/%d cannot be restored (%s); falling "
                        "back to an earlier one", self.directory, candidate,
                        reason)
        unreadable.append(candidate)
        reasons.setdefault(reason, []).append(str(candidate))
        continue
      if not self.read_only:
        self._set_aside(unreadable)
      return candidate, restored["state"]
    raise CheckpointRestoreError(
        f"no checkpoint in {self.directory} can be restored with this config ("
        + "; ".join(f"step {', '.join(steps)}: {reason}"
                    for reason, steps in reasons.items()) + ")")

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
