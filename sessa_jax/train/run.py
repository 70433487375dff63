"""One run's resources: its config resolved, and the state it trains.

`make_run_spec` resolves a config into a `RunSpec` (task, model config,
mesh, processes) before any state exists; a `Run` adds what one experiment
in one workdir holds: the state, its checkpointer, the data iterators and
the eval step, with loading, saving and evaluating the state.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from sessa_jax import budget
from sessa_jax import data as data_lib
from sessa_jax.models.config import ModelConfig
from sessa_jax.train import checkpoint as checkpoint_lib
from sessa_jax.train import config as config_lib
from sessa_jax.train import evaluate as evaluate_lib
from sessa_jax.train import run_info
from sessa_jax.train import sharding as sharding_lib
from sessa_jax.train import step as step_lib
from sessa_jax.train import workdir_files
from sessa_jax.train.processes import RunProcesses


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What an experiment config resolves to before any state exists.

  Attributes:
    exp: the validated config.
    task: the data task.
    model_cfg: the model (the task's vocabulary, `train.dtype` compute).
    mesh: the device mesh of `exp.mesh`, checked against the batch size.
    processes: the processes owning the mesh's devices, which run it.
  """

  exp: config_lib.Experiment
  task: data_lib.Task
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  processes: RunProcesses


def make_run_spec(config, workdir: str | pathlib.Path | None = None,
                  devices: Sequence[jax.Device] | None = None
                 ) -> RunSpec:
  """Validates a config and builds its task, model config and mesh.

  Args:
    config: the experiment ConfigDict (or nested dict, or an already
      validated `config_lib.Experiment`).
    workdir: the run directory, where tasks cache derived files (the text
      task's tokenizer); nothing else is written.
    devices: the devices of the mesh (default: all).

  Returns:
    The `RunSpec`.

  Raises:
    ValueError: on a bad key or value, a split smaller than one batch, or a
      batch the mesh cannot split.
  """
  exp = (config if isinstance(config, config_lib.Experiment)
         else config_lib.validate(config))
  tc = exp.train
  task = data_lib.get_task(exp.data,
                           workdir=None if workdir is None else str(workdir))
  for split in data_lib.SPLITS:  # Val and test are read only at the end.
    data_lib.check_split_size(task, split, tc.batch_size)
  mesh = sharding_lib.make_mesh(exp.mesh, devices)
  processes = RunProcesses.of(mesh.devices.flat)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if (tc.batch_size // tc.grad_accum % batch_shards
      or tc.batch_size % processes.count):
    raise ValueError(
        f"train.batch_size={tc.batch_size} / train.grad_accum="
        f"{tc.grad_accum} must be divisible by mesh data*fsdp="
        f"{batch_shards}, and batch_size by the {processes.count} "
        "processes")
  return RunSpec(exp, task, exp.model_config(task.vocab_size), mesh, processes)


