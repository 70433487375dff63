"""Metric logging (tensorboardX + metrics.jsonl) and model-FLOPs utilisation."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Mapping

import jax

# Dense bfloat16 peak FLOP/s per chip, by device_kind prefix (vendor data).
# float32 matmuls on GPU run on TF32 tensor cores at half the bf16 rate.
_PEAK_BF16 = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12), ("TPU v2", 45e12),
    ("NVIDIA B200", 2250e12), ("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12), ("NVIDIA L4", 121e12), ("NVIDIA A10", 125e12),
)
# A CPU core: two 512-bit FMA units at ~2.5 GHz in float32 (rough).
_CPU_CORE_F32 = 2 * 16 * 2 * 2.5e9


def peak_flops(device: jax.Device | None = None,
               dtype: str = "bfloat16") -> float:
  """Rough peak FLOP/s of one device, for MFU.

  Args:
    device: the device (default: the first local one).
    dtype: compute dtype; float32 halves accelerator peaks.

  Returns:
    Peak FLOP/s; NaN when the device kind is unknown.
  """
  device = device or jax.local_devices()[0]
  if device.platform == "cpu":
    cores = os.cpu_count() or 1
    return _CPU_CORE_F32 * cores / max(jax.local_device_count(), 1)
  for prefix, flops in _PEAK_BF16:
    if device.device_kind.startswith(prefix):
      return flops if dtype == "bfloat16" else flops / 2
  return math.nan


class MetricWriter:
  """Writes scalars to tensorboard (`tb/`) and `metrics.jsonl` on process 0.

  Args:
    workdir: the run directory.
    resume_step: the step training resumes from; logged entries after it
      (written before an interruption) are dropped so each step appears once.
  """

  def __init__(self, workdir: str | pathlib.Path, resume_step: int = 0):
    self._active = jax.process_index() == 0
    self._path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if not self._active:
      return
    if self._path.exists():
      kept = [line for line in self._path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= resume_step]
      self._path.write_text("".join(line + "\n" for line in kept))
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"),
                             purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Logs one step's scalars (names like 'train/loss', 'eval/accuracy')."""
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    with self._path.open("a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
