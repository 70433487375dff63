"""One run per workdir: an exclusive lock file naming its holder.

`WORKDIR/run.lock` holds the host and PID of the process that owns the
workdir, and that process keeps an `fcntl.flock` on it for as long as it runs.
The kernel drops the flock when the holder dies (even by kill -9), so a lock
file whose flock can be taken again was left by a dead process: it is taken
over with a warning. A file naming another host cannot be judged that way on
filesystems that do not share locks between hosts, so it is refused and the
message says which file to remove if that process is gone. When several
processes run together, the first of them takes the lock for all.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pathlib
import socket
import time

import numpy as np

from sessa_jax.train.processes import RunProcesses

LOCK_NAME = "run.lock"


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir."""


def _read_holder(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  raw = os.read(fd, 4096).decode("utf-8", "replace")
  try:
    holder = json.loads(raw)
  except json.JSONDecodeError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
  if not holder:
    return "another process"
  return f"pid {holder.get('pid')} on host {holder.get('host')}"


def _fate(pid) -> str:
  """What became of the process that left a lock file nobody holds."""
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return "has exited"
  except PermissionError:  # Alive, another user's.
    pass
  except (TypeError, ValueError, OverflowError):
    return "is unknown"
  return "no longer holds it (that PID now names another process)"


class WorkdirLock:
  """Holds `workdir/run.lock` from `acquire()` until `release()`.

  Args:
    workdir: the run (or sweep) directory; created by `acquire`.
    processes: the processes running there together (default: all); the
      first takes the lock.
  """

  def __init__(self, workdir: str | pathlib.Path,
               processes: RunProcesses | None = None):
    self.path = pathlib.Path(workdir) / LOCK_NAME
    self.processes = processes or RunProcesses.everyone()
    self._fd = None

  def acquire(self) -> None:
    """Takes the lock (the primary process; all of them learn the outcome).

    Raises:
      WorkdirLockedError: naming the holder, when another process has it.
    """
    error = ""
    if self.processes.is_primary:
      try:
        self._take()
      except WorkdirLockedError as e:
        error = str(e)
    failed = self.processes.broadcast_from_primary(np.int32(bool(error)))
    if failed and not error:
      error = f"process {self.processes.primary} could not take {self.path}"
    if error:
      raise WorkdirLockedError(error)

  def _take(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise WorkdirLockedError(
            f"{self.path.parent} is in use by {_describe(holder)} (lock file "
            f"{self.path}); wait for that run to end, or use another "
            "--workdir") from None
      try:
        same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same_file = False
      if not same_file:  # The holder removed it as we opened it: retry.
        os.close(fd)
        continue
      holder = _read_holder(fd)
      if holder and holder.get("host") != host:
        os.close(fd)
        raise WorkdirLockedError(
            f"{self.path.parent} may be in use by {_describe(holder)} (lock "
            f"file {self.path}); if that process is gone, remove {self.path} "
            "and relaunch")
      if holder:
        logging.warning("taking over %s, left by %s, which %s", self.path,
                        _describe(holder), _fate(holder.get("pid")))
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      os.write(fd, json.dumps({"host": host, "pid": os.getpid(),
                               "since": time.time()}).encode() + b"\n")
      self._fd = fd
      return

  def release(self) -> None:
    """Removes the lock file and drops the lock (no-op if not held)."""
    if self._fd is None:
      return
    try:
      self.path.unlink()
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()
