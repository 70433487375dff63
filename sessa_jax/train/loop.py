"""The train loop: restore, then steps, with the periodic work as hooks.

Each step runs the jitted train step, then the hooks (`hooks.Hooks`), in
this order: the finiteness check, the metric writer's check, the
throughput window, the progress bar, metrics every `train.log_every` steps,
evaluation every `train.eval_every`, the stop poll (SIGTERM, Ctrl-C,
`stop_at`), and a checkpoint every `train.checkpoint_every` steps, at the
last step and when stopping. The run ends with an evaluation on val and
test and its summary.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np

from sessa_jax.train import hooks as hooks_lib
from sessa_jax.train import metrics as metrics_lib
from sessa_jax.train import profiling
from sessa_jax.train import run_info
from sessa_jax.train import run as run_lib
from sessa_jax.train import sharding as sharding_lib
from sessa_jax.train import step as step_lib
from sessa_jax.train import workdir_files
from sessa_jax.train.preemption import Preemption
from sessa_jax.train.processes import RunProcesses
from sessa_jax.train.throughput import Throughput


def train_loop(run: run_lib.Run, start_time: float, stop_at: int | None,
               preemption: Preemption, stack: contextlib.ExitStack,
               overrides: Mapping[str, Any] | None,
               restore_step: int | None) -> dict[str, Any]:
  """`trainer.train` from the restore on; closes what it opens via `stack`."""
  tc = run.tc
  train_iter = run.iterator("train", train=True)
  step = run.restore(train_iter, step=restore_step)
  if step > tc.steps:
    raise ValueError(
        f"train.steps={tc.steps} is below step {step}, restored from "
        f"{run.checkpointer.directory}: raise train.steps to continue this "
        "run, or use another --workdir")
  if restore_step is not None:
    run.checkpointer.discard_after(step)
  run.start()
  if run.processes.is_primary:
    workdir_files.write_json(
        run.workdir / run_info.FILENAME,
        run_lib.introduce(run.spec, run.state_spec, overrides))
  train_step = step_lib.make_train_step(run.state_spec, tc, run.mesh)
  writer = metrics_lib.MetricWriter(run.workdir, resume_step=step,
                                    processes=run.processes)
  stack.callback(writer.close)
  profiler = profiling.StepProfiler(run.workdir / "tb", *tc.profile_steps)
  stack.callback(profiler.close)
  progress = _progress_bar(step, tc.steps, run.processes)
  if progress is not None:
    stack.callback(progress.close)
  hooks = _periodic_work(run, writer, progress, preemption, stop_at,
                         train_iter)
  while step < tc.steps:
    batch = sharding_lib.global_batch(next(train_iter), run.mesh)
    profiler.before_step(step)
    run.state, metrics = train_step(run.state, batch)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    step += 1
    profiler.after_step(step)
    info = hooks_lib.StepInfo(step, metrics, last=step == tc.steps)
    hooks.run(info)
    if info.stop and not info.last:
      return _stopped(run, writer, step, preemption)
  if progress is not None:
    progress.close()
  results = run.evaluate_split("val", "eval", tc.eval_batches)
  results.update(run.evaluate_split("test", "test", tc.test_batches))
  writer.write(step, _scalars(results))
  writer.close()
  writer.check()
  run.checkpointer.wait()
  return run.summary(step, time.time() - start_time, results)


def _periodic_work(run: run_lib.Run, writer: metrics_lib.MetricWriter,
                   progress, preemption: Preemption, stop_at: int | None,
                   train_iter) -> hooks_lib.Hooks:
  """The hooks of a run's loop, in the order they run after each step."""
  tc = run.tc
  throughput = Throughput(run)
  hooks = hooks_lib.Hooks()

  def check_finite(info):
    for name in ("loss", "grad_norm"):
      if not np.isfinite(info.metrics[name]):
        run.checkpointer.wait()
        raise FloatingPointError(
            f"non-finite training {name} ({info.metrics[name]}) at step "
            f"{info.step}; stopped without saving. "
            f"{run_lib.divergence_advice(run.checkpointer)}")

  def show_progress(info):
    progress.update(1)
    progress.set_postfix(loss=f"{info.metrics['loss']:.3f}",
                         acc=f"{info.metrics['accuracy']:.3f}", refresh=False)

  def log_metrics(info):
    scalars = {f"train/{k}": v for k, v in info.metrics.items()}
    scalars.update(throughput.read())
    writer.write(info.step, scalars)

  def evaluate(info):
    if info.last:  # The run's end evaluates on val and test.
      return
    results = run.evaluate_split("val", "eval", tc.eval_batches)
    writer.write(info.step, _scalars(results))
    _print_eval(run, info.step, results, progress)
    throughput.restart()

  def poll_stop(info):
    info.stop = preemption.reached(info.step) or info.step == stop_at

  def checkpoint(info):
    writer.flush()  # A checkpoint is never ahead of the written metrics.
    run.save(info.step, train_iter)

  hooks.add(check_finite)
  hooks.add(lambda info: writer.check())
  hooks.add(throughput.tick)
  if progress is not None:
    hooks.add(show_progress)
  hooks.add(log_metrics, every=tc.log_every, at_last=True)
  hooks.add(evaluate, every=tc.eval_every)
  hooks.add(poll_stop)
  hooks.add(checkpoint, every=tc.checkpoint_every, at_last=True, on_stop=True)
  return hooks


def _stopped(run: run_lib.Run, writer: metrics_lib.MetricWriter, step: int,
             preemption: Preemption) -> dict[str, Any]:
  """Ends a run stopped early, its checkpoint saved: the `train` result."""
  run.checkpointer.wait()
  writer.close()
  writer.check()
  logging.warning("stopped at step %d; checkpoint saved in %s; relaunch "
                  "with the same --workdir to resume", step,
                  run.checkpointer.directory)
  stopped = {"preempted": True, "step": step}
  if preemption.signal_name:
    stopped["signal"] = preemption.signal_name
  return stopped


def _scalars(results: Mapping[str, Any]) -> dict[str, float]:
  return {k: v for k, v in results.items() if isinstance(v, (int, float))}


def _print_eval(run: run_lib.Run, step: int, results: Mapping[str, Any],
                progress) -> None:
  """Shows an evaluation during training on the primary's console."""
  if not run.processes.is_primary:
    return
  line = ", ".join(f"{k} {v:.4g}" for k, v in sorted(_scalars(results).items()))
  if progress is not None:
    progress.write(f"step {step}: {line}")
  else:  # A packed sweep's point: name it.
    logging.info("%s, step %d: %s", run.workdir.name, step, line)


def _progress_bar(step: int, total: int, processes: RunProcesses):
  """A tqdm bar on the primary; none in a packed sweep's point threads."""
  if (not processes.is_primary
      or threading.current_thread() is not threading.main_thread()):
    return None
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
                   mininterval=1.0)
