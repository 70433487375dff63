"""Runs a sweep file's points, each in its own workdir, and summarises them.

A sweep file (`experiments/<name>.py`) defines

  def sweep(preset: str | None) -> dict[str, dict]:
    return {"sessa_lr1e-3": {"config": "configs/mqar.py:sessa",
                             "train.lr": 1e-3},
            ...}

A point may also hold "fields": a JSON-able mapping naming what the sweep
file built it from (task, variant, seed, grid setting); it is no config key,
and every row of the point in `sweep_summary.json` repeats it, so readers
need not parse point names.

Each point trains in `DIR/<point name>` (resuming whatever is there; a point
whose summary.json is complete is not rerun). A point that fails is reported
and the others still run; SIGTERM saves the running points and starts no
other. With `devices_per_point` the devices are cut into disjoint sub-meshes
that each train one point at a time, concurrently (threads of each process).
In a multi-process job (one process per host) every process trains points on
its own host's sub-meshes, alone, or, for points larger than a host, with
the other processes of its group of whole hosts, taking them from a queue
shared through `jax.distributed`. At the end `DIR/sweep_summary.json` holds
every point's status, summary and devices, and a table is printed.
"""

from __future__ import annotations

import logging
import pathlib
import re
import threading
import time
import traceback
from typing import Any, Mapping, Sequence

import jax

from sessa_jax.sweeps import point_queue
from sessa_jax.train import config as config_lib
from sessa_jax.train import trainer
from sessa_jax.train import workdir_files
from sessa_jax.train import workdir_lock
from sessa_jax.train.preemption import Preemption
from sessa_jax.train.processes import RunProcesses

_NAME = re.compile(r"^[A-Za-z0-9_.,=+-]+$")
_COLUMNS = ("model", "params", "steps", "eval/loss", "eval/accuracy",
            "test/accuracy", "test/perplexity", "wall_time_s", "retries")
# Device memory left to the CUDA/XLA runtime outside the shares of the
# points that share one accelerator, each in its own process.
MEMORY_SHARE = 0.9
# XLA:GPU's Triton GEMMs find no tiling for the matched attention model's
# 144-wide matmuls (its H200 target compile fails: "Couldn't find output
# tile sizes"); cuBLAS takes them. Ignored on CPU.
SHARED_DEVICE_XLA_FLAGS = "--xla_gpu_enable_triton_gemm=false"


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


def point_overrides(point: Mapping[str, Any]) -> dict[str, Any]:
  """The dotted keys a point sets over its config file."""
  return {k: v for k, v in point.items() if k not in ("config", "fields")}


def add_point_fields(results: dict[str, dict[str, Any]],
                     points: Mapping[str, Mapping[str, Any]]) -> None:
  """Copies each point's "fields", where it has them, into its result row."""
  for name, row in results.items():
    if "fields" in points[name]:
      row["fields"] = points[name]["fields"]


def _changed_keys(point: Mapping[str, Any]) -> dict[str, Any]:
  """The point's keys whose value differs from its config file's, for the
  start-of-run report (a sweep sets keys shared by all its points too)."""
  base = config_lib.load_config(point["config"])
  return {key: value for key, value in point_overrides(point).items()
          if _lookup(base, key) != value}


def _lookup(config, dotted: str) -> Any:
  """The value of a dotted key ('train.lr') of a ConfigDict."""
  for name in dotted.split("."):
    config = config[name]
  return config


def _point_config(point: Mapping[str, Any]):
  return config_lib.apply_overrides(
      config_lib.load_config(point["config"]), point_overrides(point))


