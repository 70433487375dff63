r"""Seeds batched into one program, or a process each: train throughput on CPU.

  python experiments/seed_batching.py --out=results/seed_batching.json

The device study (`experiments/device_study.py`) trains a study's small
points at once on one accelerator, a `launch.py` process each. The other way
is to train the seeds of one point together: one jitted program vmapping the
project's own train step (`step_lib.make_train_step`: loss, gradients, clip and
AdamW) over stacked parameters, optimizer states and batches. This script
measures both on a plain CPU, for one point (default: the `cpu` preset's
diffuse MQAR Sessa at batch 4, float32), with random token batches:

* `batched`: one process, the N seeds vmapped into one program;
* `processes`: N processes at once, one seed each (the device study's way);
* `single`: one process, one seed (the reference).

Every variant runs in child processes of this script (`--child`, started
with `JAX_PLATFORMS=cpu` and no `XLA_FLAGS`; with `taskset -c` for a core
set other than `all`). A child builds its states, compiles the step (timed),
runs two warm steps, reports ready, waits until every child of the variant
is ready, then trains for `--seconds`, timing each step. Throughput is the
seed-steps finished by all children inside their common window (the latest
start to the earliest last step) over its length; examples/s multiply by the
batch size. Also reported: compile time of the step (the slowest child's),
startup (spawn to every child ready: imports, init, compile) and peak RSS
summed over the variant's processes. Variants and core sets are interleaved
over `--repeats` rounds, the order rotating each round. Each case has its
own persistent compilation cache (a temporary directory), so compile and
startup are the first round's (cold) and later rounds, loading the compiled
programs, only repeat the throughput; throughput and RSS are medians over the
rounds. Writes `--out` (default workdirs/seed_batching/seed_batching.json)
and prints a table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from sessa_jax import cli
from sessa_jax.sweeps import sweep as sweep_lib
from sessa_jax.train import config as config_lib
from sessa_jax.train import run as run_lib
from sessa_jax.train import step as step_lib
from sessa_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = "experiments/matched_budget.py:cpu"
DEFAULT_POINT = "diffuse_mqar.sessa.s0"
DEFAULT_OUT = ROOT / "workdirs" / "seed_batching" / "seed_batching.json"
VARIANTS = ("batched", "processes", "single")
# Distinct random batches per seed, cycled through by the timed steps.
NUM_BATCHES = 4
WARM_STEPS = 2


def point_spec(sweep: str, point: str, batch_size: int | None = None
              ) -> dict:
  """A sweep point ({"config": file, dotted key: value}), its batch size
  optionally replaced."""
  spec = dict(sweep_lib.load_sweep(sweep)[point])
  if batch_size is not None:
    spec["train.batch_size"] = batch_size
  return spec


def point_config(spec: dict):
  """The experiment config of a sweep point."""
  return config_lib.apply_overrides(
      config_lib.load_config(spec["config"]),
      sweep_lib.point_overrides(spec))


def one_device_setup(config) -> run_lib.RunSpec:
  """`run_lib.make_run_spec` on the first local device alone."""
  return run_lib.make_run_spec(config, devices=jax.devices()[:1])


def seed_states(resolved: run_lib.RunSpec, seeds):
  """The state spec of the first seed and a fresh train state per seed."""
  tc = resolved.exp.train
  specs = [step_lib.make_state_spec(
      resolved.model_cfg, dataclasses.replace(tc, seed=seed), resolved.mesh)
           for seed in seeds]
  return specs[0], [spec.init() for spec in specs]


def random_batches(resolved: run_lib.RunSpec, seed: int, count: int
                  ) -> list[dict[str, jax.Array]]:
  """`count` batches of uniform random tokens, every position in the loss."""
  shapes = trainer.abstract_batch(resolved.task, resolved.exp.train.batch_size)
  rng = np.random.default_rng(seed)
  vocab = resolved.task.vocab_size

  def one():
    return {"inputs": rng.integers(0, vocab, shapes["inputs"].shape),
            "targets": rng.integers(0, vocab, shapes["targets"].shape),
            "loss_mask": np.ones(shapes["loss_mask"].shape)}

  return [{k: jnp.asarray(v, shapes[k].dtype) for k, v in one().items()}
          for _ in range(count)]


def stacked(trees):
  """Trees of equal structure -> one tree, leaves stacked on a new axis 0."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def train_steps(resolved: run_lib.RunSpec, spec: step_lib.TrainStateSpec):
  """(single, batched): the trainer's jitted step, and it vmapped over a
  leading seed axis of state and batch (the state donated, as in training)."""
  single = step_lib.make_train_step(spec, resolved.exp.train, resolved.mesh)
  return single, jax.jit(jax.vmap(single), donate_argnums=0)


