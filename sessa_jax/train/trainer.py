"""The trainer's entry points: train a run, evaluate its checkpoint, dry-run.

A run (`train`) takes the workdir's lock, validates the config, builds the
task, mesh, model and optimizer (`run.Run`), resumes from the newest
readable checkpoint in the workdir (only then writing `config.json`), then
loops (`loop.train_loop`): next batch -> jitted step (`step`) -> periodic
work as hooks (metrics, eval, checkpoint). It stops at `train.steps` (then
evaluates on val and test and writes `summary.json`), on SIGTERM or Ctrl-C
(`preemption`; after saving a checkpoint, the caller exits with
`EXIT_PREEMPTED` or `EXIT_INTERRUPTED`), or on a non-finite loss, gradient
norm or state (raising, with the last checkpoint left as it was: checkpoints
are saved only from finite states). `evaluate_checkpoint` reads a finished
or running workdir and writes only `eval_summary.json`.

Callers reach the step, the preemption flag and the workdir files through
this module too; each lives in its own module.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from sessa_jax import data as data_lib
from sessa_jax import targets
from sessa_jax.train import compiled as compiled_lib
from sessa_jax.train import loop
from sessa_jax.train import target_compile
from sessa_jax.train import workdir_lock
from sessa_jax.train import workdir_files
from sessa_jax.train.preemption import Preemption
from sessa_jax.train.processes import RunProcesses
from sessa_jax.train.run import Run
from sessa_jax.train.run import introduce
from sessa_jax.train.run import make_run_spec as setup
from sessa_jax.train.step import make_state_spec
from sessa_jax.train.step import make_train_step
from sessa_jax.train.workdir_files import finished_summary
# Reached through this module by callers.
# pylint: disable=unused-import,g-bad-import-order
from sessa_jax.train.preemption import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from sessa_jax.train.preemption import EXIT_PREEMPTED as EXIT_PREEMPTED
# pylint: enable=unused-import,g-bad-import-order


def abstract_batch(task: data_lib.Task, batch_size: int
                  ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a global batch of `task` (its first example's)."""
  example = task.example("train", 0)
  return {k: jax.ShapeDtypeStruct((batch_size, *np.shape(v)),
                                  np.asarray(v).dtype)
          for k, v in example.items()}


class DoesNotFit(RuntimeError):
  """A compiled train step needs more memory per device than the chip has."""


def dry_run(config, workdir: str | pathlib.Path | None = None, *,
            overrides: Mapping[str, Any] | None = None,
            target: targets.Target | str | None = None) -> dict[str, Any]:
  """Builds the model and optimizer and compiles one train step; trains nothing.

  Lowers and compiles the step on the configured mesh from abstract shapes
  (no parameters are allocated) and reports XLA's memory and cost analysis.
  No checkpoint, log or config file is written (the text task may cache its
  tokenizer under `workdir`, as a run would).

  Args:
    config: the experiment ConfigDict.
    workdir: the run directory (only for the task's cache); may be None.
    overrides: config keys set on top of the config file, for the report.
    target: compile for this chip (`sessa_jax.targets`: `h200`, `v5e:2x2`,
      ...) instead of the local devices, without it: the mesh spans all of
      the target's chips and kernels are chosen for it
      (`target_compile`).

  Returns:
    The run description (`run_info.describe`) plus `compile_s`, `compiled`
    (the step's `compiled.analyze` figures per device),
    `model_flops_per_device` (3 x the forward count; XLA's cost model
    leaves out Pallas kernels and gives nothing on GPU), and `target`,
    `memory_bytes` and `fits` (peak per device within the chip's memory).

  Raises:
    DoesNotFit: when the peak memory per device exceeds the chip's.
    target_compile.KernelTooLarge: when a kernel does not fit on chip.
  """
  if isinstance(target, str):
    target = targets.parse(target)
  devices = None if target is None else target_compile.devices(target)
  compiling = (contextlib.nullcontext() if target is None
               else target_compile.compiling(target, devices[0]))
  with compiling:
    spec = setup(config, workdir, devices)
    tc = spec.exp.train
    state_spec = make_state_spec(spec.model_cfg, tc, spec.mesh)
    info = introduce(spec, state_spec, overrides)
    step = make_train_step(state_spec, tc, spec.mesh)
    start = time.time()
    compiled = step.lower(
        state_spec.abstract,
        abstract_batch(spec.task, tc.batch_size)).compile()
  info["compile_s"] = time.time() - start
  info["compiled"] = compiled_lib.analyze(compiled)
  # Forward + backward, about 3x the forward (`budget.flops_per_token`).
  info["model_flops_per_device"] = (3 * info["flops_per_token"]
                                    * info["tokens_per_step"]
                                    / spec.mesh.devices.size)
  chip = target or targets.local()
  info["target"], info["memory_bytes"] = chip.name, chip.memory_bytes
  peak = info["compiled"]["peak_bytes"]
  info["fits"] = (None if peak is None or chip.memory_bytes is None
                  else peak <= chip.memory_bytes)
  if spec.processes.is_primary:
    print(f"one train step compiled for {chip.name} in "
          f"{info['compile_s']:.1f} s\n"
          + compiled_lib.format_analysis(info["compiled"],
                                         chip.memory_bytes)
          + f"; model count (3 x forward) "
          f"{info['model_flops_per_device']:.4g}", flush=True)
  if info["fits"] is False:
    raise DoesNotFit(
        f"the train step needs {peak / 2**30:.2f} GiB per device at its peak;"
        f" {chip.name} has {chip.memory_bytes / 2**30:.2f} GiB (lower "
        "train.batch_size, raise train.grad_accum or mesh.fsdp, or set "
        "model.remat)")
  return info


