"""The processes that take part in one run: those that own its devices.

A run on all devices (the usual case) involves every process of a
multi-process job; a packed sweep's point on one host's devices involves
that host's process alone, which then trains it like a single-process run:
reading the whole batch, writing the workdir's files, checkpointing and
stopping without waiting on anyone. `RunProcesses` is that set, and what the
trainer asks instead of `jax.process_index()` / `jax.process_count()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
from jax.experimental import multihost_utils


@dataclasses.dataclass(frozen=True)
class RunProcesses:
  """The sorted indices of the processes that own a run's devices.

  Attributes:
    indices: `jax.process_index()` values, ascending; either one process or
      every process of the job.
  """

  indices: tuple[int, ...]

  def __post_init__(self):
    if len(self.indices) not in (1, jax.process_count()):
      raise ValueError(
          f"a run's devices belong to processes {list(self.indices)}; they "
          f"must belong to one process or to all {jax.process_count()}")

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

  def sync(self, name: str) -> None:
    """A barrier across these processes (none for one process)."""
    if self.count > 1:
      multihost_utils.sync_global_devices(name)

  def broadcast_from_primary(self, value: int) -> int:
    """The primary's `value`, on every one of these processes."""
    if self.count == 1:
      return value
    return int(multihost_utils.broadcast_one_to_all(value))
