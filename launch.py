r"""Train, evaluate or sweep from a config file.

  python launch.py --config=configs/mqar.py:mamba2,tiny --workdir=workdirs/m \
      --config.train.lr=1e-3
  python launch.py --config=configs/mqar.py --workdir=workdirs/m --mode=eval
  python launch.py --sweep=experiments/matched_budget.py:tiny \
      --workdir=workdirs/matched_budget_tiny

Relaunching with the same --workdir resumes from its newest checkpoint.
Multi-host: pass --coordinator_address/--num_processes/--process_id (or set
JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID), or --distributed
where JAX detects the cluster itself (Cloud TPU, SLURM).
"""

import json

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
_FORCE = flags.DEFINE_bool(
    "force", False,
    "Resume even if WORKDIR/config.json differs in model or data.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Index of this process (multi-host).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster "
    "auto-detection (Cloud TPU pods, SLURM, Open MPI).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Library INFO logs (orbax, XLA) would bury the progress bar;
    # --verbosity=0 brings them back.
    logging.set_verbosity(logging.WARNING)
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value, auto=_DISTRIBUTED.value)
  if _SWEEP.value:
    results = sweep.run_sweep(_SWEEP.value, _WORKDIR.value, force=_FORCE.value)
    if any(r["status"] != "ok" for r in results.values()):
      raise SystemExit(1)
    return
  if _CONFIG.value is None:
    raise app.UsageError("pass --config=configs/<file>.py[:arg] (or --sweep)")
  run = trainer.train if _MODE.value == "train" else trainer.evaluate
  summary = run(_CONFIG.value, _WORKDIR.value, force=_FORCE.value)
  print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
