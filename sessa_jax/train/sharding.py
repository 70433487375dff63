"""Device mesh, logical-axis rules and multi-host start-up.

Parameters carry logical axis names in their `out_sharding` metadata
('embed', 'hidden', 'vocab' or None per dimension). `LOGICAL_RULES` maps
them onto the mesh ('data', 'fsdp', 'tensor'): parameters are split along
'embed' over 'fsdp' (ZeRO-3 style) and along 'hidden'/'vocab' over 'tensor'
(Megatron style); activations split their batch over ('data', 'fsdp').
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sessa_jax.mesh_axes import BATCH_AXES, MESH_AXES
from sessa_jax.train.config import MeshConfig

LOGICAL_RULES: Mapping[str, Any] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "hidden": "tensor",
    "vocab": "tensor",
}


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
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
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
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
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


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int],
                    mesh: jax.sharding.Mesh) -> P:
  """PartitionSpec for an array with the given logical axis names.

  A dimension whose size the mesh axes do not divide stays replicated (e.g. an
  odd vocabulary under tensor=2), as does any axis of size 1.

  Args:
    names: one logical name (or None) per dimension; None replicates all.
    shape: the array's shape.
    mesh: the device mesh.

  Returns:
    The PartitionSpec.
  """
  if not names:
    return P()
  if len(names) != len(shape):
    raise ValueError(
        f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
  spec = []
  used = set()
  for name, size in zip(names, shape):
    axes = LOGICAL_RULES.get(name) if name is not None else None
    if name is not None and name not in LOGICAL_RULES:
      raise ValueError(f"unknown logical axis {name!r}; known: "
                       f"{', '.join(LOGICAL_RULES)}")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
    if not axes or size % int(np.prod([mesh.shape[a] for a in axes])):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


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


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh
                ) -> dict[str, jax.Array]:
  """Assembles each process's part of a batch into global sharded arrays.

  Args:
    local_batch: this process's rows (leading dim batch_size / process_count).
    mesh: the device mesh.

  Returns:
    dict of global arrays sharded by `batch_sharding`.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