def compiled_program(resolved: run_lib.RunSpec, seeds, batched: bool):
  """The compiled step, its state and batches, and the compile seconds."""
  spec, states = seed_states(resolved, seeds)
  single, vmapped = train_steps(resolved, spec)
  per_seed = [random_batches(resolved, seed, NUM_BATCHES) for seed in seeds]
  if batched:
    step, state = vmapped, stacked(states)
    batches = [stacked(group) for group in zip(*per_seed)]
  else:
    step, state, batches = single, states[0], per_seed[0]
  start = time.monotonic()
  compiled = step.lower(state, batches[0]).compile()
  return compiled, state, batches, time.monotonic() - start


def time_steps(step, state, batches, seconds: float):
  """Trains for `seconds`; (start, finish times of each step), monotonic."""
  start, ends = time.monotonic(), []
  while not ends or ends[-1] - start < seconds:
    state, _ = step(state, batches[len(ends) % len(batches)])
    jax.block_until_ready(state)
    ends.append(time.monotonic())
  return start, ends


def child(job: dict) -> None:
  """One process of a variant: compile, report ready, wait for go, train."""
  resolved = one_device_setup(point_config(job["point"]))
  step, state, batches, compile_s = compiled_program(
      resolved, job["seeds"], job["batched"])
  for i in range(WARM_STEPS):
    state, _ = step(state, batches[i % len(batches)])
  jax.block_until_ready(state)
  print(json.dumps({"compile_s": compile_s}), flush=True)
  sys.stdin.readline()
  start, ends = time_steps(step, state, batches, job["seconds"])
  print(json.dumps({
      "start": start, "ends": ends, "seeds_per_program": len(job["seeds"]),
      "batch_size": resolved.exp.train.batch_size,
      "peak_rss_mib": resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def child_env(cache: pathlib.Path) -> dict[str, str]:
  """One plain CPU device (no fake devices from XLA_FLAGS), every compiled
  program kept in the persistent cache `cache`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)
  return env


def spawn(job: dict, cores: str, cache: pathlib.Path) -> subprocess.Popen:
  """A child process of this script doing `job` on the core set `cores`."""
  command = [sys.executable, str(pathlib.Path(__file__).resolve()),
             f"--child={json.dumps(job)}"]
  if cores != "all":
    command = ["taskset", "-c", cores, *command]
  return subprocess.Popen(command, cwd=ROOT, env=child_env(cache), text=True,  # pylint: disable=consider-using-with
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def read_json(proc: subprocess.Popen) -> dict:
  line = proc.stdout.readline()
  if not line:
    raise RuntimeError(f"child {proc.args} exited with {proc.wait()}")
  return json.loads(line)


def programs(variant: str, seeds: int) -> list[tuple[list[int], bool]]:
  """The variant's processes: (seeds trained, vmapped) each."""
  if variant == "batched":
    return [(list(range(seeds)), True)]
  if variant == "processes":
    return [([seed], False) for seed in range(seeds)]
  return [([0], False)]


def run_variant(args, point: dict, variant: str, cores: str,
                cache: pathlib.Path) -> dict:
  """Spawns a variant's processes, starts them together, measures them."""
  spawned = time.monotonic()
  procs = [spawn({"point": point, "seeds": seeds, "batched": batched,
                  "seconds": args.seconds}, cores, cache)
           for seeds, batched in programs(variant, args.seeds)]
  ready = [read_json(proc) for proc in procs]
  startup_s = time.monotonic() - spawned
  for proc in procs:
    proc.stdin.write("go\n")
    proc.stdin.flush()
  results = [read_json(proc) for proc in procs]
  for proc in procs:
    proc.wait()
  return {"variant": variant, "cores": cores, "startup_s": startup_s,
          "compile_s": max(r["compile_s"] for r in ready),
          **throughput(results)}


def throughput(results) -> dict:
  """Seed-steps and examples per second inside the children's common window."""
  begin = max(r["start"] for r in results)
  end = min(r["ends"][-1] for r in results)
  seed_steps = sum(r["seeds_per_program"]
                   * sum(begin < t <= end for t in r["ends"])
                   for r in results)
  window = end - begin
  return {"window_s": window,
          "seed_steps_per_s": seed_steps / window,
          "examples_per_s": seed_steps * results[0]["batch_size"] / window,
          "peak_rss_mib": sum(r["peak_rss_mib"] for r in results)}


def summarize(runs) -> dict:
  """'cores/variant' -> medians over the rounds, and the cold round's
  compile and startup."""
  groups = {}
  for run in runs:
    groups.setdefault(f"{run['cores']}/{run['variant']}", []).append(run)
  return {name: {**{k: statistics.median(r[k] for r in group)
                    for k in ("seed_steps_per_s", "examples_per_s",
                              "peak_rss_mib")},
                 "compile_s": group[0]["compile_s"],
                 "startup_s": group[0]["startup_s"]}
          for name, group in groups.items()}


def format_table(summary: dict) -> str:
  """Rows core set x variant; speed relative to one seed on the same cores."""
  lines = ["cores  variant     seed-steps/s  examples/s  x single  "
           "compile s  startup s  peak RSS MiB"]
  for name, row in summary.items():
    cores, variant = name.split("/")
    reference = summary[f"{cores}/single"]["seed_steps_per_s"]
    lines.append(
        f"{cores:<6} {variant:<11} {row['seed_steps_per_s']:>12.2f} "
        f"{row['examples_per_s']:>11.1f} "
        f"{row['seed_steps_per_s'] / reference:>9.2f} "
        f"{row['compile_s']:>10.1f} {row['startup_s']:>10.1f} "
        f"{row['peak_rss_mib']:>13.0f}")
  return "\n".join(lines)


def benchmark(args, point: dict, caches: pathlib.Path) -> dict:
  """Every (core set, variant), interleaved over the repeats."""
  cases = [(cores, variant) for cores in args.cores.split(";")
           for variant in VARIANTS]
  runs = []
  for repeat in range(args.repeats):
    shift = repeat % len(cases)
    for cores, variant in cases[shift:] + cases[:shift]:
      cache = caches / f"{cores}-{variant}"
      runs.append({"repeat": repeat,
                   **run_variant(args, point, variant, cores, cache)})
      print(f"round {repeat}: {cores}/{variant}: "
            f"{runs[-1]['seed_steps_per_s']:.2f} seed-steps/s, startup "
            f"{runs[-1]['startup_s']:.0f} s", flush=True)
  summary = summarize(runs)
  return {"summary": dict(sorted(summary.items(), key=_table_order)),
          "runs": runs}


def _table_order(item) -> tuple[str, int]:
  cores, variant = item[0].split("/")
  return cores, VARIANTS.index(variant)


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("sweep", DEFAULT_SWEEP, "sweep file and preset",
                      flag_values=fv)
  flags.DEFINE_string("point", DEFAULT_POINT, "the sweep point",
                      flag_values=fv)
  flags.DEFINE_integer("batch_size", 4, "examples per seed and step",
                       flag_values=fv)
  flags.DEFINE_integer("seeds", 3, "N, seeds per point", flag_values=fv)
  flags.DEFINE_float("seconds", 3.0, "timed training per run", flag_values=fv)
  flags.DEFINE_integer("repeats", 3, "rounds over every case", flag_values=fv)
  flags.DEFINE_string("cores", "all;0",
                      "';'-separated core sets for taskset -c, 'all' for no "
                      "pinning", flag_values=fv)
  flags.DEFINE_string("out", str(DEFAULT_OUT), "the JSON written",
                      flag_values=fv)
  flags.DEFINE_string("child", None, "a run's JSON spec (a child process)",
                      flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  args, _ = cli.parse(argv, _define_flags, __doc__.splitlines()[0],
                      hidden=("child",))
  if args.child is not None:
    child(json.loads(args.child))
    return 0
  start, load = time.time(), os.getloadavg()
  point = point_spec(args.sweep, args.point, args.batch_size)
  with tempfile.TemporaryDirectory() as caches:
    result = benchmark(args, point, pathlib.Path(caches))
  result["setup"] = {
      "sweep": args.sweep, "point": args.point, "batch_size": args.batch_size,
      "point_spec": point,
      "seeds": args.seeds, "seconds": args.seconds, "repeats": args.repeats,
      "cores": args.cores.split(";"), "cpu_count": os.cpu_count(),
      "load_avg_at_start": load, "load_avg_at_end": os.getloadavg(),
      "jax": jax.__version__, "machine": platform.machine(),
      "wall_s": time.time() - start}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  print(format_table(result["summary"]))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
