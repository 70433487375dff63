"""Runs the points of a sweep file, each in its own workdir, and summarises them.

A sweep file (`experiments/<name>.py`) defines

  def sweep(preset: str | None) -> dict[str, dict]:
    return {"sessa_lr1e-3": {"config": "configs/mqar.py:sessa",
                             "train.lr": 1e-3},
            ...}

Each point trains in `DIR/<point name>` (resuming whatever is there; a point
whose summary.json is complete is not rerun). A point that fails is reported
and the others still run; SIGTERM saves the running point and starts no
other. At the end `DIR/sweep_summary.json` holds every point's status and
summary, and a table is printed.
"""

from __future__ import annotations

import logging
import pathlib
import re
import traceback
from typing import Any, Mapping

import jax

from sessa_jax.train import config as config_lib
from sessa_jax.train import trainer
from sessa_jax.train import workdir_lock

_NAME = re.compile(r"^[A-Za-z0-9_.,=+-]+$")
_COLUMNS = ("model", "params", "steps", "eval/loss", "eval/accuracy",
            "test/accuracy", "test/perplexity", "wall_time_s")


def load_sweep(spec: str) -> dict[str, dict[str, Any]]:
  """Loads 'experiments/x.py[:preset]' and checks the point names and configs.

  Args:
    spec: the sweep file, optionally followed by ':' and a preset name.

  Returns:
    point name -> {"config": "configs/...py[:arg]", dotted override: value}.
  """
  module, preset = config_lib.load_module(spec, kind="sweep")
  points = module.sweep(preset)
  for name, point in points.items():
    if not _NAME.match(name):
      raise ValueError(f"sweep point name {name!r} must match {_NAME.pattern}")
    if "config" not in point:
      raise ValueError(f"sweep point {name!r} has no 'config' entry")
  return points


def _point_overrides(point: Mapping[str, Any]) -> dict[str, Any]:
  """The dotted keys a point sets over its config file."""
  return {k: v for k, v in point.items() if k != "config"}


def _point_config(point: Mapping[str, Any]):
  return config_lib.apply_overrides(
      config_lib.load_config(point["config"]), _point_overrides(point))


def run_sweep(spec: str, workdir: str | pathlib.Path, *, force: bool = False
             ) -> dict[str, dict[str, Any]]:
  """Trains every point of a sweep; failures are recorded, not raised.

  SIGTERM stops the sweep: the running point saves a checkpoint and is
  recorded as "preempted", the points after it as "pending"; rerunning the
  sweep resumes there.

  Args:
    spec: 'experiments/x.py[:preset]'.
    workdir: the sweep directory; point p trains in `workdir/p`.
    force: passed to each point's `trainer.train`.

  Returns:
    point name -> {"status": "ok" | "failed" | "preempted" | "pending", and
    the summary, the "error" or the step reached}.

  Raises:
    WorkdirLockedError: another sweep is running in `workdir`.
  """
  workdir = pathlib.Path(workdir)
  points = load_sweep(spec)
  results = {}
  with workdir_lock.WorkdirLock(workdir), trainer.Preemption() as preemption:
    for i, (name, point) in enumerate(points.items()):
      if preemption.requested or any(
          r["status"] == "preempted" for r in results.values()):
        results[name] = {"status": "pending"}
        continue
      logging.warning("sweep point %d/%d: %s", i + 1, len(points), name)
      try:
        summary = trainer.train(_point_config(point), workdir / name,
                                force=force, preemption=preemption,
                                overrides=_point_overrides(point))
        status = "preempted" if summary.get("preempted") else "ok"
        results[name] = {"status": status, **summary}
      except Exception as e:  # pylint: disable=broad-except
        error = "".join(traceback.format_exception_only(type(e), e)).strip()
        logging.error("sweep point %s failed: %s", name, error)
        results[name] = {"status": "failed", "error": error}
    if jax.process_index() == 0:
      trainer.write_json(workdir / "sweep_summary.json", results)
      print(format_table(results))
  return results


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """A plain-text table: one row per point, the main summary columns."""
  columns = [c for c in _COLUMNS if any(c in r for r in results.values())]
  header = ["point", "status", *columns]

  def cell(value):
    if isinstance(value, float):
      return f"{value:.4g}"
    return "" if value is None else str(value)

  rows = [[name, r["status"], *(cell(r.get(c)) for c in columns)]
          for name, r in results.items()]
  table = [header, *rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
  lines.insert(1, "  ".join("-" * w for w in widths))
  failed = [f"{name}: {r['error']}" for name, r in results.items()
            if r["status"] == "failed"]
  return "\n".join(lines + (["", "failed points:", *failed] if failed else []))