def device_groups(devices: Sequence[Any], per_point: int) -> list[list[Any]]:
  """Splits devices into disjoint sub-meshes of `per_point` devices each.

  A group never spans hosts when `per_point` fits in one: each host's devices
  (by `process_index`, then `id`) are cut into consecutive groups, and a
  host's remainder stays idle. A larger `per_point` must be a multiple of the
  (equal) host size and takes that many whole hosts.

  Args:
    devices: all devices (anything with `id` and `process_index`).
    per_point: devices per sweep point.

  Returns:
    The groups, in host then device order.

  Raises:
    ValueError: when no group of that size can be formed.
  """
  hosts: dict[int, list[Any]] = {}
  for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
    hosts.setdefault(d.process_index, []).append(d)
  sizes = {len(h) for h in hosts.values()}
  if per_point < 1 or per_point > len(devices):
    raise ValueError(f"--devices_per_point={per_point} must lie in "
                     f"[1, {len(devices)}] (the devices available)")
  if per_point <= min(sizes):
    return [h[i:i + per_point] for h in hosts.values()
            for i in range(0, len(h) - per_point + 1, per_point)]
  if len(sizes) > 1 or per_point % min(sizes):
    raise ValueError(
        f"--devices_per_point={per_point} exceeds a host's devices "
        f"({sorted(sizes)}) and is not a whole number of equal hosts")
  ordered = [d for h in hosts.values() for d in h]
  return [ordered[i:i + per_point]
          for i in range(0, len(ordered) - per_point + 1, per_point)]


def run_sweep(spec: str, workdir: str | pathlib.Path, *, force: bool = False,
              devices_per_point: int | None = None
             ) -> dict[str, dict[str, Any]]:
  """Trains every point of a sweep; failures are recorded, not raised.

  By default points run one after another, each on all devices (in a
  multi-process job, all processes train each point together). With
  `devices_per_point=N`, the devices are cut into disjoint sub-meshes of N
  (`device_groups`) and each sub-mesh trains one point at a time in its own
  thread, taking the next unstarted point when it finishes. In a
  multi-process job each process runs the threads of its own host's
  sub-meshes and trains their points alone; a sub-mesh of several whole
  hosts is trained by their processes together. The processes share the
  queue of points, so each point runs once.

  SIGTERM stops the sweep: every running point of the signalled process (or
  of its group of hosts) saves a checkpoint and is recorded as "preempted",
  no process starts another point (the others' running points finish), and
  the points not started are "pending" (with the `signal` that stopped
  them); rerunning the sweep resumes there. Ctrl-C (SIGINT) does the same.

  Every process must call this with the same arguments.

  Args:
    spec: 'experiments/x.py[:preset]'.
    workdir: the sweep directory (shared by all hosts); point p trains in
      `workdir/p`.
    force: passed to each point's `trainer.train`.
    devices_per_point: devices per concurrently running point; None runs
      the points one at a time on every device.

  Returns:
    point name -> {"status": "ok" | "failed" | "preempted" | "pending", and
    the summary, the "error" or the step reached; with the ids of the
    `devices` it ran on, the `processes` owning them, and its `start_time`
    and `end_time` (Unix seconds), and the point's "fields" if it has
    any}. Every process returns all points' rows.

  Raises:
    WorkdirLockedError: another sweep is running in `workdir`.
    ValueError: `devices_per_point` does not fit the devices.
  """
  workdir = pathlib.Path(workdir)
  points = load_sweep(spec)
  if devices_per_point is None:
    groups, processes = [None], RunProcesses.everyone()
  else:
    groups = local_groups(jax.devices(), devices_per_point,
                          jax.process_index())
    processes = (RunProcesses.of(groups[0]) if groups  # A host left idle.
                 else RunProcesses.this_one())
    logging.info("packed sweep: process %d trains %d points at a time on "
                 "devices %s", jax.process_index(), len(groups),
                    [[d.id for d in g] for g in groups])
  results = {name: unstarted_row(point, workdir / name)
             for name, point in points.items()}
  queue = point_queue.PointQueue(list(points), group=processes,
                                 shared=not processes.is_everyone)
  number = {name: i for i, name in enumerate(points, 1)}
  ran: dict[str, dict[str, Any]] = {}
  lock = threading.Lock()
  with (workdir_lock.WorkdirLock(workdir),
        Preemption(processes) as preemption):

    def next_point() -> str | None:
      with lock:
        stop = preemption.requested or any(
            r["status"] == "preempted" for r in ran.values())
      if processes.any(stop):
        queue.stop()
      return queue.next()

    def worker(devices):
      while (name := next_point()) is not None:
        logging.info("sweep point %d/%d: %s", number[name], len(points), name)
        row = run_point(points[name], workdir / name, force, preemption,
                         devices)
        with lock:
          ran[name] = row

    if len(groups) <= 1:
      for group in groups:
        worker(group)
    else:
      threads = [threading.Thread(target=worker, args=(g,), daemon=True,
                                  name=f"sweep-devices-{g[0].id}")
                 for g in groups]
      for t in threads:
        t.start()
      for t in threads:
        t.join()
    results.update(queue.gather(ran))
    add_point_fields(results, points)
    if preemption.signal_name:  # Also when it came between two points.
      for row in results.values():
        if row["status"] == "pending":
          row["signal"] = preemption.signal_name
    if jax.process_index() == 0:
      write_summary(workdir, results)
  return results


