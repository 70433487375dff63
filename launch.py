r"""Train, evaluate or sweep from a config file.

  python launch.py --config=configs/mqar.py:mamba2,tiny --workdir=workdirs/m \
      --config.train.lr=1e-3
  python launch.py --config=configs/mqar.py --workdir=workdirs/m --mode=eval
  python launch.py --sweep=experiments/matched_budget.py:tiny \
      --workdir=workdirs/matched_budget_tiny
  python launch.py --sweep=experiments/matched_budget.py:tiny \
      --devices_per_point=1 --workdir=workdirs/matched_budget_tiny

Relaunching with the same --workdir resumes from its newest checkpoint; one
run at a time may use a workdir (WORKDIR/run.lock). Exit status: 0 done, 1
error (one line; --verbose for the traceback), 75 (trainer.EXIT_PREEMPTED)
stopped by SIGTERM after saving a checkpoint: relaunch to resume.
Multi-host: pass --coordinator_address/--num_processes/--process_id (or set
JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID), or --distributed
where JAX detects the cluster itself (Cloud TPU, SLURM).
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sessa_jax.train import sharding
from sessa_jax.train import sweep
from sessa_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: configs/<file>.py[:arg].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run (or sweep) directory.",
                               required=True)
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval"],
    "train (resumes if possible) or eval (newest checkpoint).")
_SWEEP = flags.DEFINE_string(
    "sweep", None, "Sweep file experiments/<file>.py[:preset]; each point "
    "runs in WORKDIR/<point name>.")
_DEVICES_PER_POINT = flags.DEFINE_integer(
    "devices_per_point", None, "With --sweep: train devices/N points at a "
    "time, each on its own N devices (default: one point on all devices).")
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
    "(also with --verbosity=0 or higher).")
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


def _run(argv) -> int:
  """Trains, evaluates or sweeps; returns the exit status."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Library INFO logs (orbax, XLA) would bury the progress bar;
    # --verbosity=0 brings them back.
    logging.set_verbosity(logging.WARNING)
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value, auto=_DISTRIBUTED.value)
  if _SWEEP.value:
    results = sweep.run_sweep(_SWEEP.value, _WORKDIR.value, force=_FORCE.value,
                              devices_per_point=_DEVICES_PER_POINT.value)
    statuses = {r["status"] for r in results.values()}
    if statuses & {"preempted", "pending"}:
      return trainer.EXIT_PREEMPTED
    return 0 if statuses <= {"ok"} else 1
  if _CONFIG.value is None:
    raise app.UsageError("pass --config=configs/<file>.py[:arg] (or --sweep)")
  run = trainer.train if _MODE.value == "train" else trainer.evaluate
  summary = run(_CONFIG.value, _WORKDIR.value, force=_FORCE.value)
  print(json.dumps(summary, indent=2, sort_keys=True))
  return trainer.EXIT_PREEMPTED if summary.get("preempted") else 0


def main(argv):
  try:
    status = _run(argv)
  except app.UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if _VERBOSE.value or logging.get_verbosity() >= logging.INFO:
      raise
    _error_exit(f"{type(e).__name__}: {e} (--verbose for the traceback)")
  raise SystemExit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
