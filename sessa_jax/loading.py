"""Load a trained run from its workdir: model, config and tokenizer.

  run = sessa_jax.load("workdirs/default")          # the newest checkpoint
  logits = run.model(tokens_bt)
  run = sessa_jax.load("workdirs/text", step=2000)  # a given step
  text = run.tokenizer.decode(run.model.generate(prompt, 100)[0])
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

import jax
import ml_collections
from flax import nnx

from sessa_jax import data as data_lib
from sessa_jax.models.lm import LanguageModel
from sessa_jax.train import checkpoint as checkpoint_lib
from sessa_jax.train import config as config_lib
from sessa_jax.train import sharding as sharding_lib
from sessa_jax.train import trainer


@dataclasses.dataclass(frozen=True)
class LoadedRun:
  """A trained model with what it was trained on.

  Attributes:
    model: the LanguageModel holding the checkpoint's parameters (on one
      device).
    config: the run's experiment config (from `WORKDIR/config.json`).
    tokenizer: the task's tokenizer (`encode`, `decode`, `separator_id`);
      None for tasks without text (MQAR, SymbolSoup, token files).
    task: the data task, for its splits and metrics.
    step: the checkpoint's step.
  """

  model: LanguageModel
  config: ml_collections.ConfigDict
  tokenizer: Any
  task: data_lib.Task
  step: int


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The experiment config a run saved in `WORKDIR/config.json`.

  Raises:
    FileNotFoundError: the workdir has no config.json (not a run directory).
  """
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} does not exist: {workdir} is not a run directory written by "
        "launch.py (or its run never started)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load(workdir: str | pathlib.Path, step: int | None = None, *,
         model_overrides: Mapping[str, Any] | None = None) -> LoadedRun:
  """Loads a checkpoint of the run in `workdir` onto one device.

  Nothing in the workdir is written or moved (the text task reads the
  tokenizer it cached there).

  Args:
    workdir: a run directory written by `launch.py` (config.json,
      checkpoints/).
    step: the checkpoint's step; None takes the newest readable one.
    model_overrides: ModelConfig fields to change that leave the parameters
      as they are, e.g. {'feedback_impl': 'dense'}.

  Returns:
    The `LoadedRun`.

  Raises:
    FileNotFoundError: no config.json, no checkpoint, or no checkpoint of
      `step` (the message lists the saved steps).
    CheckpointRestoreError: no checkpoint can be read into this model.
  """
  workdir = pathlib.Path(workdir)
  config = read_config(workdir)
  exp = config_lib.validate(config)
  task = data_lib.get_task(exp.data, workdir=str(workdir))
  model_cfg = exp.model_config(task.vocab_size)
  if model_overrides:
    model_cfg = model_cfg.replace(**model_overrides)
  mesh = sharding_lib.make_mesh(config_lib.MeshConfig(),
                                devices=jax.local_devices()[:1])
  state_spec = trainer.make_state_spec(model_cfg, exp.train, mesh)
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint in {directory}")
  checkpointer = checkpoint_lib.Checkpointer(directory, read_only=True)
  try:
    if not checkpointer.all_steps():
      raise FileNotFoundError(f"no checkpoint in {directory}")
    step, state = checkpointer.restore(state_spec.abstract, step=step)
  finally:
    checkpointer.close()
  model = nnx.merge(state_spec.graphdef, state["params"])
  return LoadedRun(model=model, config=config,
                   tokenizer=getattr(task, "tokenizer", None), task=task,
                   step=step)
