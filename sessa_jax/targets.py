"""The chip a program is compiled for, which need not be the local one.

Kernel choices (Triton or Mosaic kernels, their tile sizes, cuDNN attention,
the SSD's state passing) follow `active()`: the target set by
`compiling_for`, else the chip this process runs on. A deviceless compile
(`sessa_jax.train.target_compile`) sets it to an H200 or a TPU slice while
the process itself runs on CPU.

Target names: `h200`, `h100`, `a100` (one GPU), `h200x8` (8 GPUs of one
host), and TPU topologies `<generation>:<chips>` such as `v5e:2x2`,
`v6e:4x4`, `v5p:2x2x2`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Target:
  """What kernel and memory decisions need to know of a chip.

  Attributes:
    name: the target's name (`h200`, `v5e:2x2`, or `local:<device kind>`).
    platform: `gpu`, `tpu` or `cpu`.
    memory_bytes: device memory per chip (None: unknown).
    smem_bytes: GPU only: shared memory one thread block may use (opt-in).
    compute_capability: GPU only: e.g. (9, 0).
    topology: TPU: the chips' arrangement, e.g. `2x2`; GPU: XLA's
      `slices x hosts x GPUs per host`, e.g. `1x1x8`.
    chips: chips the target spans.
  """
  name: str
  platform: str
  memory_bytes: int | None = None
  smem_bytes: int | None = None
  compute_capability: tuple[int, int] | None = None
  topology: str | None = None
  chips: int = 1


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """The figures of a GPU that XLA's deviceless compiler needs."""
  description: str
  compute_capability: tuple[int, int]
  cores: int
  memory_bytes: int
  smem_per_block_optin: int
  smem_per_core: int
  clock_ghz: float
  memory_bandwidth: int
  l2_bytes: int


GPUS = {
    "h200": GpuSpec("NVIDIA H200", (9, 0), 132, 143_771 << 20, 232_448,
                    233_472, 1.98, 4_800_000_000_000, 50 << 20),
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 81_559 << 20,
                    232_448, 233_472, 1.98, 3_352_320_000_000, 50 << 20),
    "a100": GpuSpec("NVIDIA A100-SXM4-80GB", (8, 0), 108, 81_920 << 20,
                    166_912, 167_936, 1.41, 2_039_000_000_000, 40 << 20),
}
# Shared memory per block (opt-in) by compute capability, for a local GPU
# whose name is not in GPUS.
SMEM_BY_CAPABILITY = {(9, 0): 232_448, (8, 0): 166_912, (8, 6): 101_376,
                      (8, 9): 101_376, (7, 5): 65_536, (7, 0): 98_304}
# HBM per chip of each TPU generation.
TPUS = {"v5e": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}

_ACTIVE = contextvars.ContextVar("sessa_jax_target", default=None)
_TRACED = contextvars.ContextVar("sessa_jax_traced_kernels", default=None)


def _chip_count(topology: str) -> int:
  count = 1
  for part in topology.split("x"):
    count *= int(part)
  return count


def parse(name: str) -> Target:
  """The target called `name` (see the module docstring).

  Raises:
    ValueError: naming the choices when `name` is not a known target.
  """
  key = name.strip().lower()
  gpu, _, count = key.partition("x")
  if gpu in GPUS and (not count or count.isdigit() and int(count) > 0):
    spec, chips = GPUS[gpu], int(count or 1)
    return Target(key, "gpu", spec.memory_bytes, spec.smem_per_block_optin,
                  spec.compute_capability, f"1x1x{chips}", chips)
  generation, _, topology = key.partition(":")
  if generation in TPUS and topology:
    parts = topology.split("x")
    if len(parts) in (2, 3) and all(p.isdigit() and int(p) > 0
                                    for p in parts):
      return Target(key, "tpu", TPUS[generation], topology=topology,
                    chips=_chip_count(topology))
  raise ValueError(
      f"target {name!r} is not one of: {', '.join(GPUS)} (one GPU; "
      f"h200x8: 8 of one host), or a TPU topology <generation>:<chips> "
      f"with generation one of {', '.join(TPUS)} (e.g. v5e:2x2, v5p:2x2x2)")


def local() -> Target:
  """The chip this process runs on (its first device)."""
  device = jax.devices()[0]
  kind = _platform(device.platform)
  memory = None
  if kind != "cpu":
    memory = (device.memory_stats() or {}).get("bytes_limit")
  name = f"local:{device.device_kind}"
  if kind == "gpu":
    capability = tuple(int(x) for x in
                       str(device.compute_capability).split("."))
    return Target(name, "gpu", memory,
                  SMEM_BY_CAPABILITY.get(capability, 101_376), capability)
  return Target(name, kind, memory, chips=jax.device_count())


def active() -> Target:
  """The target kernels are chosen for: `compiling_for`'s, else `local()`."""
  target = _ACTIVE.get()
  return local() if target is None else target


def _platform(name: str) -> str:
  """A JAX platform name as `gpu`, `tpu` or `cpu`."""
  return name if name in ("tpu", "cpu") else "gpu"


def platform() -> str:
  """`gpu`, `tpu` or `cpu`: the active target's platform."""
  target = _ACTIVE.get()
  if target is None:
    return _platform(jax.default_backend())
  return target.platform


@contextlib.contextmanager
def compiling_for(target: Target | str):
  """Within the block, kernels are chosen (and traced) for `target`.

  Pallas kernels traced inside are listed by `traced_kernels`, so that a
  compile failure can be pinned on one of them.
  """
  token = _ACTIVE.set(parse(target) if isinstance(target, str) else target)
  traced = _TRACED.set([])
  try:
    yield
  finally:
    _TRACED.reset(traced)
    _ACTIVE.reset(token)


def traced(name: str, call):
  """`call` (a pallas_call), noting its operands' shapes when traced inside
  `compiling_for`."""
  def wrapper(*operands):
    log = _TRACED.get()
    if log is not None:
      log.append((name, call, [jax.ShapeDtypeStruct(x.shape, x.dtype)
                               for x in operands]))
    return call(*operands)
  return wrapper


def traced_kernels() -> list:
  """(name, pallas_call, operand shapes) of each kernel traced so far
  inside `compiling_for`; empty outside it."""
  return list(_TRACED.get() or [])
