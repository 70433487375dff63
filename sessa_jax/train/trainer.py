"""The train loop: the state's spec, the jitted step, a run from config to summary.

A run (`train`) takes the workdir's lock, validates the config, builds the
task, mesh, model and optimizer, resumes from the newest readable checkpoint
in the workdir (only then writing `config.json`), then loops: next batch ->
jitted step -> metrics -> periodic eval and checkpoint. It stops at
`train.steps` (then evaluates on val and test and writes `summary.json`), on
SIGTERM or Ctrl-C (after saving a checkpoint; the caller exits with
`EXIT_PREEMPTED` or `EXIT_INTERRUPTED`),
or on a non-finite loss, gradient norm or state (raising, with the last
checkpoint left as it was: checkpoints are saved only from finite states).
`evaluate_checkpoint` reads a finished or running workdir and writes only
`eval_summary.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import signal
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from sessa_jax import budget
from sessa_jax import data as data_lib
from sessa_jax import models
from sessa_jax import targets
from sessa_jax.models.config import ModelConfig
from sessa_jax.train import checkpoint as checkpoint_lib
from sessa_jax.train import compiled as compiled_lib
from sessa_jax.train import config as config_lib
from sessa_jax.train import evaluate as evaluate_lib
from sessa_jax.train import metrics as metrics_lib
from sessa_jax.train import optimizer as optimizer_lib
from sessa_jax.train import profiling
from sessa_jax.train import run_info
from sessa_jax.train import sharding as sharding_lib
from sessa_jax.train import target_compile
from sessa_jax.train import workdir_lock
from sessa_jax.train.config import TrainConfig
from sessa_jax.train.processes import RunProcesses

# Sections of config.json that must match to resume in the same workdir.
RESUME_KEYS = ("model", "data")
# Keys of those sections that change how a step is computed, not what: a
# run may resume with another value.
RESUME_FREE = ("model.remat",)
# Exit status of a run (or sweep) stopped by SIGTERM after saving a
# checkpoint: sysexits' EX_TEMPFAIL, "try again later"; relaunch to resume.
EXIT_PREEMPTED = 75
# Exit status of a run (or sweep) stopped by Ctrl-C after saving: the shell's
# 128 + SIGINT.
EXIT_INTERRUPTED = 130


@dataclasses.dataclass(frozen=True)
class TrainStateSpec:
  """The train state's structure, shapes, shardings, optimizer and initialiser.

  Attributes:
    graphdef: the model's structure (static).
    abstract: pytree of `jax.ShapeDtypeStruct` (with shardings) of the state
      dict {'params', 'opt_state', 'step'}; the restore target.
    shardings: the same tree of NamedShardings.
    tx: the optimizer.
    init: jitted () -> a fresh state, created directly in its shardings.
  """

  graphdef: nnx.GraphDef
  abstract: Any
  shardings: Any
  tx: optax.GradientTransformation
  init: Callable[[], Any]


def make_state_spec(model_cfg: ModelConfig, tc: TrainConfig,
                    mesh: jax.sharding.Mesh,
                    model_fn: Callable[..., nnx.Module] | None = None
                   ) -> TrainStateSpec:
  """Shapes, shardings and the initialiser of the train state.

  The state is the dict {'params': pure dict of arrays, 'opt_state',
  'step': int32 scalar}.

  Args:
    model_cfg: the model.
    tc: the train config (seed, optimizer).
    mesh: the device mesh.
    model_fn: `(cfg, *, rngs) -> nnx.Module`; default `models.build_model`.

  Returns:
    The spec; nothing is allocated until `state_spec.init()`.
  """
  model_fn = model_fn or models.build_model
  tx = optimizer_lib.make_optimizer(tc)

  def init_model():
    return model_fn(model_cfg, rngs=nnx.Rngs(tc.seed))

  with nnx.use_eager_sharding(False):
    graphdef, abstract_params, rest = nnx.split(
        nnx.eval_shape(init_model), nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("the trainer supports models whose state is all "
                     f"nnx.Param; found other state: {rest}")
  param_shardings = sharding_lib.state_shardings(abstract_params, mesh)
  replicated = sharding_lib.replicated(mesh)

  def init():
    with nnx.use_eager_sharding(False):
      params = nnx.to_pure_dict(nnx.state(init_model(), nnx.Param))
    return {"params": params, "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32)}

  abstract = jax.eval_shape(init)
  shardings = {
      "params": param_shardings,
      "opt_state": optax.tree_map_params(
          tx, lambda _, s: s, abstract["opt_state"], param_shardings,
          transform_non_params=lambda _: replicated),
      "step": replicated,
  }
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)
  return TrainStateSpec(graphdef, abstract, shardings, tx,
                    jax.jit(init, out_shardings=shardings))


def make_train_step(state_spec: TrainStateSpec, tc: TrainConfig,
                    mesh: jax.sharding.Mesh) -> Callable:
  """The jitted step: (state, batch) -> (state, metrics).

  The global batch splits into `tc.grad_accum` micro-batches whose summed
  gradients are divided by the total number of loss tokens, so accumulation
  gives the gradient of the mean token loss over the whole batch.

  Args:
    state_spec: from `make_state_spec`.
    tc: the train config.
    mesh: the device mesh.

  Returns:
    The jitted step; metrics are replicated float32 scalars `loss`,
    `accuracy`, `grad_norm`, `lr`.
  """
  schedule = optimizer_lib.learning_rate_schedule(tc)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  micro_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec))

  def loss_fn(params, batch):
    logits_btv = nnx.merge(state_spec.graphdef, params)(batch["inputs"])
    stats = evaluate_lib.token_stats(logits_btv, batch)
    return stats["loss_sum"], stats

  def train_step(state, batch):
    params = state["params"]

    def split(x_b):  # (B, ...) -> (accum, B / accum, ...), rows strided.
      x = x_b.reshape(x_b.shape[0] // tc.grad_accum, tc.grad_accum,
                      *x_b.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(x, micro_sharding)

    def micro_step(carry, micro_batch):
      grads, totals = carry
      (_, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(
          params, micro_batch)
      return (jax.tree.map(jnp.add, grads, g),
              jax.tree.map(jnp.add, totals, stats)), None

    micro_batches = {k: split(v) for k, v in batch.items()
                     if k in ("inputs", "targets", "loss_mask")}
    zeros = jax.tree.map(jnp.zeros_like, params)
    zero_stats = {k: jnp.zeros((), jnp.float32)
                  for k in ("loss_sum", "count", "correct")}
    (grads, totals), _ = jax.lax.scan(
        micro_step, (zeros, zero_stats), micro_batches)
    count = jnp.maximum(totals["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = state_spec.tx.update(grads, state["opt_state"], params)
    new_state = {
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
        "step": state["step"] + 1,
    }
    metrics = {
        "loss": totals["loss_sum"] / count,
        "accuracy": totals["correct"] / count,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state["step"]),
    }
    return new_state, metrics

  return jax.jit(
      sharding_lib.with_abstract_mesh(train_step, mesh),
      in_shardings=(state_spec.shardings, batch_sharding),
      out_shardings=(state_spec.shardings, sharding_lib.replicated(mesh)),
      donate_argnums=0)


class Preemption:
  """Turns SIGTERM and Ctrl-C (SIGINT) into a flag the loop polls.

  A context manager. A run of all processes of a multi-process job leaves
  SIGTERM to `jax.distributed`'s preemption service, whose sync point makes
  them all stop after the same step (and Ctrl-C to Python). Otherwise
  handlers are installed on entry (the previous ones are restored on exit):
  a run of one process polls its flag; a run of some processes stops when any
  of them has it, agreed by a reduction over them at every step. A sweep
  holds one across all its points, so that a signal between points also
  stops it. After the first Ctrl-C a second one kills the process at once,
  without saving.

  Args:
    processes: the processes of the runs it stops (default: all).

  Attributes:
    requested: whether a signal asked to stop.
    signal_name: the first such signal's name ("SIGTERM", "SIGINT"), or None.
  """

  def __init__(self, processes: RunProcesses | None = None):
    self.requested = False
    self.signal_name = None
    self._processes = processes or RunProcesses.everyone()
    # A job's processes all together: jax.distributed's preemption service.
    self._service = (self._processes.count > 1
                     and self._processes.is_everyone)
    self._previous = {}

  def __enter__(self) -> Preemption:
    if not self._service:
      self._previous = {signum: signal.signal(signum, self._handle)
                        for signum in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    again = ""
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      again = " (Ctrl-C again to exit at once, without saving)"
    logging.warning("%s: saving a checkpoint after this step%s", name, again)
    self.requested = True
    self.signal_name = self.signal_name or name

  def reached(self, step: int) -> bool:
    if self._service:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._processes.any(self.requested)


def make_finite_check(state_spec: TrainStateSpec, mesh: jax.sharding.Mesh
                     ) -> Callable[[Any], bool]:
  """(state) -> whether its parameters and optimizer state are all finite.

  One jitted reduction on device; only a boolean comes back to the host.
  """
  def all_finite(state):
    leaves = [x for x in jax.tree.leaves((state["params"], state["opt_state"]))
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))

  check = jax.jit(all_finite, in_shardings=(state_spec.shardings,),
                  out_shardings=sharding_lib.replicated(mesh))
  return lambda state: bool(check(state))


def finished_summary(workdir: str | pathlib.Path, steps: int
                    ) -> dict[str, Any] | None:
  """The summary.json of a run that finished `steps` steps, else None."""
  path = pathlib.Path(workdir) / "summary.json"
  if path.exists():
    summary = read_json(path)
    if summary.get("steps") == steps:
      return summary
  return None


def read_json(path: pathlib.Path) -> Any:
  """Reads a JSON file; an unreadable one raises a ValueError naming it."""
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); "
                     "move it away to write it again") from None


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Writes JSON atomically (a reader sees the old or the new file)."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e


def _check_resume(workdir: pathlib.Path, raw: Mapping[str, Any], force: bool
                 ) -> list[str]:
  """Refuses a workdir whose config.json differs in model or data.

  Returns:
    The differences, when `force` lets them through.
  """
  path = workdir / "config.json"
  if not path.exists():
    return []
  old = read_json(path)
  new = json.loads(json.dumps(raw))
  diffs = []
  for section in RESUME_KEYS:
    before, after = old.get(section, {}), new.get(section, {})
    diffs += [f"{section}.{key}: {before.get(key)!r} -> {after.get(key)!r}"
              for key in sorted(set(before) | set(after))
              if before.get(key) != after.get(key)
              and f"{section}.{key}" not in RESUME_FREE]
  if diffs and not force:
    raise ValueError(
        f"{path} differs from the given config in {', '.join(RESUME_KEYS)} "
        f"({'; '.join(diffs)}); use another --workdir, or pass --force to "
        "resume with the new config")
  return diffs


@dataclasses.dataclass(frozen=True)
class Setup:
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


def setup(config, workdir: str | pathlib.Path | None = None,
          devices: Sequence[jax.Device] | None = None) -> Setup:
  """Validates a config and builds its task, model config and mesh.

  Args:
    config: the experiment ConfigDict (or nested dict, or an already
      validated `config_lib.Experiment`).
    workdir: the run directory, where tasks cache derived files (the text
      task's tokenizer); nothing else is written.
    devices: the devices of the mesh (default: all).

  Returns:
    The `Setup`.

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
  return Setup(exp, task, exp.model_config(task.vocab_size), mesh, processes)


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
    self.config_changes = _check_resume(self.workdir, self.exp.raw, force)
    self.resolved = setup(self.exp, self.workdir, devices)
    self.task, self.mesh = self.resolved.task, self.resolved.mesh
    self.processes = self.resolved.processes
    self.model_cfg = self.resolved.model_cfg
    self.state_spec = make_state_spec(self.model_cfg, self.tc, self.mesh)
    self.all_finite = make_finite_check(self.state_spec, self.mesh)
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
      write_json(self.workdir / "config.json", self.exp.raw)

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
          f"without saving. {_divergence_advice(self.checkpointer)}")
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

    Only summary.json must be written: another file (an evaluation's) that
    cannot be, in a read-only workdir, is left out with a warning.
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
      try:
        write_json(self.workdir / filename, out)
      except OSError as e:
        if filename == "summary.json":
          raise
        logging.warning("%s; the results are only printed", e)
    return out

  def close(self):
    self.checkpointer.close()


def _divergence_advice(checkpointer: checkpoint_lib.Checkpointer) -> str:
  """What to do after a non-finite step: the checkpoints to go back to."""
  advice = (f"{checkpointer.describe_latest()}; lower train.lr or raise "
            "train.warmup_steps and relaunch")
  steps = checkpointer.all_steps()
  if len(steps) > 1:
    advice += (f", adding --restore_step={steps[0]} to resume from an earlier "
               f"checkpoint (saved steps: {', '.join(map(str, steps))})")
  return advice


def _scalars(results: Mapping[str, Any]) -> dict[str, float]:
  return {k: v for k, v in results.items() if isinstance(v, (int, float))}


def _print_eval(run: Run, step: int, results: Mapping[str, Any],
                progress) -> None:
  """Shows an evaluation during training on the primary's console."""
  if not run.processes.is_primary:
    return
  line = ", ".join(f"{k} {v:.4g}" for k, v in sorted(_scalars(results).items()))
  if progress is not None:
    progress.write(f"step {step}: {line}")
  else:  # A packed sweep's point: name it.
    logging.info("%s, step %d: %s", run.workdir.name, step, line)


def introduce(resolved: Setup, state_spec: TrainStateSpec,
              overrides: Mapping[str, Any] | None) -> dict[str, Any]:
  """The start-of-run description (`run_info.describe`), printed once."""
  info = run_info.describe(
      model_cfg=resolved.model_cfg,
      abstract_params=state_spec.abstract["params"],
      mesh=resolved.mesh, task=resolved.task,
      batch_size=resolved.exp.train.batch_size, overrides=overrides)
  if resolved.processes.is_primary:
    print(run_info.format_info(info), flush=True)
  return info


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
    resolved = setup(config, workdir, devices)
    tc = resolved.exp.train
    state_spec = make_state_spec(resolved.model_cfg, tc, resolved.mesh)
    info = introduce(resolved, state_spec, overrides)
    step = make_train_step(state_spec, tc, resolved.mesh)
    start = time.time()
    compiled = step.lower(
        state_spec.abstract,
        abstract_batch(resolved.task, tc.batch_size)).compile()
  info["compile_s"] = time.time() - start
  info["compiled"] = compiled_lib.analyze(compiled)
  # Forward + backward, about 3x the forward (`budget.flops_per_token`).
  info["model_flops_per_device"] = (3 * info["flops_per_token"]
                                    * info["tokens_per_step"]
                                    / resolved.mesh.devices.size)
  chip = target or targets.local()
  info["target"], info["memory_bytes"] = chip.name, chip.memory_bytes
  peak = info["compiled"]["peak_bytes"]
  info["fits"] = (None if peak is None or chip.memory_bytes is None
                  else peak <= chip.memory_bytes)
  if resolved.processes.is_primary:
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
  with (_removed_unless_started(workdir, processes),
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
    return _train_loop(run, start_time, stop_at, preemption, stack,
                       overrides, restore_step)


@contextlib.contextmanager
def _removed_unless_started(workdir: str | pathlib.Path,
                            processes: RunProcesses):
  """Removes a workdir this run created if it fails before writing config.json.

  A start refused by validation (a bad config value, a missing data file)
  leaves nothing behind.
  """
  workdir = pathlib.Path(workdir)
  created = not workdir.exists()
  try:
    yield
  except BaseException:
    if (created and processes.is_primary
        and not (workdir / "config.json").exists()):
      shutil.rmtree(workdir, ignore_errors=True)
    raise


def _train_loop(run: Run, start_time: float, stop_at: int | None,
                preemption: Preemption, stack: contextlib.ExitStack,
                overrides: Mapping[str, Any] | None,
                restore_step: int | None) -> dict[str, Any]:
  """`train` from the restore on."""
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
    write_json(run.workdir / run_info.FILENAME,
               introduce(run.resolved, run.state_spec, overrides))
  train_step = make_train_step(run.state_spec, tc, run.mesh)
  writer = metrics_lib.MetricWriter(run.workdir, resume_step=step,
                                    processes=run.processes)
  stack.callback(writer.close)
  profiler = profiling.StepProfiler(run.workdir / "tb", *tc.profile_steps)
  stack.callback(profiler.close)
  tokens_per_step = tc.batch_size * run.task.seq_len
  train_flops = 3 * budget.flops_per_token(run.model_cfg, run.task.seq_len)
  peak = metrics_lib.peak_flops(dtype=tc.dtype) * run.mesh.devices.size
  progress = _progress_bar(step, tc.steps, run.processes)
  if progress is not None:
    stack.callback(progress.close)
  results: dict[str, Any] = {}
  window_start, window_steps = None, 0
  while step < tc.steps:
    batch = sharding_lib.global_batch(next(train_iter), run.mesh)
    profiler.before_step(step)
    run.state, metrics = train_step(run.state, batch)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    step += 1
    profiler.after_step(step)
    for name in ("loss", "grad_norm"):
      if not np.isfinite(metrics[name]):
        run.checkpointer.wait()
        raise FloatingPointError(
            f"non-finite training {name} ({metrics[name]}) at step {step}; "
            f"stopped without saving. {_divergence_advice(run.checkpointer)}")
    writer.check()
    if window_start is None:  # The first step compiles; time from here.
      window_start = time.time()
    else:
      window_steps += 1
    if progress is not None:
      progress.update(1)
      progress.set_postfix(loss=f"{metrics['loss']:.3f}",
                           acc=f"{metrics['accuracy']:.3f}", refresh=False)
    if step % tc.log_every == 0 or step == tc.steps:
      scalars = {f"train/{k}": v for k, v in metrics.items()}
      if window_steps:
        seconds = (time.time() - window_start) / window_steps
        tokens_per_s = tokens_per_step / seconds
        scalars.update({"train/step_time_s": seconds,
                        "train/tokens_per_s": tokens_per_s,
                        "train/mfu": train_flops * tokens_per_s / peak})
        window_start, window_steps = time.time(), 0
      writer.write(step, scalars)
    if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
      results = run.evaluate_split("val", "eval", tc.eval_batches)
      writer.write(step, _scalars(results))
      _print_eval(run, step, results, progress)
      window_start, window_steps = time.time(), 0
    stop = preemption.reached(step) or step == stop_at
    if step % tc.checkpoint_every == 0 or step == tc.steps or stop:
      writer.flush()  # A checkpoint is never ahead of the written metrics.
      run.save(step, train_iter)
    if stop and step < tc.steps:
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
  if progress is not None:
    progress.close()
  results = run.evaluate_split("val", "eval", tc.eval_batches)
  results.update(run.evaluate_split("test", "test", tc.test_batches))
  writer.write(step, _scalars(results))
  writer.close()
  writer.check()
  run.checkpointer.wait()
  return run.summary(step, time.time() - start_time, results)


def evaluate_checkpoint(config, workdir: str | pathlib.Path, *,
                        force: bool = False, step: int | None = None
                       ) -> dict[str, Any]:
  """Evaluates a checkpoint in `workdir` (the newest, or `step`) on val and test.

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


def _progress_bar(step: int, total: int, processes: RunProcesses):
  """A tqdm bar on the primary; none in a packed sweep's point threads."""
  if (not processes.is_primary
      or threading.current_thread() is not threading.main_thread()):
    return None
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
                   mininterval=1.0)
