"""Runs a sweep's points as Ray tasks, each in a worker process of its own.

  launch.py --sweep=experiments/x.py --workdir=/shared/x --executor=ray \
      [--ray_address=auto] [--resources_per_point=cpu=1,gpu=0.25]

Each point that is not finished yet becomes one Ray task asking for the
resources of `--resources_per_point`; Ray runs as many at once as the
cluster's (or, without an address, this machine's) resources allow, each in
a fresh worker process that trains the point in `DIR/<point>` (with its
output in `DIR/<point>.log`) exactly as the in-process sweep would
(`sweep.run_point`). A point given a fraction of a GPU gets that share of the
device's memory (`sweep.shared_device_env`); TPU chips come from one host.

A point that ends preempted (its worker got SIGTERM), or whose worker or
node dies, is submitted again, up to `max_retries` times, and resumes from its
checkpoint: the workdirs must be on storage that every node sees. A point
that fails with an error is recorded and not retried. SIGTERM to the driver
stops the sweep: the running points save and are recorded "preempted", those
not started "pending", and a relaunch resumes. The driver then writes
`DIR/sweep_summary.json` and the table as the in-process sweep does, each
row with the number of `retries` it took.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import threading
from typing import Any, Mapping

import jax

from sessa_jax.sweeps import sweep
from sessa_jax.train import workdir_lock
from sessa_jax.train.preemption import Preemption
from sessa_jax.train.processes import RunProcesses

MAX_RETRIES = 3
INSTALL = "pip install -c requirements/lock.txt -e '.[ray]'"
# Seconds between a worker's looks at whether the sweep is stopping.
_POLL_S = 1.0


class RayNotInstalledError(ImportError):
  """`--executor=ray` without Ray installed."""


def parse_resources(text: str) -> dict[str, Any]:
  """'cpu=1,gpu=0.25,tpu=4,NAME=x' -> Ray task options.

  Args:
    text: comma-separated NAME=NUMBER; cpu and gpu (any case) are Ray's
      CPU and GPU counts, tpu its TPU chips, any other name a custom
      resource of the cluster.

  Returns:
    {"num_cpus": ..., "num_gpus": ..., "resources": {...}}, the keys given.

  Raises:
    ValueError: on an entry that is not NAME=NUMBER >= 0.
  """
  options: dict[str, Any] = {}
  for entry in filter(None, text.split(",")):
    name, _, value = entry.partition("=")
    try:
      amount = float(value)
    except ValueError:
      amount = -1.0
    if not name or amount < 0:
      raise ValueError(f"--resources_per_point entry {entry!r} is not "
                       "NAME=NUMBER (e.g. cpu=1,gpu=0.25)")
    key = {"cpu": "num_cpus", "gpu": "num_gpus"}.get(name.lower())
    if key is not None:
      options[key] = amount
    else:
      name = "TPU" if name.lower() == "tpu" else name
      options.setdefault("resources", {})[name] = amount
  return options


def _import_ray():
  try:
    import ray  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RayNotInstalledError(
        f"--executor=ray needs Ray, which is not installed: {INSTALL}") from e
  return ray


class _Coordinator:
  """A Ray actor: which points began, and whether the sweep is stopping."""

  def __init__(self):
    self._began: set[str] = set()
    self._stopping = False

  def begin(self, name: str) -> bool:
    """Whether point `name` may start training (False once stopping)."""
    if not self._stopping:
      self._began.add(name)
    return not self._stopping

  def stop(self) -> list[str]:
    """Stops the sweep; returns the points that began training."""
    self._stopping = True
    return sorted(self._began)

  def stopping(self) -> bool:
    return self._stopping


def _call(method, *args):
  """An actor method's result, in a task.

  It waits on a future, not in `ray.get`: a task blocked in `ray.get` or
  `ray.wait` lends its CPUs back to the scheduler, which would start another
  point on them.
  """
  return method.remote(*args).future().result()


def _train_point(name: str, point: Mapping[str, Any], workdir: pathlib.Path,
                 cwd: str, force: bool, gpu_share: float | None,
                 coordinator) -> dict[str, Any]:
  """The Ray task: trains one point in this (fresh) worker process.

  Args:
    name: the point's name.
    point: its config file and overrides.
    workdir: the sweep directory.
    cwd: the driver's directory, against which config paths resolve.
    force: passed to `trainer.train`.
    gpu_share: the fraction of one GPU the point has, or None.
    coordinator: the sweep's `_Coordinator` actor.

  Returns:
    `sweep.run_point`'s row, or {"status": "pending"} when stopping.
  """
  os.chdir(cwd)
  if gpu_share is not None:  # Before JAX creates its backends.
    os.environ.update(sweep.shared_device_env(gpu_share, os.environ))
  if not _call(coordinator.begin, name):
    return {"status": "pending"}
  with open(workdir / f"{name}.log", "ab") as log:
    os.dup2(log.fileno(), 1)  # The worker exits after this task.
    os.dup2(log.fileno(), 2)
  done = threading.Event()
  with Preemption(RunProcesses.this_one()) as preemption:

    def watch():
      while not done.wait(_POLL_S):
        if _call(coordinator.stopping):
          preemption.requested = True
          return

    threading.Thread(target=watch, daemon=True).start()
    try:
      return sweep.run_point(point, workdir / name, force, preemption, None)
    finally:
      done.set()


@contextlib.contextmanager
def _connected(ray, address: str | None):
  """Connected to the cluster at `address`, or to a new local instance.

  A process already connected (`ray.init` called) keeps its connection.
  """
  if ray.is_initialized():
    yield
    return
  os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
  if address is None:
    ray.init(include_dashboard=False, logging_level="WARNING")
  else:
    ray.init(address=address, logging_level="WARNING")
  try:
    yield
  finally:
    ray.shutdown()


def _outcome(ray, ref) -> tuple[dict[str, Any], bool]:
  """(a finished task's row, whether its worker or node was lost)."""
  try:
    return ray.get(ref), False
  except ray.exceptions.TaskCancelledError:
    return {"status": "pending"}, False
  except ray.exceptions.RayTaskError as e:
    return {"status": "failed", "error": str(e).strip().splitlines()[-1]}, False
  except ray.exceptions.RayError as e:
    error = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
    return {"status": "failed", "error": error}, True


def run_sweep(spec: str, workdir: str | pathlib.Path, *,
              address: str | None = None, resources: str = "cpu=1",
              force: bool = False, max_retries: int = MAX_RETRIES
             ) -> dict[str, dict[str, Any]]:
  """Trains every unfinished point of a sweep as a Ray task.

  The driver (this process) trains nothing: it keeps JAX on the CPU, hands
  the points to Ray, retries the preempted and lost ones and writes the
  summary. It holds `workdir`'s lock for the whole sweep.

  Args:
    spec: 'experiments/x.py[:preset]'.
    workdir: the sweep directory, on storage every node sees.
    address: the Ray cluster ('auto', 'HOST:PORT'); None starts a local
      instance with this machine's resources (and stops it at the end).
    resources: each point's resources (`parse_resources`).
    force: passed to each point's `trainer.train`.
    max_retries: times a point is submitted again after it was preempted
      or its worker or node died.

  Returns:
    point name -> row, as `sweep.run_sweep` returns, with the `retries`
    each point run here took.

  Raises:
    RayNotInstalledError: Ray is not installed.
    WorkdirLockedError: another sweep is running in `workdir`.
  """
  ray = _import_ray()
  options = parse_resources(resources)
  gpu = options.get("num_gpus", 0)
  gpu_share = gpu if 0 < gpu < 1 else None
  jax.config.update("jax_platforms", "cpu")  # The driver holds no device.
  workdir = pathlib.Path(workdir).resolve()
  points = sweep.load_sweep(spec)
  results = {name: sweep.unstarted_row(point, workdir / name)
             for name, point in points.items()}
  todo = [name for name, row in results.items() if row["status"] != "ok"]
  retries = dict.fromkeys(todo, 0)
  with (_connected(ray, address), workdir_lock.WorkdirLock(workdir),
        Preemption(RunProcesses.this_one()) as preemption):
    coordinator = ray.remote(num_cpus=0)(_Coordinator).remote()
    task = ray.remote(max_calls=1, max_retries=0)(_train_point).options(
        **options)
    running = {}

    def submit(name):
      running[task.remote(name, points[name], workdir, os.getcwd(), force,
                          gpu_share, coordinator)] = name

    for name in todo:
      submit(name)
    began = None  # The points that began, once stopping.
    while running:
      if preemption.requested and began is None:
        began = set(ray.get(coordinator.stop.remote()))
        for ref, name in running.items():
          if name not in began:
            ray.cancel(ref)
      ready, _ = ray.wait(list(running), timeout=_POLL_S)
      for ref in ready:
        name = running.pop(ref)
        row, lost = _outcome(ray, ref)
        if lost and began is not None:  # Stopping: relaunch resumes it.
          row = {"status": "preempted" if name in began else "pending"}
        elif ((lost or row["status"] == "preempted") and began is None
              and retries[name] < max_retries):
          retries[name] += 1
          submit(name)
          continue
        results[name] = {**row, "retries": retries[name]}
    sweep.add_point_fields(results, points)
    sweep.write_summary(workdir, results)
  return results
