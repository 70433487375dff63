"""Hands a sweep's points to the sub-meshes that train them, each point once.

In one process (or when every process trains every point together) a
counter under a lock is enough. When groups of processes (one process, or
some whole hosts) train their own points on their own devices, they share
one queue through `jax.distributed`'s key-value store: an atomic counter
gives out the points in sweep order, so every point runs exactly once across
the job and an idle sub-mesh on any host takes the next one; a group's
primary takes the point and tells the others. A stop (SIGTERM) on one
process is posted there too, so no group starts another point, and at the
end each process posts the rows of the points it ran, so that all of them
return the whole sweep's results.
"""

from __future__ import annotations

import itertools
import json
import threading
from typing import Any, Sequence

import jax

from sessa_jax.train import processes as processes_lib
from sessa_jax.train.processes import RunProcesses

# Names each shared queue's keys, in the order processes create them (the
# same on every process, as all of them run the same sweeps in order).
_QUEUES = itertools.count()


class PointQueue:
  """The points not yet handed out, and whether the sweep is stopping.

  Args:
    names: the points, in the order they are handed out.
    group: the processes that train each point this process takes, together
      (default: this one); they all call `next` as often.
    shared: share the queue with the other groups of processes; every
      process must create its shared queues in the same order.
  """

  def __init__(self, names: Sequence[str], *,
               group: RunProcesses | None = None, shared: bool):
    self._names = list(names)
    self._group = group or RunProcesses.this_one()
    self._lock = threading.Lock()
    self._taken = 0
    self._stopped = False
    self._client = processes_lib.store() if shared else None
    self._key = f"sessa_jax/sweep{next(_QUEUES)}" if shared else None

  def next(self) -> str | None:
    """The next point to train, or None when all are taken or stopping."""
    with self._lock:
      i = len(self._names)
      if self._group.is_primary and not self.stopped():
        i = self._take()
      i = self._group.broadcast_from_primary(i)
      return self._names[i] if i < len(self._names) else None

  def _take(self) -> int:
    """The next point's position (past the end when all are taken)."""
    if self._client is None:
      i, self._taken = self._taken, self._taken + 1
      return i
    return self._client.key_value_increment(f"{self._key}/next", 1) - 1

  def stop(self) -> None:
    """Hands out no more points, here and (shared) in every process."""
    if not self._stopped and self._client is not None:
      self._client.key_value_set(f"{self._key}/stop/{jax.process_index()}",
                                 "SIGTERM", allow_overwrite=True)
    self._stopped = True

  def stopped(self) -> bool:
    if not self._stopped and self._client is not None:
      self._stopped = bool(self._client.key_value_dir_get(
          f"{self._key}/stop"))
    return self._stopped

  def gather(self, rows: dict[str, Any]) -> dict[str, Any]:
    """The rows of the points every process ran (waits for them all).

    Args:
      rows: point name -> result row (JSON-able) of the points this process
        ran.

    Returns:
      The union over processes; unchanged when the queue is not shared.
    """
    if self._client is None:
      return rows
    self._client.key_value_set(f"{self._key}/rows/{jax.process_index()}",
                               json.dumps(rows))
    every = {}
    for process in range(jax.process_count()):
      every.update(json.loads(processes_lib.wait_for(
          f"{self._key}/rows/{process}")))
    return every
