r"""What a point costs on the Ray executor over the in-process one, on CPU.

  python experiments/ray_overhead.py --workdir=workdirs/ray_overhead

Runs one sweep twice with `launch.py`, one point at a time both ways: in
process (the default executor), and with `--executor=ray` on a local Ray
instance, each point asking for all of this machine's CPUs. From the rows of
each `sweep_summary.json` it prints, per executor, the sweep's wall time, the
time before the first point started (process and, for Ray, Ray start-up),
the mean gap between one point's end and the next one's start (a Ray worker
starting and importing JAX), and the mean time a point ran (building,
compiling, training and evaluating it: a fresh process also initialises
JAX's backend and traces library code anew). Writes the figures to
`WORKDIR/overhead.json`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
from typing import Sequence

from absl import flags

from sessa_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = "experiments/matched_budget.py:device_tiny"


def measure(sweep: str, workdir: pathlib.Path,
            *extra: str) -> dict[str, float]:
  """Runs the sweep in `workdir` (fresh) with launch.py flags `extra`; its
  timings (s)."""
  start = time.time()
  subprocess.run([sys.executable, str(ROOT / "launch.py"), f"--sweep={sweep}",
                  f"--workdir={workdir}", *extra], cwd=ROOT, check=True)
  wall = time.time() - start
  rows = sorted(json.loads((workdir / "sweep_summary.json").read_text())
                .values(), key=lambda r: r["start_time"])
  gaps = [b["start_time"] - a["end_time"] for a, b in zip(rows, rows[1:])]
  return {"points": len(rows), "wall_s": wall,
          "before_first_s": rows[0]["start_time"] - start,
          "gap_s": statistics.mean(gaps) if gaps else 0.0,
          "point_s": statistics.mean(r["end_time"] - r["start_time"]
                                     for r in rows)}


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("sweep", DEFAULT_SWEEP, "sweep file and preset",
                      flag_values=fv)
  flags.DEFINE_string("workdir", None,
                      "a directory for the two sweeps (emptied first)",
                      flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  args, _ = cli.parse(argv, _define_flags, __doc__.splitlines()[0])
  workdir = pathlib.Path(args.workdir).resolve()
  for executor in ("in_process", "ray"):
    shutil.rmtree(workdir / executor, ignore_errors=True)
  cpus = len(os.sched_getaffinity(0))
  figures = {
      "in_process": measure(args.sweep, workdir / "in_process"),
      "ray": measure(args.sweep, workdir / "ray", "--executor=ray",
                     f"--resources_per_point=cpu={cpus}")}
  extra = figures["ray"]["wall_s"] - figures["in_process"]["wall_s"]
  figures["ray_extra_per_point_s"] = extra / figures["ray"]["points"]
  (workdir / "overhead.json").write_text(json.dumps(figures, indent=2) + "\n")
  print(f"{args.sweep}, {figures['ray']['points']} points one at a time, "
        f"{cpus} CPUs")
  print("executor    wall (s)  before first (s)  gap (s)  point (s)")
  for executor in ("in_process", "ray"):
    f = figures[executor]
    print(f"{executor:<10}  {f['wall_s']:8.1f}  {f['before_first_s']:16.1f}  "
          f"{f['gap_s']:7.1f}  {f['point_s']:9.1f}")
  print(f"Ray's extra time per point: {figures['ray_extra_per_point_s']:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