def train(config, workdir: str | pathlib.Path, *, force: bool = False,
          stop_at: int | None = None,
          preemption: Preemption | None = None,
          overrides: Mapping[str, Any] | None = None,
          devices: Sequence[jax.Device] | None = None,
          restore_step: int | None = None) -> dict[str, Any]:
  """Trains (or resumes) the experiment in `workdir`.

  Before the first step the run describes itself (`run_info`) on stdout and
  in `WORKDIR/run_info.json`. `train.profile_steps` = (start, count) with
  count > 0 traces steps start+1 .. start+count with `jax.profiler` into
  `WORKDIR/tb` (TensorBoard's profile tab).

  Args:
    config: the experiment ConfigDict.
    workdir: the run directory (created; resumed when it holds checkpoints).
    force: resume even if config.json differs in model or data (the new
      config must still restore a checkpoint; config.json is rewritten only
      then).
    stop_at: stop after this step as if preempted (checkpoint, no final
      evaluation); None runs to `train.steps`.
    preemption: the SIGTERM flag to poll, for a caller (a sweep) that keeps
      one across runs; default: one installed for this run.
    overrides: config keys set on top of the config file (command line,
      sweep point), for the start-of-run report.
    devices: the devices to train on (default: all), e.g. a packed sweep's
      sub-mesh. Every process owning one of them calls `train`, and no
      other process takes part (`RunProcesses`).
    restore_step: resume from this checkpoint instead of the newest (no
      fallback), deleting the later ones once it is restored (a logged
      warning names them); a finished run trains again from there.

  Returns:
    The summary (also in summary.json; a finished run returns it unchanged);
    when stopped early, a dict with `preempted: True` and `step` (and
    `signal`, "SIGTERM" or "SIGINT", when a signal stopped it).

  Raises:
    FloatingPointError: on a non-finite loss, gradient norm or state (no
      checkpoint is written for it).
    WorkdirLockedError: another process is running in `workdir`.
    FileNotFoundError: `restore_step` is not a saved step (the message lists
      them).
    MetricWriteError: metrics could not be written (e.g. disk full).
  """
  start_time = time.time()
  processes = RunProcesses.of(devices or jax.devices())
  with (workdir_files.removed_unless_started(workdir, processes),
        contextlib.ExitStack() as stack):
    stack.enter_context(workdir_lock.WorkdirLock(workdir, processes))
    if preemption is None:
      preemption = stack.enter_context(Preemption(processes))
    run = Run(config, workdir, force=force, devices=devices)
    stack.callback(run.close)
    done = finished_summary(run.workdir, run.tc.steps)
    if run.config_changes:
      logging.warning("--force: resuming %s with %s", run.workdir,
                      "; ".join(run.config_changes))
    if done is not None and not run.config_changes and restore_step is None:
      logging.info("%s already finished %d steps; nothing to do",
                      run.workdir, run.tc.steps)
      return done
    return loop.train_loop(run, start_time, stop_at, preemption, stack,
                           overrides, restore_step)



def evaluate_checkpoint(config, workdir: str | pathlib.Path, *,
                        force: bool = False, step: int | None = None
                       ) -> dict[str, Any]:
  """Evaluates a checkpoint of `workdir` (the newest, or `step`) on val, test.

  Read-only: checkpoints, config.json, summary.json and metrics are left as
  they are; the results go to `eval_summary.json`, whose `steps` names the
  checkpoint evaluated.

  Args:
    config: the experiment ConfigDict (model and data must match config.json).
    workdir: the run directory holding checkpoints.
    force: evaluate even if config.json differs in model or data.
    step: the checkpoint's step; None takes the newest readable one.

  Returns:
    The summary (also written to eval_summary.json).

  Raises:
    FileNotFoundError: `workdir` holds no checkpoints, or none of `step`.
    CheckpointRestoreError: none of them can be restored.
  """
  start_time = time.time()
  directory = pathlib.Path(workdir) / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoints to evaluate: {directory} does "
                            "not exist")
  run = Run(config, workdir, force=force, read_only=True)
  try:
    if not run.checkpointer.all_steps():
      raise FileNotFoundError(f"no checkpoints to evaluate in {directory}")
    step = run.restore(step=step)
    results = run.evaluate_split("val", "eval", run.tc.eval_batches)
    results.update(run.evaluate_split("test", "test", run.tc.test_batches))
    return run.summary(step, time.time() - start_time, results,
                       filename="eval_summary.json")
  finally:
    run.close()
