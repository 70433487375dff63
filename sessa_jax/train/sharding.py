"""Device mesh, state and batch layouts, and multi-host start-up.

Parameters carry logical axis names in their `out_sharding` metadata and
activations are constrained by logical names inside the model; the one table
mapping both onto the mesh ('data', 'fsdp', 'tensor') is
`sessa_jax.models.partitioning.LOGICAL_RULES`. Traced steps run under
`with_abstract_mesh`, which lets those activation constraints (and the
per-batch-shard feedback solve) see the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sessa_jax.mesh_axes import MESH_AXES
from sessa_jax.models.partitioning import LOGICAL_RULES, logical_to_spec
from sessa_jax.train.config import MeshConfig


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           auto: bool = False) -> None:
  """Starts `jax.distributed` when this run spans several processes.

  Arguments left as None fall back to the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. With no
  coordinator at all, `auto` lets JAX detect the cluster (Cloud TPU, SLURM,
  Open MPI); otherwise the run is single-process and nothing happens.

  Args:
    coordinator_address: 'host:port' of process 0.
    num_processes: total number of processes.
    process_id: index of this process.
    auto: call `jax.distributed.initialize()` with cluster auto-detection.
  """
  env = os.environ
  coordinator_address = (coordinator_address
                         or env.get("JAX_COORDINATOR_ADDRESS"))
  if num_processes is None and "JAX_NUM_PROCESSES" in env:
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in env:
    process_id = int(env["JAX_PROCESS_ID"])
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif auto:
    jax.distributed.initialize()
  else:
    return
  logging.info("jax.distributed: process %d of %d, %d local / %d global "
               "devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def mesh_shape(mc: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 in the mesh config against the device count.

  Args:
    mc: the mesh config.
    num_devices: devices available (all processes).

  Returns:
    (data, fsdp, tensor) whose product is `num_devices`.
  """
  sizes = list(dataclasses.astuple(mc))
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {dataclasses.asdict(mc)}: {num_devices} devices "
                       f"are not divisible by the fixed axes ({known})")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dataclasses.asdict(mc)} needs "
                     f"{int(np.prod(sizes))} devices, but {num_devices} are "
                     "available")
  return tuple(sizes)


def make_mesh(mc: MeshConfig, devices: Sequence[jax.Device] | None = None
             ) -> jax.sharding.Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over all (or the given) devices."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(mc, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def state_shardings(abstract_state: nnx.State, mesh: jax.sharding.Mesh):
  """NamedShardings for every variable of an abstract nnx state.

  Args:
    abstract_state: an `nnx.State` from `nnx.eval_shape` (Variables whose
      metadata may hold `out_sharding` logical names).
    mesh: the device mesh.

  Returns:
    A pure-dict tree (as `nnx.to_pure_dict`) of NamedShardings.
  """
  def one(v):
    names = v.get_metadata().get("out_sharding")
    return NamedSharding(mesh, logical_to_spec(names, v.shape, mesh))
  specs = jax.tree.map(one, abstract_state,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of a (batch, ...) array: batch over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(LOGICAL_RULES["batch"]))


def with_abstract_mesh(fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """`fn` traced with `mesh` as the abstract mesh (`get_abstract_mesh`).

  Inside, `partitioning.constrain` lays activations out by their logical
  names and the feedback solve runs per batch shard. The context is
  thread-local and entered while tracing, so steps of different meshes (e.g.
  packed sweep points in threads) never see each other's mesh.
  """
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh
                ) -> dict[str, jax.Array]:
  """Assembles each process's part of a batch into global sharded arrays.

  Args:
    local_batch: this process's rows (leading dim batch_size divided by the
      number of processes owning the mesh's devices).
    mesh: the device mesh.

  Returns:
    dict of global arrays sharded by `batch_sharding`.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
