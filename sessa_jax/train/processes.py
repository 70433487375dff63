"""The processes that take part in one run: those that own its devices.

A run on all devices (the usual case) involves every process of a
multi-process job; a packed sweep's point on one host's devices involves
that host's process alone, which then trains it like a single-process run:
reading the whole batch, writing the workdir's files, checkpointing and
stopping without waiting on anyone; a point on some whole hosts involves
their processes only. `RunProcesses` is that set, and what the trainer asks
instead of `jax.process_index()` / `jax.process_count()`.

Processes of a subset meet through `jax.distributed`'s key-value store and
barriers (keys named by the subset, so that subsets running at the same time
never share one), and agree on a flag with a reduction over one device of
each.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import distributed  # The key-value store has no public API.
from jax.experimental import multihost_utils

# How long one wait at a barrier or for a key blocks before it is renewed.
_WAIT_MS = 600_000
# Broadcasts made so far by each subset, naming the keys of the next one.
_BROADCASTS: collections.Counter = collections.Counter()
_BROADCASTS_LOCK = threading.Lock()


def store():
  """The `jax.distributed` client: its key-value store and barriers."""
  return distributed.global_state.client


def wait_for(key: str) -> str:
  """The value at `key` in the store, once some process has set it."""
  while True:
    try:
      return store().blocking_key_value_get(key, _WAIT_MS)
    except jax.errors.JaxRuntimeError as e:
      if "DEADLINE_EXCEEDED" not in str(e):
        raise


@dataclasses.dataclass(frozen=True)
class RunProcesses:
  """The sorted indices of the processes that own a run's devices.

  Attributes:
    indices: `jax.process_index()` values, ascending.
  """

  indices: tuple[int, ...]

  @classmethod
  def of(cls, devices: Iterable[Any]) -> RunProcesses:
    """The processes owning `devices` (anything with `process_index`)."""
    return cls(tuple(sorted({d.process_index for d in devices})))

  @classmethod
  def everyone(cls) -> RunProcesses:
    return cls(tuple(range(jax.process_count())))

  @classmethod
  def this_one(cls) -> RunProcesses:
    return cls((jax.process_index(),))

  @property
  def count(self) -> int:
    return len(self.indices)

  @property
  def index(self) -> int:
    """This process's position among them (its share of the batch)."""
    return self.indices.index(jax.process_index())

  @property
  def primary(self) -> int:
    """The process that writes the run's files and takes its lock."""
    return self.indices[0]

  @property
  def is_everyone(self) -> bool:
    return self.count == jax.process_count()

  @property
  def is_primary(self) -> bool:
    return jax.process_index() == self.primary

  @property
  def name(self) -> str:
    """Names this set's keys in the store, e.g. 'processes_2-3'."""
    return "processes_" + "-".join(map(str, self.indices))

  def sync(self, name: str) -> None:
    """A barrier across these processes (none for one process)."""
    if self.count == 1:
      return
    if self.is_everyone:
      multihost_utils.sync_global_devices(name)
    else:
      store().wait_at_barrier(f"{self.name}/{name}", _WAIT_MS,
                              process_ids=list(self.indices))

  def broadcast_from_primary(self, value: int) -> int:
    """The primary's `value`, on every one of these processes."""
    if self.count == 1:
      return int(value)
    if self.is_everyone:
      return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
    with _BROADCASTS_LOCK:
      key = f"sessa_jax/{self.name}/broadcast{_BROADCASTS[self.indices]}"
      _BROADCASTS[self.indices] += 1
    if self.is_primary:
      store().key_value_set(key, str(int(value)))
      return int(value)
    return int(wait_for(key))

  def any(self, flag: bool) -> bool:
    """Whether `flag` is True on any of these processes (all of them call)."""
    if self.count == 1:
      return flag
    sharding, reduce = _any_reduction(self.indices)
    local = np.array([flag], np.int32)
    return bool(reduce(jax.make_array_from_process_local_data(sharding,
                                                              local)))


@functools.cache
def _any_reduction(indices: tuple[int, ...]):
  """(sharding of one flag per process, jitted max over them)."""
  first = {}
  for d in jax.devices():
    if d.process_index in indices:
      first.setdefault(d.process_index, d)
  mesh = jax.sharding.Mesh(np.array([first[i] for i in indices]),
                           ("processes",))
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("processes"))
  reduce = jax.jit(jnp.max, out_shardings=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  return sharding, reduce
