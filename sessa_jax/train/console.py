"""launch.py's console: this project's messages, not its libraries' noise.

A failed checkpoint save or restore reaches the run as one exception, which
launch.py reports in one line. On the way orbax logs each failed background
operation with its traceback, tensorstore's callbacks print an "Event loop
is closed" traceback straight to `sys.stderr` for every read or write still
in flight, and abandoned coroutines print "Exception ignored in" and
"coroutine ... was never awaited" warnings, some at interpreter exit:
hundreds of lines around the one that matters. `setup` keeps them off
stderr (unless launch.py's `--verbose`), along with the INFO logs of
libraries (orbax, XLA) that would bury the progress bar, while this
project's own INFO messages (restored checkpoints, sweep points) still show.
`setup(verbose=True)` only holds back the libraries' INFO logs.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import threading
from typing import TextIO
import warnings

from absl import logging as absl_logging

# Libraries whose log records never reach the console: their errors reach
# the run as exceptions.
QUIET_LIBRARIES = ("orbax", "etils", "tensorstore", "asyncio", "concurrent")
# Last lines of tracebacks that library threads print to stderr on their way
# out of a failed operation.
NOISE_ENDINGS = ("RuntimeError: Event loop is closed",)
_TRACEBACK = "Traceback (most recent call last):"
_OWN_CODE = (str(pathlib.Path(__file__).resolve().parents[2]) + os.sep,)


class LibraryFilter(logging.Filter):
  """Passes this project's INFO and up and other code's WARNING and up.

  Args:
    quiet: also drop every record of `QUIET_LIBRARIES`.
  """

  def __init__(self, quiet: bool):
    super().__init__()
    self._quiet = quiet

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname
    if self._quiet and any(f"{os.sep}{name}{os.sep}" in path
                           for name in QUIET_LIBRARIES):
      return False
    if record.levelno >= logging.WARNING:
      return True
    return path.startswith(_OWN_CODE) and f"{os.sep}site-packages{os.sep}" \
        not in path


class StderrFilter:
  """A `sys.stderr` that drops tracebacks ending in a `NOISE_ENDINGS` line.

  Text outside a traceback passes straight through (progress bars write
  partial lines). A traceback is held, per thread, until its exception line
  is complete, then written unless it is noise.

  Args:
    stream: the real stderr.
  """

  def __init__(self, stream: TextIO):
    self._stream = stream
    self._pending: dict[int, str] = {}
    self._lock = threading.Lock()

  def write(self, text: str) -> int:
    thread = threading.get_ident()
    with self._lock:
      pending = self._pending.pop(thread, None)
    if pending is None and not text.startswith(_TRACEBACK):
      return self._stream.write(text)
    self._hold(thread, (pending or "") + text)
    return len(text)

  def _hold(self, thread: int, text: str) -> None:
    """Writes `text`'s traceback once its exception line is complete."""
    lines = text.split("\n")
    for end, line in enumerate(lines[1:-1], start=1):
      if line and not line[0].isspace():
        if line not in NOISE_ENDINGS:
          self._stream.write("\n".join(lines[:end + 1]) + "\n")
        rest = "\n".join(lines[end + 1:])
        if rest:
          self.write(rest)
        return
    with self._lock:
      self._pending[thread] = text

  def __getattr__(self, name: str):
    return getattr(self._stream, name)


def _drop_unraisable(unraisable) -> None:
  del unraisable


def setup(verbose: bool) -> None:
  """Logs this project's INFO and up, and other code's WARNING and up.

  Args:
    verbose: keep the library noise; else `QUIET_LIBRARIES`' records,
      `NOISE_ENDINGS` tracebacks, unraisable-exception warnings and
      never-awaited-coroutine warnings are kept off stderr for the rest of
      the process.
  """
  absl_logging.set_verbosity(absl_logging.INFO)
  handler = absl_logging.get_absl_handler().python_handler
  handler.addFilter(LibraryFilter(quiet=not verbose))
  if not verbose:
    sys.stderr = StderrFilter(sys.stderr)
    handler.stream = sys.stderr
    sys.unraisablehook = _drop_unraisable
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
