"""Metric logging (tensorboardX + metrics.jsonl) and model-FLOPs utilisation."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import queue
import threading
import time
from typing import Mapping

import jax
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2

from sessa_jax.train.processes import RunProcesses

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
# Bounds on the metric writer thread's backlog: entries, and how long a
# `write` waits for room before the writer is declared stalled.
_MAX_PENDING = 1000
_PUT_TIMEOUT_S = 30.0


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


class MetricWriteError(RuntimeError):
  """Metrics could not be written (disk full, permissions, a stalled disk)."""


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  """The entries of a metrics.jsonl file, dropping torn or partial lines.

  A process killed while appending leaves a last line cut short; such lines
  (any that do not parse as a JSON object with a step) are dropped with a
  warning naming the file and line.

  Args:
    path: the metrics.jsonl file.

  Returns:
    The parsed entries, in file order.
  """
  path = pathlib.Path(path)
  entries = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      entry = json.loads(line)
      entry["step"] = int(entry["step"])
    except (ValueError, TypeError, KeyError) as e:
      logging.warning("%s, line %d: dropped a torn or partial entry (%s)",
                      path, number, e)
      continue
    entries.append(entry)
  return entries


class MetricWriter:
  """Writes scalars to tensorboard (`tb/`) and `metrics.jsonl` (one process).

  The files are written by a background thread, so a slow or failing disk
  never blocks training: a failure is kept and raised as `MetricWriteError`
  by the next `write` or `check`, and a writer that falls behind by more than
  `_MAX_PENDING` entries for `_PUT_TIMEOUT_S` seconds raises as well.

  Args:
    workdir: the run directory.
    resume_step: the step training resumes from; logged entries after it
      (written before an interruption) are dropped so each step appears once.
    processes: the run's processes (default: all); their primary writes, the
      others' calls do nothing.
  """

  def __init__(self, workdir: str | pathlib.Path, resume_step: int = 0,
               processes: RunProcesses | None = None):
    self._active = (processes or RunProcesses.everyone()).is_primary
    self._workdir = pathlib.Path(workdir)
    self._path = self._workdir / "metrics.jsonl"
    self._error: BaseException | None = None
    self._thread = None
    if not self._active:
      return
    if self._path.exists():
      kept = [e for e in read_metrics(self._path) if e["step"] <= resume_step]
      tmp = self._path.with_name(self._path.name + ".tmp")
      tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
      os.replace(tmp, self._path)
    self._queue = queue.Queue(maxsize=_MAX_PENDING)
    self._thread = threading.Thread(
        target=self._drain, args=(resume_step,), name="metric-writer",
        daemon=True)
    self._thread.start()

  def _drain(self, resume_step: int) -> None:
    """The writer thread: appends each queued entry to both outputs."""
    try:
      tb_dir = self._workdir / "tb"
      tb_dir.mkdir(exist_ok=True)
      events = EventsWriter(str(tb_dir / "events"))
      if resume_step:  # Hides events logged after resume_step by a crashed run.
        events.write_event(event_pb2.Event(
            step=resume_step + 1,
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
      with self._path.open("a") as jsonl:
        while (item := self._queue.get()) is not None:
          if isinstance(item, threading.Event):  # A `flush` waits on it.
            item.set()
            continue
          step, scalars = item
          jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
          jsonl.flush()
          now = time.time()
          for name, value in scalars.items():
            events.write_event(event_pb2.Event(
                wall_time=now, step=step,
                summary=tb_summary.scalar(name, value)))
          events.flush()
      events.close()
    except BaseException as e:  # pylint: disable=broad-except
      self._error = e

  def check(self) -> None:
    """Raises `MetricWriteError` if the writer thread has failed."""
    if self._error is not None:
      raise MetricWriteError(
          f"writing metrics to {self._workdir} failed: "
          f"{type(self._error).__name__}: {self._error}") from self._error

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Logs one step's scalars (names like 'train/loss', 'eval/accuracy').

    Raises:
      MetricWriteError: the writer has failed, or is stalled.
    """
    if not self._active:
      return
    self.check()
    item = (int(step), {k: float(v) for k, v in scalars.items()})
    try:
      self._queue.put(item, timeout=_PUT_TIMEOUT_S)
    except queue.Full:
      raise MetricWriteError(
          f"writing metrics to {self._workdir} stalled: {_MAX_PENDING} "
          f"entries pending for {_PUT_TIMEOUT_S} s") from None

  def flush(self) -> None:
    """Waits until everything written so far is on disk.

    Called before a checkpoint is saved, so no checkpoint is ever ahead of
    the metrics: a run stopped by a writer failure resumes from a step whose
    entries were all written.

    Raises:
      MetricWriteError: the writer has failed, or did not catch up within a
        bounded time.
    """
    if not self._active:
      return
    self.check()
    written = threading.Event()
    deadline = time.monotonic() + _PUT_TIMEOUT_S
    try:
      self._queue.put(written, timeout=_PUT_TIMEOUT_S)
    except queue.Full:
      deadline = 0
    while not written.wait(0.05):
      self.check()  # A writer that died never sets the event.
      if time.monotonic() > deadline:
        raise MetricWriteError(
            f"writing metrics to {self._workdir} stalled: the writer did not "
            f"catch up within {_PUT_TIMEOUT_S} s")

  def close(self) -> None:
    """Writes what is queued and stops the thread (waits a bounded time).

    Never raises; call `check` afterwards to learn whether all was written.
    """
    if not self._active or self._thread is None:
      return
    try:
      self._queue.put(None, timeout=_PUT_TIMEOUT_S)
    except queue.Full:
      pass
    self._thread.join(timeout=_PUT_TIMEOUT_S)
    if self._thread.is_alive() and self._error is None:
      self._error = TimeoutError(
          f"the metric writer did not finish within {_PUT_TIMEOUT_S} s")
    self._thread = None
