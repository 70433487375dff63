"""What XLA says about a compiled program: memory per device and FLOPs."""

from __future__ import annotations

from typing import Any

import jax

# CompiledMemoryStats fields, reported per device.
_MEMORY_FIELDS = {
    "argument_bytes": "argument_size_in_bytes",
    "output_bytes": "output_size_in_bytes",
    "temp_bytes": "temp_size_in_bytes",
    "alias_bytes": "alias_size_in_bytes",
    "generated_code_bytes": "generated_code_size_in_bytes",
}


def analyze(compiled: jax.stages.Compiled) -> dict[str, Any]:
  """Memory and cost analysis of a compiled (SPMD) program, per device.

  Args:
    compiled: e.g. `jax.jit(f).lower(*args).compile()`.

  Returns:
    dict with, for one device's share of the program: `argument_bytes`,
    `output_bytes`, `temp_bytes` (XLA's scratch), `alias_bytes` (outputs that
    reuse donated arguments' buffers), `generated_code_bytes`, `peak_bytes`
    (arguments + outputs + temporaries - aliased, XLA's own estimate of what
    must be resident at once), `flops` and `bytes_accessed` (XLA's cost
    model; None where the backend gives no figure).
  """
  memory = compiled.memory_analysis()
  out: dict[str, Any] = {
      name: (None if memory is None else getattr(memory, field, None))
      for name, field in _MEMORY_FIELDS.items()}
  parts = [out[k] for k in ("argument_bytes", "output_bytes", "temp_bytes")]
  if None not in parts:
    out["peak_bytes"] = sum(parts) - (out["alias_bytes"] or 0)
  else:
    out["peak_bytes"] = None
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else None
  cost = cost or {}
  flops = cost.get("flops")
  out["flops"] = None if flops is None or flops < 0 else float(flops)
  accessed = cost.get("bytes accessed")
  out["bytes_accessed"] = None if accessed is None else float(accessed)
  return out


def _mib(n: int | float | None) -> str:
  return "?" if n is None else f"{n / 2**20:,.1f} MiB"


def format_analysis(stats: dict[str, Any],
                    memory_bytes: int | None = None) -> str:
  """Two lines for a log: memory per device (against the chip's
  `memory_bytes`, when known), then FLOPs."""
  peak = stats["peak_bytes"]
  memory = (f"memory per device: arguments {_mib(stats['argument_bytes'])}, "
            f"outputs {_mib(stats['output_bytes'])}, temporaries "
            f"{_mib(stats['temp_bytes'])}, aliased {_mib(stats['alias_bytes'])}"
            f", peak {_mib(peak)}")
  if memory_bytes and peak is not None:
    memory += (f" of {memory_bytes / 2**30:,.1f} GiB ({peak / memory_bytes:.0%}"
               f"; {'fits' if peak <= memory_bytes else 'does NOT fit'})")
  flops = stats["flops"]
  cost = ("FLOPs per device (XLA cost model): "
          + ("?" if flops is None else f"{flops:.4g}"))
  return memory + "\n" + cost
