"""A jax.profiler trace of a window of train steps."""

from __future__ import annotations

import logging
import pathlib

import jax


class StepProfiler:
  """Traces steps start+1 .. start+count into `log_dir` (TensorBoard layout).

  The trace lands in `log_dir/plugins/profile/<timestamp>/`, which
  TensorBoard's profile tab shows for `tensorboard --logdir log_dir` (or any
  parent). A run resumed past the window traces nothing.

  Args:
    log_dir: the TensorBoard log directory.
    start: steps completed before tracing begins.
    count: steps to trace; 0 disables the profiler.
  """

  def __init__(self, log_dir: str | pathlib.Path, start: int, count: int):
    self._log_dir = str(log_dir)
    self._start, self._stop = start, start + count
    self._active = False

  def before_step(self, done: int) -> None:
    """Call with the number of completed steps, before running the next."""
    if self._stop > self._start and done == self._start and not self._active:
      jax.profiler.start_trace(self._log_dir)
      self._active = True

  def after_step(self, done: int) -> None:
    """Call after a step's outputs are on the host (the step has finished)."""
    if self._active and done >= self._stop:
      self.close()

  def close(self) -> None:
    """Ends the trace (if one is running) and writes it."""
    if self._active:
      jax.profiler.stop_trace()
      self._active = False
      logging.info("profile of steps %d..%d written under %s",
                   self._start + 1, self._stop, self._log_dir)
