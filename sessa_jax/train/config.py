"""Experiment configs: sections, defaults, validation, loading, overrides.

An experiment config is an `ml_collections.ConfigDict` with four sections:
`model` (fields of `sessa_jax.models.config.ModelConfig`), `data` (read by
`sessa_jax.data.get_task`), `train` (`TrainConfig`) and `mesh` (`MeshConfig`).
`base_config` writes every key out, and every key set afterwards goes through
`apply_overrides`, the one place an unknown key is refused (with the list of
known ones); the dataclasses then check the values.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import pathlib
import re
from typing import Any, Mapping

import ml_collections

from sessa_jax import checks
from sessa_jax import data as data_lib
from sessa_jax.models import mixers
from sessa_jax.models.config import ModelConfig

SECTIONS = ("model", "data", "train", "mesh")
# Model sizes shared by the configs: width, depth, heads, Mamba-2 head/state.
MODEL_SIZES: Mapping[str, Mapping[str, int]] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, ssm_head_dim=16,
                 ssm_state=16),
    "small": dict(d_model=128, n_layers=4, n_heads=4, ssm_head_dim=32,
                  ssm_state=32),
    "base": dict(d_model=256, n_layers=6, n_heads=8, ssm_head_dim=64,
                 ssm_state=64),
}
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, evaluation, logging and checkpointing.

  Attributes:
    steps: optimizer steps in the whole run.
    batch_size: global batch size (sequences per optimizer step, all hosts).
    lr: peak learning rate.
    min_lr_ratio: final learning rate of the cosine decay, as a fraction of lr.
    warmup_steps: linear warmup from 0 to lr.
    weight_decay: decoupled AdamW weight decay (matrices only; see
      `optimizer.decay_mask`).
    b1: AdamW first-moment decay.
    b2: AdamW second-moment decay.
    grad_clip: clip the global gradient norm to this value (0 disables).
    grad_accum: micro-batches per optimizer step; batch_size must divide by it.
    dtype: compute dtype of activations (parameters stay float32).
    eval_every: evaluate on the validation split every this many steps
      (0: only at the end).
    eval_batches: validation batches per evaluation (0: the whole split).
    test_batches: test batches of the final evaluation (0: the whole split).
    checkpoint_every: save a checkpoint every this many steps.
    keep_checkpoints: how many recent checkpoints to keep.
    log_every: write train metrics every this many steps.
    seed: seed of parameter initialisation and of the data order.
    profile_steps: (start, count): trace steps start+1 .. start+count with
      `jax.profiler` into `WORKDIR/tb` (TensorBoard's profile tab); count 0
      traces nothing. Step 1 includes compilation, so start >= 1 profiles
      steady-state steps.
  """

  steps: int = 1000
  batch_size: int = 32
  lr: float = 1e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 100
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  grad_accum: int = 1
  dtype: str = "float32"
  eval_every: int = 500
  eval_batches: int = 20
  test_batches: int = 0
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  log_every: int = 50
  seed: int = 0
  profile_steps: tuple[int, int] = (0, 0)

  def __post_init__(self):
    profile = tuple(self.profile_steps)
    if len(profile) != 2 or min(profile) < 0 or not all(
        isinstance(x, int) for x in profile):
      raise ValueError("train.profile_steps must be (start, count) with two "
                       f"integers >= 0, got {self.profile_steps!r}")
    object.__setattr__(self, "profile_steps", profile)
    checks.one_of("train", "dtype", self.dtype, COMPUTE_DTYPES)
    checks.at_least("train", self, (
        "steps", "batch_size", "grad_accum", "checkpoint_every",
        "keep_checkpoints", "log_every"))
    checks.at_least("train", self, (
        "warmup_steps", "eval_every", "eval_batches", "test_batches",
        "weight_decay", "grad_clip", "lr"), minimum=0)
    if self.batch_size % self.grad_accum:
      raise ValueError(f"train.batch_size={self.batch_size} is not divisible "
                       f"by train.grad_accum={self.grad_accum}")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ValueError(
          f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
    for key in ("b1", "b2"):
      if not 0.0 <= getattr(self, key) < 1.0:
        raise ValueError(
            f"train.{key} must lie in [0, 1), got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh ('data', 'fsdp', 'tensor'); one axis may be -1 (the rest).

  Attributes:
    data: data-parallel replicas (parameters replicated).
    fsdp: data-parallel shards over which parameters are split along 'embed'.
    tensor: tensor-parallel shards ('hidden' and 'vocab' dimensions).
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = dataclasses.astuple(self)
    if sizes.count(-1) > 1:
      raise ValueError(f"at most one of mesh.data/fsdp/tensor may be -1, "
                       f"got {dataclasses.asdict(self)}")
    for key, size in dataclasses.asdict(self).items():
      if size != -1 and size < 1:
        raise ValueError(f"mesh.{key} must be >= 1 or -1, got {size}")


def default_train() -> ml_collections.ConfigDict:
  """The `train` section with every key at its default."""
  return ml_collections.ConfigDict(dataclasses.asdict(TrainConfig()))


def default_mesh() -> ml_collections.ConfigDict:
  """The `mesh` section with every key at its default."""
  return ml_collections.ConfigDict(dataclasses.asdict(MeshConfig()))


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A validated experiment config.

  Attributes:
    model: the model, computing in `train.dtype` with float32 parameters;
      vocab_size None (`model.vocab_size=0`) means the task's.
    data: the `data` section as a plain dict, for `sessa_jax.data.get_task`.
    train: optimisation and bookkeeping.
    mesh: device mesh shape.
    raw: the whole config as a plain dict (written to `config.json`).
  """

  model: ModelConfig
  data: Mapping[str, Any]
  train: TrainConfig
  mesh: MeshConfig
  raw: Mapping[str, Any]

  def model_config(self, vocab_size: int) -> ModelConfig:
    """The ModelConfig for a task with `vocab_size` token ids.

    Args:
      vocab_size: the task's vocabulary size; `model.vocab_size` may be 0
        for exactly this, or at least this.

    Returns:
      `model` with its vocabulary set.
    """
    given = self.model.vocab_size
    if given is None:
      return self.model.replace(vocab_size=vocab_size)
    if given < vocab_size:
      raise ValueError(f"model.vocab_size={given} is smaller than the task's "
                       f"vocabulary ({vocab_size})")
    return self.model


def validate(config: ml_collections.ConfigDict | Mapping[str, Any]
            ) -> Experiment:
  """Checks every section and key of an experiment config.

  Args:
    config: the experiment ConfigDict (or nested dict).

  Returns:
    The validated `Experiment`.

  Raises:
    ValueError: naming the offending key and the allowed choices.
  """
  raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else (
      dict(config))
  for name in raw:
    if name not in SECTIONS:
      raise ValueError(
          f"unknown config section {name!r}; known sections: "
          f"{', '.join(SECTIONS)}")
  sections = {name: dict(raw.get(name) or {}) for name in SECTIONS}
  _check_finite(sections)
  if "task" not in sections["data"]:
    raise ValueError("data.task is missing")
  model, train_dtype = sections["model"], sections["train"].get(
      "dtype", "float32")
  if model.pop("dtype", "float32") not in ("float32", train_dtype):
    raise ValueError("set the compute dtype with train.dtype, not model.dtype")
  if model.pop("param_dtype", "float32") != "float32":
    raise ValueError("model.param_dtype must be float32 for training "
                     "(train.dtype sets the compute dtype)")
  full = base_config(**sections)
  train = TrainConfig(**full.train)
  model_values = {**full.model, "vocab_size": full.model.vocab_size or None,
                  "dtype": train.dtype, "param_dtype": "float32"}
  return Experiment(model=ModelConfig(**model_values),
                    data=sections["data"], train=train,
                    mesh=MeshConfig(**full.mesh), raw=raw)


def _check_finite(sections: Mapping[str, Mapping[str, Any]]) -> None:
  """Refuses a NaN or infinite number anywhere in the config, naming its key."""
  for name, section in sections.items():
    for key, value in section.items():
      if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}.{key} must be a finite number, got {value}")


def _field_reference(field: dataclasses.Field) -> Any:
  """A ConfigDict value for a dataclass field; None defaults keep their type."""
  if field.default is not None:
    return field.default
  kinds = [t for t in (int, float, str) if t.__name__ in str(field.type)]
  if not kinds:
    return None
  return ml_collections.FieldReference(None, field_type=kinds[0])


def base_config(*, model: Mapping[str, Any], data: Mapping[str, Any],
                train: Mapping[str, Any],
                mesh: Mapping[str, Any] | None = None
               ) -> ml_collections.ConfigDict:
  """A full experiment config: every key present, so any can be overridden.

  Args:
    model: ModelConfig fields that differ from the defaults.
    data: `task` plus task knobs that differ from the task's defaults.
    train: TrainConfig fields that differ from the defaults.
    mesh: MeshConfig fields that differ from the defaults.

  Returns:
    ConfigDict with sections model (vocab_size 0: the task's), data, train,
    mesh.
  """
  model_section = {f.name: _field_reference(f)
                   for f in dataclasses.fields(ModelConfig)
                   if f.name not in ("dtype", "param_dtype")}
  model_section["vocab_size"] = 0
  task = data["task"]
  if task not in data_lib.TASKS:
    raise ValueError(f"unknown data.task {task!r}; choices: "
                     f"{', '.join(sorted(data_lib.TASKS))}")
  data_section = {"task": task, "num_workers": 0}
  data_section.update(
      {f.name: _field_reference(f)
       for f in dataclasses.fields(data_lib.TASKS[task].Config)})
  config = ml_collections.ConfigDict({
      "model": model_section, "data": data_section, "train": default_train(),
      "mesh": default_mesh()})
  return apply_overrides(config, {
      f"{name}.{key}": value
      for name, values in (("model", model), ("data", data), ("train", train),
                           ("mesh", mesh or {}))
      for key, value in values.items()})


def parse_arg(arg: str | None, sizes: Mapping[str, Mapping[str, Any]],
              default_size: str) -> tuple[str, str]:
  """Reads a config argument like 'sessa', 'mamba2,tiny' or 'tiny'.

  Args:
    arg: comma-separated mixer and/or size names (None: the defaults).
    sizes: the config's size presets.
    default_size: the size when none is given.

  Returns:
    (mixer, size); the mixer defaults to 'sessa'.

  Raises:
    ValueError: on a word that is neither a mixer nor a size, listing both.
  """
  mixer, size = "sessa", default_size
  registered = mixers.names()
  for word in filter(None, (arg or "").split(",")):
    if word in registered:
      mixer = word
    elif word in sizes:
      size = word
    else:
      raise ValueError(
          f"config argument {word!r} is neither a mixer "
          f"({', '.join(registered)}) nor a size ({', '.join(sizes)})")
  return mixer, size


def sized_config(arg: str | None, *, default_size: str,
                 data: Mapping[str, Any],
                 train: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """base_config of a config file whose argument picks a mixer and a size.

  Args:
    arg: the config file's argument, read by `parse_arg` with MODEL_SIZES.
    default_size: the MODEL_SIZES preset when `arg` names none.
    data: as in `base_config`.
    train: as in `base_config`.

  Returns:
    The config of the chosen mixer at the chosen size.
  """
  mixer, size = parse_arg(arg, MODEL_SIZES, default_size=default_size)
  return base_config(model=dict(mixer=mixer, **MODEL_SIZES[size]), data=data,
                     train=train)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:arg]' by calling its `get_config(arg)`.

  Args:
    spec: the config file, optionally followed by ':' and its argument.

  Returns:
    The ConfigDict.
  """
  module, arg = load_module(spec, kind="config")
  return module.get_config(arg)


def load_module(spec: str, *, kind: str):
  """Imports the Python file of 'path/to/file.py[:arg]'.

  Args:
    spec: the file, optionally followed by ':' and an argument.
    kind: what the file holds ('config', 'sweep'), for the error message.

  Returns:
    (module, arg), arg None when the spec has none.
  """
  path, _, arg = spec.partition(":")
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"{kind} file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(
      f"_{kind}_{pathlib.Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, arg or None


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys ('train.lr': 1e-3) on a copy of `config`.

  The copy is locked while the keys are set, so ml_collections refuses any key
  the config does not already have: this is the one check for unknown keys
  (`base_config`, `validate` and sweeps all set keys through here).

  Args:
    config: the base config.
    overrides: dotted key -> value.

  Returns:
    The updated copy (unlocked, like `config`).

  Raises:
    ValueError: on a key the config does not have, naming it and listing the
      keys of its section; or a value of the wrong type, naming the key.
  """
  config = copy.deepcopy(config)
  config.lock()
  for dotted, value in overrides.items():
    try:
      config.update_from_flattened_dict({dotted: value})
    except KeyError as e:
      raise ValueError(_unknown_key_message(config, dotted, str(e))) from None
    except TypeError as e:
      raise ValueError(f"config key {dotted!r}: {e}") from None
  config.unlock()
  return config


def _unknown_key_message(config: ml_collections.ConfigDict, dotted: str,
                         error: str) -> str:
  """Names an unknown dotted key, the keys beside it and the library's hint."""
  node, parents = config, []
  for name in dotted.split(".")[:-1]:
    if not isinstance(node.get(name), ml_collections.ConfigDict):
      break
    node = node[name]
    parents.append(name)
  section = ".".join(parents) or "the config"
  message = (f"unknown config key {dotted!r}; known keys of {section}: "
             f"{', '.join(sorted(node))}")
  hint = re.search(r'Did you mean "(\w+)"', error)
  if hint:
    message += f" (did you mean {'.'.join(parents + [hint[1]])!r}?)"
  return message
