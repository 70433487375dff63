"""Step time, tokens per second and MFU over a window of train steps."""

from __future__ import annotations

import time

from sessa_jax import budget
from sessa_jax.train import metrics as metrics_lib
from sessa_jax.train.hooks import StepInfo
from sessa_jax.train.run import Run


class Throughput:
  """Times the steps since the last reading, leaving out other work.

  The first step compiles, so the clock starts after it; an evaluation
  restarts it (`restart`), and each reading (`read`) does too.

  Args:
    run: the run whose steps are timed.
  """

  def __init__(self, run: Run):
    tc = run.tc
    self._tokens_per_step = tc.batch_size * run.task.seq_len
    self._train_flops = 3 * budget.flops_per_token(run.model_cfg,
                                                   run.task.seq_len)
    self._peak = (metrics_lib.peak_flops(dtype=tc.dtype)
                  * run.mesh.devices.size)
    self._start, self._steps = None, 0

  def tick(self, info: StepInfo) -> None:
    """A hook for every step: counts it in the window."""
    del info
    if self._start is None:
      self._start = time.time()
    else:
      self._steps += 1

  def restart(self) -> None:
    """Starts a new window now, after work that is not training."""
    self._start, self._steps = time.time(), 0

  def read(self) -> dict[str, float]:
    """`train/step_time_s`, `train/tokens_per_s` and `train/mfu` of the
    window, which restarts; nothing when it holds no step yet."""
    if not self._steps:
      return {}
    seconds = (time.time() - self._start) / self._steps
    tokens_per_s = self._tokens_per_step / seconds
    self.restart()
    return {"train/step_time_s": seconds,
            "train/tokens_per_s": tokens_per_s,
            "train/mfu": self._train_flops * tokens_per_s / self._peak}
