"""Hands a sweep's points to the sub-meshes that train them, each point once.

In one process (or when every process trains every point together) a list
under a lock is enough. When each process trains its own points on its own
devices, the processes share one queue through `jax.distributed`'s key-value
store: an atomic counter gives out the points in sweep order, so every point
runs exactly once across the job and an idle sub-mesh on any host takes the
next one. A stop (SIGTERM) on one process is posted there too, so no process
starts another point, and at the end each process posts the rows of the
points it ran, so that all of them return the whole sweep's results.
"""

from __future__ import annotations

import itertools
import json
import threading
from typing import Any, Sequence

import jax
from jax._src import distributed  # The key-value store has no public API.

# Names each shared queue's keys, in the order processes create them (the
# same on every process, as all of them run the same sweeps in order).
_QUEUES = itertools.count()
# How long one wait for another process's rows blocks before it is renewed.
_WAIT_MS = 600_000


class PointQueue:
  """The points not yet handed out, and whether the sweep is stopping.

  Args:
    names: the points, in the order they are handed out.
    shared: share the queue with the other processes (each process then
      trains the points it takes, alone); every process must create its
      shared queues in the same order.
  """

  def __init__(self, names: Sequence[str], *, shared: bool):
    self._names = list(names)
    self._lock = threading.Lock()
    self._taken = 0
    self._stopped = False
    self._client = distributed.global_state.client if shared else None
    self._key = f"sessa_jax/sweep{next(_QUEUES)}" if shared else None

  def next(self) -> str | None:
    """The next point to train, or None when all are taken or stopping."""
    with self._lock:
      if self.stopped():
        return None
      if self._client is None:
        i, self._taken = self._taken, self._taken + 1
      else:
        i = self._client.key_value_increment(f"{self._key}/next", 1) - 1
      return self._names[i] if i < len(self._names) else None

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
      every.update(json.loads(self._wait_for(f"{self._key}/rows/{process}")))
    return every

  def _wait_for(self, key: str) -> str:
    """The value at `key`, once some process has set it (however late)."""
    while True:
      try:
        return self._client.blocking_key_value_get(key, _WAIT_MS)
      except jax.errors.JaxRuntimeError as e:
        if "DEADLINE_EXCEEDED" not in str(e):
          raise
