r"""Train, evaluate, sample from or dry-run a config; or run a sweep.

  python launch.py --config=configs/mqar.py:mamba2,tiny --workdir=workdirs/m \
      --config.train.lr=1e-3
  python launch.py --config=configs/mqar.py --workdir=workdirs/m --dry_run
  python launch.py --workdir=workdirs/m --mode=eval [--step=1000]
  python launch.py --workdir=workdirs/text --mode=sample --prompt="It was"
  python launch.py --sweep=experiments/matched_budget.py:tiny \
      --workdir=workdirs/matched_budget_tiny

Relaunching with the same --workdir resumes from its newest checkpoint.
--mode=eval and --mode=sample read the run's config from WORKDIR/config.json
when --config is not given.
Multi-host: pass --coordinator_address/--num_processes/--process_id (or set
JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID), or --distributed
where JAX detects the cluster itself (Cloud TPU, SLURM).
"""

import json

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sessa_jax import loading
from sessa_jax import sampling
from sessa_jax.train import sharding
from sessa_jax.train import sweep
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
_STEP = flags.DEFINE_integer(
    "step", None, "Checkpoint step for --mode=eval/sample (default: newest).")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue (--mode=sample).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 200,
                                   "Tokens to generate (--mode=sample).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1,
                                    "Continuations to print (--mode=sample).")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, "0: greedy; else sample softmax(logits / T).")
_TOP_K = flags.DEFINE_integer("top_k", None,
                              "Sample among the k most likely tokens only.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of --mode=sample.")
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
  if _MODE.value == "sample":
    run = loading.load(_WORKDIR.value, _STEP.value)
    samples = sampling.continue_text(
        run, _PROMPT.value, _NUM_TOKENS.value, num_samples=_NUM_SAMPLES.value,
        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, seed=_SEED.value)
    print(f"{_WORKDIR.value}, step {run.step}:")
    print(sampling.format_samples(_PROMPT.value, samples))
    return
  config = _CONFIG.value
  overrides = {}
  if config is not None:
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
  elif _MODE.value == "eval":
    config = loading.read_config(_WORKDIR.value)
  else:
    raise app.UsageError("pass --config=configs/<file>.py[:arg] (or --sweep)")
  if _DRY_RUN.value:
    trainer.dry_run(config, _WORKDIR.value, overrides=overrides)
    return
  if _MODE.value == "train":
    summary = trainer.train(config, _WORKDIR.value, force=_FORCE.value,
                            overrides=overrides)
  else:
    summary = trainer.evaluate(config, _WORKDIR.value, force=_FORCE.value,
                               step=_STEP.value)
  print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
