r"""Train, evaluate, sample from or dry-run a config; or run a sweep.

  python launch.py --config=configs/mqar.py:mamba2,tiny --workdir=workdirs/m \
      --config.train.lr=1e-3
  python launch.py --config=configs/mqar.py --workdir=workdirs/m --dry_run
  python launch.py --config=configs/mqar.py --workdir=workdirs/m --dry_run \
      --target=h200
  python launch.py --workdir=workdirs/m --mode=eval [--step=1000]
  python launch.py --workdir=workdirs/text --mode=sample --prompt="It was"
  python launch.py --sweep=experiments/matched_budget.py:tiny \
      --workdir=workdirs/matched_budget_tiny
  python launch.py --sweep=experiments/matched_budget.py:tiny \
      --devices_per_point=1 --workdir=workdirs/matched_budget_tiny
  python launch.py --sweep=experiments/matched_budget.py:tiny --executor=ray \
      [--ray_address=auto] [--resources_per_point=cpu=1,gpu=0.25] \
      --workdir=/shared/matched_budget_tiny

--mode=eval and --mode=sample read the run's config from WORKDIR/config.json
when --config is not given.
Relaunching with the same --workdir resumes from its newest checkpoint
(--restore_step=N: from step N, deleting the later checkpoints, e.g. to go
back past a divergence); one run at a time may use a workdir
(WORKDIR/run.lock). Exit status: 0 done, 1
error (one line; --verbose for the traceback), 75 (trainer.EXIT_PREEMPTED)
stopped by SIGTERM after saving a checkpoint: relaunch to resume; 130
(trainer.EXIT_INTERRUPTED) the same after Ctrl-C (a second Ctrl-C exits at
once, without saving).
Multi-host: pass --coordinator_address/--num_processes/--process_id (or set
JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID), or --distributed
where JAX detects the cluster itself (Cloud TPU, SLURM); run the same command
on every host. With --sweep and --devices_per_point each host's process trains
points on its own devices (or with its group of hosts, for points larger than
a host), taking them from a queue shared by all hosts. With --executor=ray
each point is a Ray task in a worker process of its own, on a Ray cluster
(--ray_address) or a local instance (sessa_jax/sweeps/ray_executor.py).
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sessa_jax import loading
from sessa_jax import sampling
from sessa_jax import targets
from sessa_jax.sweeps import ray_executor
from sessa_jax.sweeps import sweep
from sessa_jax.train import console
from sessa_jax.train import sharding
from sessa_jax.train import target_compile
from sessa_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: configs/<file>.py[:arg].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run (or sweep) directory.",
                               required=True)
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "sample"],
    "train (resumes if possible), eval (a checkpoint on val and test) or "
    "sample (continue --prompt; text tasks).")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Build the model and optimizer, compile one train step "
    "on the configured mesh, print its memory and FLOPs per device, and exit "
    "without training or writing checkpoints.")
_TARGET = flags.DEFINE_string(
    "target", None, "With --dry_run: compile for this chip instead of the "
    "local devices, without it: h200, h100, a100, or a TPU topology such as "
    "v5e:2x2, v6e:4x4, v5p:2x2x2 (the mesh spans all its chips). Needs the "
    "target's compiler: `make dry-run TARGET=...` installs it.")
_STEP = flags.DEFINE_integer(
    "step", None, "Checkpoint step for --mode=eval/sample (default: newest).")
_RESTORE_STEP = flags.DEFINE_integer(
    "restore_step", None, "--mode=train: resume from this checkpoint step "
    "instead of the newest, deleting the later checkpoints (it names them "
    "first); for one relaunch, e.g. back past a divergence.")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue (--mode=sample).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 200,
                                   "Tokens to generate (--mode=sample).",
                                   lower_bound=0)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1,
                                    "Continuations to print (--mode=sample).",
                                    lower_bound=1)
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, "0: greedy; else sample softmax(logits / T).")
_TOP_K = flags.DEFINE_integer("top_k", None,
                              "Sample among the k most likely tokens only.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of --mode=sample.")
_SWEEP = flags.DEFINE_string(
    "sweep", None, "Sweep file experiments/<file>.py[:preset]; each point "
    "runs in WORKDIR/<point name>.")
_DEVICES_PER_POINT = flags.DEFINE_integer(
    "devices_per_point", None, "With --sweep: train devices/N points at a "
    "time, each on its own N devices (default: one point on all devices). In a "
    "multi-process run a point never spans hosts unless N exceeds a host; "
    "then N must be a whole number of hosts, whose processes train it.")
_EXECUTOR = flags.DEFINE_enum(
    "executor", "in_process", ["in_process", "ray"],
    "With --sweep: in_process trains the points in this job; ray runs each "
    "as a Ray task in a worker process of its own (needs the [ray] extra).")
_RAY_ADDRESS = flags.DEFINE_string(
    "ray_address", None, "With --executor=ray: the cluster to run on (auto, "
    "HOST:PORT); default: start a local Ray instance on this machine.")
_RESOURCES_PER_POINT = flags.DEFINE_string(
    "resources_per_point", "cpu=1", "With --executor=ray: each point's "
    "resources, e.g. cpu=1,gpu=0.25 (a quarter GPU and of its memory) or "
    "cpu=8,tpu=4 (4 TPU chips of one host).")
_FORCE = flags.DEFINE_bool(
    "force", False,
    "Resume even if WORKDIR/config.json differs in model or data.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Index of this process (multi-host).")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "On an error, print the traceback, not just its message "
    "(also with --verbosity=0 or higher), and let libraries (orbax, XLA) log "
    "to stderr.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster "
    "auto-detection (Cloud TPU pods, SLURM, Open MPI).")


def _error_exit(message: str) -> None:
  print(f"launch.py: error: {message}", file=sys.stderr)
  raise SystemExit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config errors (loading, overrides) one line."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if "--verbose" in argv:
      raise
    if isinstance(e, flags.Error):  # A config file's error: its last line.
      lines = [line for line in str(e).splitlines() if line.strip()]
      _error_exit(" ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)
                  + " (--verbose for the traceback)")
    if not isinstance(e, (AttributeError, KeyError)):
      _error_exit(f"{type(e).__name__}: {e} (--verbose for the traceback)")
    # config_flags: an override of a key the config does not have.
    cause = e
    while isinstance(cause, BaseException) and cause.args:
      cause = cause.args[0]
    key, _, hint = str(cause).partition("\n")
    key = key.strip("'\"")
    given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
             and key in a.split("=")[0].split(".")]
    _error_exit(f"{given[0] if given else '--config'}: unknown config key "
                f"{key!r}{'; ' + hint if hint else ''}")


def _sample() -> None:
  """--mode=sample: prints continuations of --prompt from a checkpoint."""
  run = loading.load(_WORKDIR.value, _STEP.value)
  samples = sampling.continue_text(
      run, _PROMPT.value, _NUM_TOKENS.value, num_samples=_NUM_SAMPLES.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, seed=_SEED.value)
  print(f"{_WORKDIR.value}, step {run.step}:")
  print(sampling.format_samples(_PROMPT.value, samples))


def _run(argv) -> int:
  """Trains, evaluates, samples, dry-runs or sweeps; returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DEVICES_PER_POINT.value is not None and not _SWEEP.value:
    raise app.UsageError("--devices_per_point packs the points of a --sweep")
  on_ray = _EXECUTOR.value == "ray"
  if on_ray and (not _SWEEP.value or _DEVICES_PER_POINT.value is not None):
    raise app.UsageError("--executor=ray runs the points of a --sweep, each "
                         "on the resources of --resources_per_point")
  if not on_ray and (_RAY_ADDRESS.value is not None
                  or flags.FLAGS["resources_per_point"].present):
    raise app.UsageError("--ray_address and --resources_per_point go with "
                         "--executor=ray")
  if _RESTORE_STEP.value is not None and (
      _SWEEP.value or _DRY_RUN.value or _MODE.value != "train"):
    raise app.UsageError("--restore_step resumes one run's training (use "
                         "--step with --mode=eval or sample)")
  if not flags.FLAGS["verbosity"].present:
    console.setup(verbose=_VERBOSE.value)
  target = None
  if _TARGET.value is not None:
    if not _DRY_RUN.value or _SWEEP.value:
      raise app.UsageError("--target compiles a --dry_run of one --config")
    target = targets.parse(_TARGET.value)
    target_compile.prepare(target)
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value, auto=_DISTRIBUTED.value)
  if on_ray:
    try:
      results = ray_executor.run_sweep(
          _SWEEP.value, _WORKDIR.value, address=_RAY_ADDRESS.value,
          resources=_RESOURCES_PER_POINT.value, force=_FORCE.value)
    except ray_executor.RayNotInstalledError as e:
      _error_exit(str(e))
  elif _SWEEP.value:
    results = sweep.run_sweep(_SWEEP.value, _WORKDIR.value, force=_FORCE.value,
                              devices_per_point=_DEVICES_PER_POINT.value)
  if _SWEEP.value:
    statuses = {r["status"] for r in results.values()}
    if statuses & {"preempted", "pending"}:
      return _stopped_status(results.values())
    return 0 if statuses <= {"ok"} else 1
  if _MODE.value == "sample":
    _sample()
    return 0
  config, overrides = _CONFIG.value, {}
  if config is not None:
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
  elif _MODE.value == "eval":
    config = loading.read_config(_WORKDIR.value)
  else:
    raise app.UsageError("pass --config=configs/<file>.py[:arg] (or --sweep)")
  if _DRY_RUN.value:
    trainer.dry_run(config, _WORKDIR.value, overrides=overrides,
                    target=target)
    return 0
  if _MODE.value == "train":
    summary = trainer.train(config, _WORKDIR.value, force=_FORCE.value,
                            overrides=overrides,
                            restore_step=_RESTORE_STEP.value)
  else:
    summary = trainer.evaluate_checkpoint(config, _WORKDIR.value,
                                          force=_FORCE.value, step=_STEP.value)
  print(json.dumps(summary, indent=2, sort_keys=True))
  if summary.get("preempted"):
    return _stopped_status([summary])
  _print_results(_MODE.value)
  return 0


def _stopped_status(rows) -> int:
  """The exit status of runs stopped early: 130 after Ctrl-C, else 75."""
  if any(row.get("signal") == "SIGINT" for row in rows):
    return trainer.EXIT_INTERRUPTED
  return trainer.EXIT_PREEMPTED


def _print_results(mode: str) -> None:
  """Names the files a finished run (or evaluation) left in the workdir."""
  files = ("eval_summary.json" if mode == "eval" else
           "summary.json (final metrics), metrics.jsonl (every logged step), "
           "tb/ (TensorBoard), checkpoints/")
  print(f"results in {_WORKDIR.value}: {files}")


def main(argv):
  try:
    status = _run(argv)
  except app.UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if _VERBOSE.value or (flags.FLAGS["verbosity"].present
                          and logging.get_verbosity() >= logging.INFO):
      raise
    _error_exit(f"{type(e).__name__}: {e} (--verbose for the traceback)")
  raise SystemExit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
