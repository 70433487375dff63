"""The JSON files of a workdir: config.json, summary.json and their reading.

Every file is written atomically (`write_json`), so a reader, or a run
killed mid-write, sees the old file or the new one. config.json records the
config a run started with (`check_resume` compares a relaunch's with it);
summary.json the final metrics of a finished run (`finished_summary`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Mapping

from sessa_jax.train.processes import RunProcesses

# Sections of config.json that must match to resume in the same workdir.
RESUME_KEYS = ("model", "data")
# Keys of those sections that change how a step is computed, not what: a
# run may resume with another value.
RESUME_FREE = ("model.remat",)


def finished_summary(workdir: str | pathlib.Path, steps: int
                    ) -> dict[str, Any] | None:
  """The summary.json of a run that finished `steps` steps, else None."""
  path = pathlib.Path(workdir) / "summary.json"
  if path.exists():
    summary = read_json(path)
    if summary.get("steps") == steps:
      return summary
  return None


def read_json(path: pathlib.Path) -> Any:
  """Reads a JSON file; an unreadable one raises a ValueError naming it."""
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); "
                     "move it away to write it again") from None


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Writes JSON atomically (a reader sees the old or the new file)."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e


def check_resume(workdir: pathlib.Path, raw: Mapping[str, Any], force: bool
                ) -> list[str]:
  """Refuses a workdir whose config.json differs in model or data.

  Returns:
    The differences, when `force` lets them through.
  """
  path = workdir / "config.json"
  if not path.exists():
    return []
  old = read_json(path)
  new = json.loads(json.dumps(raw))
  diffs = []
  for section in RESUME_KEYS:
    before, after = old.get(section, {}), new.get(section, {})
    diffs += [f"{section}.{key}: {before.get(key)!r} -> {after.get(key)!r}"
              for key in sorted(set(before) | set(after))
              if before.get(key) != after.get(key)
              and f"{section}.{key}" not in RESUME_FREE]
  if diffs and not force:
    raise ValueError(
        f"{path} differs from the given config in {', '.join(RESUME_KEYS)} "
        f"({'; '.join(diffs)}); use another --workdir, or pass --force to "
        "resume with the new config")
  return diffs


def write_summary(workdir: pathlib.Path, filename: str,
                  summary: Mapping[str, Any]) -> None:
  """Writes a run's summary as `workdir/filename`.

  Only summary.json must be written: another file (an evaluation's) that
  cannot be, in a read-only workdir, is left out with a warning.
  """
  try:
    write_json(workdir / filename, summary)
  except OSError as e:
    if filename == "summary.json":
      raise
    logging.warning("%s; the results are only printed", e)


@contextlib.contextmanager
def removed_unless_started(workdir: str | pathlib.Path,
                           processes: RunProcesses):
  """Removes a workdir this run created if it fails before writing config.json.

  A start refused by validation (a bad config value, a missing data file)
  leaves nothing behind.
  """
  workdir = pathlib.Path(workdir)
  created = not workdir.exists()
  try:
    yield
  except BaseException:
    if (created and processes.is_primary
        and not (workdir / "config.json").exists()):
      shutil.rmtree(workdir, ignore_errors=True)
    raise

