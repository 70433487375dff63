"""Orbax checkpoints of the train state and the data iterator's position.

A checkpoint is one directory per step under `WORKDIR/checkpoints/` holding
two items: `state` (parameters, optimizer state and step; restored
straight onto the mesh with the target's shardings) and `data` (the grain
iterator state, one JSON file per process of the run). Only the run's
processes (`RunProcesses`) take part, so a run confined to one process of a
multi-process job saves and restores without the others, and its checkpoints
resume in any single process.

Every step directory holds `checksums.json`, the SHA-256 of each of its
files, written by the primary before orbax commits the step (all but the two
files orbax writes while committing). Restoring walks the steps from the
newest down: a checkpoint that fails to read, differs from its checksums or
whose data position is not its step's is skipped with a warning, so a
corrupt latest falls back to the one before. A step deleted while it is
being read (by the run writing the workdir, under an evaluation) is not
counted as unreadable: the newest step then listed is tried instead. A
writer removes, on start, step directories that lost files every committed
step has (what a run killed while deleting old checkpoints leaves).

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
import hashlib
import json
import logging
import os
import pathlib
import shutil
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint.path import atomicity_types

from sessa_jax.train.processes import RunProcesses


_TURNS = threading.Lock()
# Each step directory's record of its files' SHA-256.
CHECKSUMS = "checksums.json"
# Files orbax writes while committing a step, after the checksums are taken.
_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
# What every committed step directory holds: orbax's files and the items.
_COMMITTED = _COMMIT_FILES + ("state", "data")
# Suffix of a later step's directory being deleted by `discard_after`.
_DISCARDING = ".discarding"


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


class ChecksumError(ValueError):
  """A checkpoint's file differs from the checksum recorded at its save."""


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def write_checksums(step_dir: pathlib.Path) -> None:
  """Records the SHA-256 of the files under `step_dir` in its `CHECKSUMS`."""
  unsummed = {*_COMMIT_FILES, CHECKSUMS}
  sums = {path.relative_to(step_dir).as_posix(): _sha256(path)
          for path in sorted(step_dir.rglob("*"))
          if path.is_file() and path.relative_to(step_dir).as_posix()
          not in unsummed}
  tmp = step_dir / f".{CHECKSUMS}.tmp"
  tmp.write_text(json.dumps({"sha256": sums}, indent=2) + "\n")
  os.replace(tmp, step_dir / CHECKSUMS)


def verify_checksums(step_dir: pathlib.Path) -> None:
  """Checks the files of `step_dir` against its `CHECKSUMS`, if it has one.

  Raises:
    ChecksumError: a file differs (or is missing); the message names it.
  """
  path = step_dir / CHECKSUMS
  if not path.exists():  # Saved before checksums were recorded.
    return
  for name, digest in json.loads(path.read_text())["sha256"].items():
    file = step_dir / name
    if not file.is_file():
      raise ChecksumError(f"{file} is missing")
    if _sha256(file) != digest:
      raise ChecksumError(f"{file} differs from the checksum saved with it")


def _check_position(data_iter: Any, step: int) -> None:
  """Refuses a data position other than `step` batches (one per step).

  Raises:
    ValueError: the iterator's `next_index` is not `step`.
  """
  position = data_iter.get_state().get("next_index", step)
  if position != step:
    raise ValueError(f"its data iterator is at batch {position} (next_index),"
                     f" not at batch {step} where step {step} leaves it")


def _half_deleted(step_dir: pathlib.Path) -> bool:
  """Whether a step directory lost files that every committed step holds."""
  if not all((step_dir / name).exists() for name in _COMMITTED):
    return True
  manifest = step_dir / CHECKSUMS
  try:
    names = json.loads(manifest.read_text())["sha256"]
  except (OSError, ValueError, KeyError):  # None, or damaged: restore judges.
    return False
  return not all((step_dir / name).exists() for name in names)


