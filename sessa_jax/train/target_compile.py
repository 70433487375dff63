"""Deviceless compiles: the real XLA:GPU or XLA:TPU compiler, on a CPU.

`devices(target)` gives stand-ins for the target's chips (an H200, or every
chip of a TPU slice) from XLA's topology descriptions; programs lowered with
shardings over them compile with the target's own compiler (Triton for the
Pallas GPU kernels, Mosaic for the TPU ones), which checks shared memory,
registers and VMEM and reports memory per device and FLOPs. Nothing runs.

The compilers ship with the accelerator builds of jaxlib: the `cuda` extra
(JAX's CUDA plugin) for GPU targets and the `tpu` extra (libtpu) for TPU
ones; `make dry-run` installs each into an environment of its own. The
process itself must run on CPU (`prepare` sets that up before JAX starts).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re

import jax
from jax.experimental import topologies

from sessa_jax import targets

# The cuDNN and CUDA versions the GPU compiler is told the target has.
_DNN_VERSION = (9, 8)
_CUDA_VERSION = (12, 8)
_INSTALL = {"gpu": "cuda", "tpu": "tpu"}
_HOST_CHIPS = [2, 2, 1]  # libtpu's default chips per host.


class CompilerMissing(RuntimeError):
  """The target's compiler (an accelerator jaxlib plugin) is not installed."""


class KernelTooLarge(RuntimeError):
  """A kernel asks for more on-chip memory than the target has."""


def prepare(target: targets.Target) -> None:
  """Sets the environment a deviceless compile for `target` needs.

  Call before JAX initialises its backends: the process runs on CPU, and
  libtpu is told it is one worker of a slice with no metadata server.
  """
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")
  if target.platform == "gpu":
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  elif target.platform == "tpu":
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")


def compiler_installed(target: targets.Target) -> bool:
  """Whether this environment has the compiler of `target`'s platform."""
  if target.platform == "gpu":
    return importlib.util.find_spec("jax_plugins") is not None and any(
        importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None
        for v in (12, 13))
  return importlib.util.find_spec("libtpu") is not None


def gpu_target_config(spec: targets.GpuSpec) -> str:
  """The XLA GpuTargetConfig text proto of a GPU."""
  major, minor = spec.compute_capability
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {spec.smem_per_block_optin}
  shared_memory_per_core: {spec.smem_per_core}
  threads_per_core_limit: 2048
  core_count: {spec.cores}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {spec.memory_bandwidth}
  l2_cache_size: {spec.l2_bytes}
  clock_rate_ghz: {spec.clock_ghz}
  device_memory_size: {spec.memory_bytes}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {_DNN_VERSION[0]} minor: {_DNN_VERSION[1]} }}
runtime_version {{ major: {_CUDA_VERSION[0]} minor: {_CUDA_VERSION[1]} }}
device_description_str: "{spec.description}"
"""


def devices(target: targets.Target | str) -> list[jax.Device]:
  """Stand-ins for the target's chips, for shardings of a compile.

  Raises:
    CompilerMissing: naming the command that installs the compiler.
  """
  target = targets.parse(target) if isinstance(target, str) else target
  if not compiler_installed(target):
    raise CompilerMissing(
        f"compiling for {target.name} needs the {target.platform.upper()} "
        f"compiler: run `make dry-run TARGET={target.name} ...` (it installs "
        f"it into .venv-{_INSTALL[target.platform]}), or pip install -e "
        f"'.[{_INSTALL[target.platform]}]' in a separate environment")
  if target.platform == "gpu":
    spec = targets.GPUS[target.name.partition("x")[0]]
    topology = topologies.get_topology_desc(
        platform="cuda", topology=target.topology,
        target_config=gpu_target_config(spec))
  else:
    dims = [int(d) for d in target.topology.split("x")]
    dims += [1] * (3 - len(dims))
    # Hosts hold 2x2x1 chips unless the slice is smaller than one host.
    bounds = [min(d, b) for d, b in zip(dims, _HOST_CHIPS)]
    kwargs = {} if bounds == _HOST_CHIPS else {"chips_per_host_bounds": bounds}
    topology = topologies.get_topology_desc(target.name, "tpu", **kwargs)
  return list(topology.devices)


_SMEM = re.compile(r"Shared memory size limit exceeded: requested (\d+), "
                   r"available: (\d+)")
_VMEM = re.compile(
    r"scoped ?vmem ?oom|memory space vmem|vmem.{0,40}(limit|exceed|oom)",
    re.IGNORECASE)


def compile_traced_kernels(device: jax.Device):
  """Compiles each Pallas kernel traced for the active target alone.

  Args:
    device: one of the target's `devices`, to compile on.

  Yields:
    (kernel name, None if it compiled, else the exception).
  """
  sharding = jax.sharding.SingleDeviceSharding(device)
  for name, call, shapes in targets.traced_kernels():
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
            for s in shapes]
    try:
      jax.jit(call).lower(*args).compile()
      yield name, None
    except Exception as e:  # pylint: disable=broad-except
      yield name, e


def _culprit(device: jax.Device) -> str | None:
  """The first traced kernel that fails to compile alone, with its
  compiler's first line."""
  for name, error in compile_traced_kernels(device):
    if error is not None:
      return f"{name}: {str(error).strip().splitlines()[0][:300]}"
  return None


def explain(error: Exception, target: targets.Target,
            device: jax.Device | None = None) -> str:
  """One line naming why a compile for `target` failed.

  On-chip memory errors (shared memory, VMEM) name no kernel; given one of
  the target's `device`s, each Pallas kernel traced for the target is
  compiled alone to find the one that fails.
  """
  text = str(error).strip()
  first = text.splitlines()[0][:400] if text else repr(error)
  smem = _SMEM.search(text)
  if not smem and not _VMEM.search(text):
    return f"{type(error).__name__}: {first}"
  culprit = _culprit(device) if device is not None else None
  if smem:
    return (f"{culprit or 'a Pallas GPU kernel'} asks for "
            f"{int(smem.group(1)):,} bytes of shared memory per block; "
            f"{target.name} has {int(smem.group(2)):,}")
  return f"{culprit or first} ({target.name}'s VMEM)"


@contextlib.contextmanager
def compiling(target: targets.Target, device: jax.Device):
  """Traces for `target` and turns on-chip memory failures into one line.

  Args:
    target: the chip compiled for.
    device: one of its `devices`, to compile suspect kernels alone on.

  Raises:
    KernelTooLarge: when the target's compiler refused a kernel's memory.
  """
  with targets.compiling_for(target):
    try:
      yield
    except jax.errors.JaxRuntimeError as e:
      if _SMEM.search(str(e)) or _VMEM.search(str(e)):
        raise KernelTooLarge(explain(e, target, device)) from None
      raise