class Run:
  """One experiment in one workdir: task, mesh, state, iterators, writers.

  Constructing a Run writes nothing to the workdir (a text task may cache its
  tokenizer there); `start` writes config.json once the state is loaded.

  Args:
    config: the experiment ConfigDict.
    workdir: the run directory.
    force: resume even if config.json differs in model or data.
    read_only: evaluation: checkpoints are only read, never moved.
    devices: the devices of the mesh (default: all).
  """

  def __init__(self, config, workdir: str | pathlib.Path, *,
               force: bool = False, read_only: bool = False,
               devices: Sequence[jax.Device] | None = None):
    self.exp = config_lib.validate(config)
    self.tc = self.exp.train
    self.workdir = pathlib.Path(workdir)
    self.config_changes = workdir_files.check_resume(
        self.workdir, self.exp.raw, force)
    self.spec = make_run_spec(self.exp, self.workdir, devices)
    self.task, self.mesh = self.spec.task, self.spec.mesh
    self.processes = self.spec.processes
    self.model_cfg = self.spec.model_cfg
    self.state_spec = step_lib.make_state_spec(self.model_cfg, self.tc,
                                               self.mesh)
    self.all_finite = step_lib.make_finite_check(self.state_spec, self.mesh)
    self.state = None
    self.checkpointer = checkpoint_lib.Checkpointer(
        self.workdir / "checkpoints", keep=self.tc.keep_checkpoints,
        read_only=read_only, processes=self.processes)
    self.eval_step = evaluate_lib.make_eval_step(
        self.state_spec.graphdef, self.state_spec.shardings["params"],
        self.mesh)

  def iterator(self, split: str, *, train: bool):
    return data_lib.make_iterator(
        self.task, split, batch_size=self.tc.batch_size, seed=self.tc.seed,
        shuffle=train, num_epochs=None if train else 1,
        process_index=self.processes.index,
        process_count=self.processes.count,
        num_workers=self.exp.data.get("num_workers", 0))

  def restore(self, data_iter=None, *, step: int | None = None) -> int:
    """Loads the newest readable, finite checkpoint (else a fresh state).

    Args:
      data_iter: the train iterator, positioned as saved; None restores the
        model and optimizer state only.
      step: load this step only (an error if it is missing or unreadable).

    Returns:
      The step of the loaded state.

    Raises:
      CheckpointRestoreError: checkpoints exist but none can be restored.
      FileNotFoundError: `step` is not among the saved steps.
    """
    if step is None and not self.checkpointer.all_steps():
      self.state = self.state_spec.init()
      return 0
    try:
      step, self.state = self.checkpointer.restore(
          self.state_spec.abstract, data_iter, accept=self.all_finite,
          step=step)
    except checkpoint_lib.CheckpointRestoreError as e:
      if self.checkpointer.read_only:
        raise
      if self.config_changes:
        advice = (f"config.json is unchanged: with "
                  f"{'; '.join(self.config_changes)} no checkpoint fits; use "
                  "another --workdir to start fresh")
      else:
        advice = "move that directory away to start over"
      raise checkpoint_lib.CheckpointRestoreError(f"{e}; {advice}") from None
    logging.info("restored %s/%d", self.checkpointer.directory, step)
    return step

  def start(self) -> None:
    """Records config.json (the primary process): the run has really started."""
    self.processes.sync("state loaded")
    if self.processes.is_primary:
      workdir_files.write_json(self.workdir / "config.json", self.exp.raw)

  def save(self, step: int, data_iter) -> None:
    """Checkpoints the current state, which must be finite.

    Raises:
      FloatingPointError: the parameters or optimizer state hold a NaN or
        infinity; nothing is saved.
    """
    if not self.all_finite(self.state):
      self.checkpointer.wait()
      raise FloatingPointError(
          f"non-finite parameters or optimizer state at step {step}; stopped "
          f"without saving. {divergence_advice(self.checkpointer)}")
    self.checkpointer.save(step, self.state, data_iter)

  def evaluate_split(self, split: str, prefix: str, max_batches: int
                    ) -> dict[str, Any]:
    """Metrics of the current parameters on `split`, named `prefix/...`."""
    return evaluate_lib.evaluate_batches(
        self.eval_step, self.state["params"], self.iterator(split, train=False),
        max_batches=max_batches, mesh=self.mesh,
        task=self.task, prefix=prefix)

  def summary(self, steps: int, wall_time_s: float, results: Mapping[str, Any],
              filename: str = "summary.json") -> dict[str, Any]:
    """Writes `filename` in the workdir (the primary) and returns its contents.

    Only summary.json must be written (`workdir_files.write_summary`).
    """
    out = {
        **results,
        "params": int(sum(np.prod(x.shape) for x in
                          jax.tree.leaves(self.state_spec.abstract["params"]))),
        "flops_per_token": float(budget.flops_per_token(
            self.model_cfg, self.task.seq_len)),
        "steps": int(steps),
        "wall_time_s": float(wall_time_s),
        "model": self.model_cfg.mixer,
        "task": self.task.name,
    }
    if self.processes.is_primary:
      workdir_files.write_summary(self.workdir, filename, out)
    return out

  def close(self):
    self.checkpointer.close()


def divergence_advice(checkpointer: checkpoint_lib.Checkpointer) -> str:
  """What to do after a non-finite step: the checkpoints to go back to."""
  advice = (f"{checkpointer.describe_latest()}; lower train.lr or raise "
            "train.warmup_steps and relaunch")
  steps = checkpointer.all_steps()
  if len(steps) > 1:
    advice += (f", adding --restore_step={steps[0]} to resume from an earlier "
               f"checkpoint (saved steps: {', '.join(map(str, steps))})")
  return advice



def introduce(spec: RunSpec, state_spec: step_lib.TrainStateSpec,
              overrides: Mapping[str, Any] | None) -> dict[str, Any]:
  """The start-of-run description (`run_info.describe`), printed once."""
  info = run_info.describe(
      model_cfg=spec.model_cfg,
      abstract_params=state_spec.abstract["params"],
      mesh=spec.mesh, task=spec.task,
      batch_size=spec.exp.train.batch_size, overrides=overrides)
  if spec.processes.is_primary:
    print(run_info.format_info(info), flush=True)
  return info