def _remove_half_deleted(directory: pathlib.Path) -> None:
  """Deletes what deletions cut short left: half-deleted steps, discards."""
  left = sorted((p for p in directory.iterdir() if p.is_dir() and (
      (p.name.isdigit() and _half_deleted(p))
      or p.name.endswith(_DISCARDING))), key=lambda p: p.name)
  for path in left:
    shutil.rmtree(path)
  if left:
    logging.info("removed %d half-deleted checkpoint director%s in %s (%s), "
                 "left by a run stopped while deleting them", len(left),
                 "y" if len(left) == 1 else "ies", directory,
                 ", ".join(p.name for p in left))


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
    self._saving: int | None = None
    if not read_only and self.processes.is_primary:
      self.directory.mkdir(parents=True, exist_ok=True)
      _remove_half_deleted(self.directory)
    self.processes.sync(f"created {self.directory}")
    options = ocp.CheckpointManagerOptions(
        read_only=read_only, create=False,
        multiprocessing_options=multiprocessing,
        async_options=ocp.options.AsyncOptions(
            create_directories_asynchronously=not subset,
            post_finalization_callback=(None if read_only
                                        else self._record_checksums)),
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

  def all_steps(self, attempts: int = 3) -> list[int]:
    """Steps saved on disk (re-read, so other writers' saves are seen).

    A listing that a writer's deletion cuts short is taken again, up to
    `attempts` times in all.
    """
    for attempt in range(attempts):
      try:
        self._manager.reload()
        break
      except FileNotFoundError:
        if attempt == attempts - 1:
          raise
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
      self._manager.wait_until_finished()
      self._saving = step
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state),
          data=IteratorSave(data_iter)), force=True)
      if _off_main_thread():
        self._manager.wait_until_finished()

  def _record_checksums(self) -> None:
    """orbax's callback before it commits a save (primary): `CHECKSUMS`."""
    write_checksums(self.directory
                    / f"{self._saving}{atomicity_types.TMP_DIR_SUFFIX}")

  def restore(self, abstract_state: Any, data_iter: Any = None,
              accept: Callable[[Any], bool] | None = None, *,
              step: int | None = None) -> tuple[int, Any]:
    """Restores the newest readable checkpoint, or the one at `step`.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings; the
        restored arrays take these shapes, dtypes and shardings.
      data_iter: the grain iterator, whose position is set in place and
        must be the checkpoint's step (one batch per step); None restores the
        state alone.
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
    items = {"state": ocp.args.PyTreeRestore(
        abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract_state))}
    if data_iter is not None:
      items["data"] = IteratorRestore(data_iter)
    unreadable, reasons, tried = [], {}, set()
    while (candidate := self._next_candidate(step, tried)) is not None:
      tried.add(candidate)
      try:
        verify_checksums(self.directory / str(candidate))
        with _turn():
          restored = self._manager.restore(candidate,
                                           args=ocp.args.Composite(**items))
        if accept is not None and not accept(restored["state"]):
          raise ValueError("it holds non-finite values")
        if data_iter is not None:
          _check_position(data_iter, candidate)
      except Exception as e:  # pylint: disable=broad-except
        if not (self.directory / str(candidate)).exists():
          logging.info("checkpoint %s/%d was deleted while being read; trying"
                       " the newest one left", self.directory, candidate)
          continue
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

  def _next_candidate(self, step: int | None, tried: set[int]) -> int | None:
    """The newest saved step not yet tried (only `step`, if given).

    Raises:
      FileNotFoundError: `step` is not among the saved steps.
    """
    saved = self.all_steps()
    if step is None:
      return max(set(saved) - tried, default=None)
    if step not in saved:
      raise FileNotFoundError(
          f"no checkpoint of step {step} in {self.directory}; saved steps: "
          f"{', '.join(map(str, saved)) or 'none'}")
    return None if step in tried else step

  def discard_after(self, step: int) -> list[int]:
    """Deletes the checkpoints newer than `step`, naming them first.

    Returns:
      The deleted steps.
    """
    later = [s for s in self.all_steps() if s > step]
    if later and self.processes.is_primary:
      logging.warning("deleting the checkpoints of steps %s in %s, newer than "
                      "the restored step %d", ", ".join(map(str, later)),
                      self.directory, step)
      for s in later:
        doomed = self.directory / f"{s}{_DISCARDING}"
        (self.directory / str(s)).rename(doomed)
        shutil.rmtree(doomed)
    self.processes.sync(f"discarded after {step} in {self.directory}")
    self._manager.reload()
    return later

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
