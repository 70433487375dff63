"""SIGTERM and Ctrl-C as a flag the train loop polls, and the exit statuses.

A run (or sweep) stopped this way saves a checkpoint first; `launch.py`
then exits with `EXIT_PREEMPTED` or `EXIT_INTERRUPTED`.
"""

from __future__ import annotations

import logging
import signal

from jax.experimental import multihost_utils

from sessa_jax.train.processes import RunProcesses

# Exit status of a run (or sweep) stopped by SIGTERM after saving a
# checkpoint: sysexits' EX_TEMPFAIL, "try again later"; relaunch to resume.
EXIT_PREEMPTED = 75
# Exit status of a run (or sweep) stopped by Ctrl-C after saving: the shell's
# 128 + SIGINT.
EXIT_INTERRUPTED = 130


class Preemption:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a flag the loop polls.

  A context manager. A run of all processes of a multi-process job leaves
  SIGTERM to `jax.distributed`'s preemption service, whose sync point makes
  them all stop after the same step (and Ctrl-C to Python). Otherwise
  handlers are installed on entry (the previous ones are restored on exit):
  a run of one process polls its flag; a run of some processes stops when any
  of them has it, agreed by a reduction over them at every step. A sweep
  holds one across all its points, so that a signal between points also
  stops it. After the first Ctrl-C a second one kills the process at once,
  without saving.

  Args:
    processes: the processes of the runs it stops (default: all).

  Attributes:
    requested: whether a signal asked to stop.
    signal_name: the first such signal's name ("SIGTERM", "SIGINT"), or None.
  """

  def __init__(self, processes: RunProcesses | None = None):
    self.requested = False
    self.signal_name = None
    self._processes = processes or RunProcesses.everyone()
    # A job's processes all together: jax.distributed's preemption service.
    self._service = (self._processes.count > 1
                     and self._processes.is_everyone)
    self._previous = {}

  def __enter__(self) -> Preemption:
    if not self._service:
      self._previous = {signum: signal.signal(signum, self._handle)
                        for signum in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    again = ""
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      again = " (Ctrl-C again to exit at once, without saving)"
    logging.warning("%s: saving a checkpoint after this step%s", name, again)
    self.requested = True
    self.signal_name = self.signal_name or name

  def reached(self, step: int) -> bool:
    if self._service:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._processes.any(self.requested)