def write_summary(workdir: pathlib.Path,
                  results: Mapping[str, Mapping[str, Any]]) -> None:
  """Writes `workdir/sweep_summary.json` and prints the table."""
  workdir_files.write_json(workdir / "sweep_summary.json", results)
  print(format_table(results))


def shared_device_env(share: float, environ: Mapping[str, str]
                     ) -> dict[str, str]:
  """`environ` for a point process given `share` of one accelerator.

  Args:
    share: the fraction of the device (e.g. 1/3 for three points on it).
    environ: the environment to extend.

  Returns:
    A copy with `XLA_PYTHON_CLIENT_MEM_FRACTION` (that share of
    `MEMORY_SHARE`) and `SHARED_DEVICE_XLA_FLAGS` appended to `XLA_FLAGS`.
  """
  env = dict(environ)
  env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{MEMORY_SHARE * share:.3f}"
  env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} "
                      f"{SHARED_DEVICE_XLA_FLAGS}").strip()
  return env


def local_groups(devices: Sequence[Any], per_point: int, process: int
                ) -> list[list[Any]]:
  """The sub-meshes (`device_groups`) whose points `process` trains.

  A process trains the groups of its own host's devices, alone, or the one
  group of whole hosts that holds its host, with their processes; a host
  left out of every group trains none.

  Args:
    devices: all devices (anything with `id` and `process_index`).
    per_point: devices per sweep point.
    process: the process asking.

  Returns:
    Its groups, in device order.
  """
  return [g for g in device_groups(devices, per_point)
          if process in {d.process_index for d in g}]


def unstarted_row(point: Mapping[str, Any], workdir: pathlib.Path
                 ) -> dict[str, Any]:
  """The row of a point this launch has not run (yet): "ok" with its summary
  when an earlier launch finished it, else "pending"."""
  if (workdir / "summary.json").exists():
    done = workdir_files.finished_summary(
        workdir, _point_config(point).train.steps)
    if done is not None:
      return {**done, "status": "ok"}
  return {"status": "pending"}


def run_point(point: Mapping[str, Any], workdir: pathlib.Path, force: bool,
              preemption: Preemption,
              devices: Sequence[Any] | None) -> dict[str, Any]:
  """Trains one point; returns its result row (failures caught)."""
  used = devices if devices is not None else jax.devices()
  row: dict[str, Any] = {"devices": [d.id for d in used],
                         "processes": list(RunProcesses.of(used).indices),
                         "start_time": time.time()}
  try:
    summary = trainer.train(_point_config(point), workdir, force=force,
                            preemption=preemption,
                            overrides=_changed_keys(point), devices=devices)
    row.update(summary, status="preempted" if summary.get("preempted")
               else "ok")
  except Exception as e:  # pylint: disable=broad-except
    error = "".join(traceback.format_exception_only(type(e), e)).strip()
    logging.error("sweep point %s failed: %s", workdir.name, error)
    row.update(status="failed", error=error)
  row["end_time"] = time.time()
  return row


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
