r"""Runs a sweep's points concurrently on one accelerator, a process each.

  python experiments/device_study.py --workdir=workdirs/device
  python experiments/device_study.py \
      --sweep=experiments/matched_budget.py:device_tiny \
      --workdir=workdirs/device_tiny --concurrent=3
  python experiments/report.py workdirs/device --study=device \
      --sweep=experiments/matched_budget.py:device --out=workdirs/device

Small models leave most of a GPU idle, and one device cannot be cut into
sub-meshes the way `launch.py --sweep --devices_per_point` cuts a host's
devices. So each point trains in its own `launch.py` process, `--concurrent`
of them at a time, each allowed `0.9 / concurrent` of the device's memory
(`sweep.shared_device_env`), with its output in
`DIR/<point>.log`.
Each run is exactly the one the sweep would run (the point's config file
and overrides), in `DIR/<point>`; a relaunch resumes unfinished points.
Finally `launch.py --sweep` over `DIR` finds every point finished, writes
`DIR/sweep_summary.json` and prints the table, as for any sweep (it trains
any point left unfinished, one at a time).

Separate processes rather than seeds batched into one program: they reuse
the trainer unchanged (checkpoints, resume, SIGTERM, NaN checks per run)
and let points of different mixers and shapes share the device, which a
vmapped program cannot. How the two compare in speed on a CPU is measured
by `experiments/seed_batching.py` (docs/accelerators.md, "Processes or seeds
batched into one program"). Exit status: that of the final sweep (0 when
every point is ok).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
from typing import Sequence

from absl import flags

from sessa_jax import cli
from sessa_jax.sweeps import sweep as sweep_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = "experiments/matched_budget.py:device"


def point_command(name: str, point, workdir: pathlib.Path) -> list[str]:
  """`launch.py` training one sweep point, as the sweep would."""
  overrides = [f"--config.{key}={value}"
               for key, value in sweep_lib.point_overrides(point).items()]
  return [sys.executable, str(ROOT / "launch.py"),
          f"--config={point['config']}", f"--workdir={workdir / name}",
          *overrides]


def run_points(points, workdir: pathlib.Path, concurrent: int,
               env=None) -> dict[str, int]:
  """Trains `points` in `concurrent` processes at a time; name -> exit."""
  env = sweep_lib.shared_device_env(1 / concurrent,
                                    os.environ if env is None else env)
  pending, running, codes = list(points.items()), {}, {}
  while pending or running:
    while pending and len(running) < concurrent:
      name, point = pending.pop(0)
      log = (workdir / f"{name}.log").open("w")
      running[name] = (subprocess.Popen(  # pylint: disable=consider-using-with
          point_command(name, point, workdir), cwd=ROOT, env=env,
          stdout=log, stderr=subprocess.STDOUT), log, time.time())
      print(f"started {name}", flush=True)
    time.sleep(0.5)
    for name, (proc, log, start) in list(running.items()):
      if proc.poll() is not None:
        log.close()
        codes[name] = proc.returncode
        del running[name]
        print(f"{name}: exit {proc.returncode} after "
              f"{time.time() - start:.0f} s", flush=True)
  return codes


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("sweep", DEFAULT_SWEEP, "sweep file and preset",
                      flag_values=fv)
  flags.DEFINE_string("workdir", None, "the sweep directory", flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)
  flags.DEFINE_integer("concurrent", 9, "points training at once",
                       lower_bound=1, flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  args, _ = cli.parse(argv, _define_flags, __doc__.splitlines()[0])
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  points = sweep_lib.load_sweep(args.sweep)
  start = time.time()
  run_points(points, workdir, args.concurrent)
  trained = time.time() - start
  summary = subprocess.run(
      [sys.executable, str(ROOT / "launch.py"), f"--sweep={args.sweep}",
       f"--workdir={workdir}"], cwd=ROOT, check=False)
  print(f"{len(points)} points, {args.concurrent} at a time: trained in "
        f"{trained:.0f} s, {time.time() - start:.0f} s with the summary",
        flush=True)
  return summary.returncode


if __name__ == "__main__":
  sys.exit(main())
