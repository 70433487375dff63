"""Orbax checkpoints of the train state and the data iterator's position.

A checkpoint is one directory per step under `WORKDIR/checkpoints/` holding
two items: `state` (parameters, optimizer state and step; restored
straight onto the mesh with the target's shardings) and `data` (the grain
iterator state, one JSON file per process of the run). Only the run's
processes (`RunProcesses`) take part, so a run confined to one process of a
multi-process job saves and restores without the others, and its checkpoints
resume in any single process. Restoring walks the steps from the
newest down: a checkpoint that fails to read is skipped with a warning, so a
corrupt latest falls back to the one before.

Orbax keeps process-wide state (a counter naming the signals of its
operations), so runs sharing a process from several threads (a packed
sweep's points) take turns: off the main thread, creating a manager, saving
(until on disk) and restoring hold one lock. Those counters would also
disagree between processes checkpointing different runs, so a run of some
of several processes creates its directories without signals, and names its
barriers by its processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from sessa_jax.train.processes import RunProcesses


_TURNS = threading.Lock()


def _off_main_thread() -> bool:
  return threading.current_thread() is not threading.main_thread()


def _turn():
  """The shared lock off the main thread; no lock on it."""
  return _TURNS if _off_main_thread() else contextlib.nullcontext()


class OwnedArrayHandler(ocp.type_handlers.ArrayHandler):
  """orbax's ArrayHandler for a run confined to one of several processes.

  orbax expects each process of a multi-process job to hold part of every
  array it saves, and refuses fully addressable ones. A confined run's
  process holds its arrays whole: it writes each one from host memory, in
  the layout orbax reads back (restoring is orbax's own).
  """

  async def serialize(self, values: Sequence[jax.Array],
                      infos: Sequence[ocp.type_handlers.ParamInfo],
                      args: Sequence[ocp.type_handlers.SaveArgs] | None = None
                     ) -> list[Any]:
    del args
    for value, info in zip(values, infos):
      await info.await_path_creation()
      host = np.asarray(value)
      spec = ocp.type_handlers.get_json_tspec_write(
          info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=host.shape,
          local_shape=host.shape, dtype=host.dtype,
          process_index=jax.process_index(), metadata_key=self._metadata_key)
      array = await ts.open(ts.Spec(spec), create=True, open=True,
                            context=info.ts_context)
      await array.write(host)
    return []


class IteratorHandler(ocp.CheckpointHandler):
  """Saves a grain iterator's state as `process_{i}-of-{n}.json`.

  i and n are this process's place among the run's processes and their
  number (for a run on all processes, its index and the process count).

  Args:
    processes: the run's processes.
  """

  def __init__(self, processes: RunProcesses):
    self._processes = processes

  def _path(self, directory: epath.Path) -> epath.Path:
    return directory / (f"process_{self._processes.index}-of-"
                        f"{self._processes.count}.json")

  def save(self, directory: epath.Path, args: IteratorSave) -> None:
    self._path(directory).write_text(json.dumps(args.item.get_state(),
                                                indent=2))

  def restore(self, directory: epath.Path, args: IteratorRestore) -> Any:
    path = self._path(directory)
    if not path.exists():
      raise FileNotFoundError(f"{path} does not exist")
    args.item.set_state(json.loads(path.read_text()))
    args.item.start_prefetch()
    return args.item

  def metadata(self, directory: epath.Path) -> None:
    del directory


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  item: Any


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
    processes: the run's processes (default: all), which alone call this
      object's methods; the first writes the shared files.
  """

  def __init__(self, directory: str | pathlib.Path, keep: int = 3, *,
               read_only: bool = False,
               processes: RunProcesses | None = None):
    self.directory = pathlib.Path(directory).absolute()
    self.read_only = read_only
    self.processes = processes or RunProcesses.everyone()
    subset = not self.processes.is_everyone
    multiprocessing = ocp.options.MultiprocessingOptions(
        primary_host=self.processes.primary,
        active_processes=set(self.processes.indices) if subset else None,
        barrier_sync_key_prefix=self.processes.name if subset else None)
    if not read_only and self.processes.is_primary:
      self.directory.mkdir(parents=True, exist_ok=True)
    self.processes.sync(f"created {self.directory}")
    options = ocp.CheckpointManagerOptions(
        read_only=read_only, create=False,
        multiprocessing_options=multiprocessing,
        async_options=ocp.options.AsyncOptions(
            create_directories_asynchronously=not subset),
        **({"save_interval_steps": 0} if read_only else {"max_to_keep": keep}))
    arrays = {}
    if subset:
      handler = (OwnedArrayHandler if self.processes.count == 1
                 else ocp.type_handlers.ArrayHandler)
      arrays["type_handler_registry"] = (
          ocp.type_handlers.create_type_handler_registry(
              (jax.Array, handler(primary_host=self.processes.primary))))
    with _turn():
      self._manager = ocp.CheckpointManager(
          self.directory, options=options, item_handlers={
              "state": ocp.PyTreeCheckpointHandler(
                  multiprocessing_options=multiprocessing, **arrays),
              "data": IteratorHandler(self.processes)})

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
    """Saves at `step` (asynchronously on the main thread).

    The run's processes all call it.

    Args:
      step: the number of optimizer updates applied to `state`.
      state: pytree of jax arrays.
      data_iter: the grain DatasetIterator positioned after the last batch
        consumed by `state`.
    """
    with _turn():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state),
          data=IteratorSave(data_iter)), force=True)
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
    items = {"state": ocp.args.PyTreeRestore(
        abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract_state))}
    if data_iter is not None:
      items["data"] = IteratorRestore(data_iter)
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
    if self.processes.is_primary:
      aside.mkdir(exist_ok=True)
      for step in steps:
        target = aside / f"{step}-{int(time.time())}"
        (self.directory / str(step)).rename(target)
        logging.warning("moved unreadable checkpoint %d to %s", step, target)
    self.processes.sync(f"set aside in {self.directory}")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
