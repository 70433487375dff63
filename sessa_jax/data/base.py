"""What every task shares: the Task interface, its config, seeding and padding.

A task is a pure function from (config, seed, split, index) to one example: a
dict of numpy arrays `inputs` (T,) int32, `targets` (T,) int32 and `loss_mask`
(T,) float32 of the task's fixed `seq_len` T, optionally `lag` (T,) int32. The
loss and the metric see only positions where `loss_mask` is 1; padding is 0.
"""

from __future__ import annotations

import abc
import dataclasses
import types
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from sessa_jax import checks

SPLITS = ("train", "val", "test")
PAD_ID = 0
# Keys every task accepts: the registry and the pipeline read `task` and
# `num_workers`; the others are fields of each task's config.
PIPELINE_KEYS = ("task", "num_workers")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Fields every task config has.

  Attributes:
    seq_len: length T of every example; longer examples are an error.
    seed: seed of the example generator (not of the shuffle).
    path: file or glob the task reads; empty for generated tasks.
  """

  seq_len: int = 256
  seed: int = 0
  path: str = ""

  @classmethod
  def from_mapping(cls, task: str, data_cfg: Mapping[str, Any]):
    """Builds the config from `data.*` keys, rejecting unknown ones.

    Args:
      task: task name, used in error messages.
      data_cfg: the `data` section of an experiment config.

    Returns:
      The validated config.

    Raises:
      ValueError: on an unknown key or a value of the wrong type.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = sorted(set(fields) | set(PIPELINE_KEYS))
    kwargs = {}
    for key, value in data_cfg.items():
      if key in PIPELINE_KEYS:
        continue
      if key not in fields:
        raise ValueError(
            f"data.{key} is not a key of task {task!r}; known keys: "
            f"{', '.join(known)}")
      kwargs[key] = _check_type(f"data.{key}", value, fields[key].default)
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class GeneratedTaskConfig(TaskConfig):
  """Fields of a task that generates its examples: the size of each split.

  Attributes:
    num_train: examples in the train split.
    num_val: examples in the val split.
    num_test: examples in the test split.
  """

  num_train: int = 100_000
  num_val: int = 1_000
  num_test: int = 1_000


def _check_type(name: str, value: Any, default: Any) -> Any:
  """Checks `value` against the type of the field's default value."""
  if isinstance(default, bool):
    ok = isinstance(value, (bool, np.bool_))
  elif isinstance(default, int):
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    value = int(value) if ok else value
  elif isinstance(default, float):
    ok = isinstance(value, (int, float, np.number)) and not isinstance(
        value, bool)
    value = float(value) if ok else value
  elif isinstance(default, str):
    ok = isinstance(value, str)
  else:
    ok = True
  if not ok:
    raise ValueError(
        f"{name} must be of type {type(default).__name__}, got {value!r}")
  return value


class Task(abc.ABC):
  """A dataset of fixed-length examples, each a pure function of its index.

  Attributes:
    name: registry name of the task.
    vocab_size: number of token ids the model must embed.
    seq_len: length T of every example.
    metrics: metrics the trainer reports on masked positions.
    bytes_per_token: UTF-8 bytes per token (text only, for bits per byte).
    special_tokens: token name -> id for tokens with a role in the format.
    uses_workdir: whether the constructor takes `workdir` (a cache location).
    path_use: what the task does with `data.path`: `unused` (a generated
      task; the path must be empty), `optional` or `required`.
    positive_keys: config fields that must be >= 1 (`seq_len` always is).
  """

  name: ClassVar[str]
  Config: ClassVar[type[TaskConfig]]
  metrics: tuple[str, ...] = ("accuracy",)
  bytes_per_token: float | None = None
  uses_workdir: ClassVar[bool] = False
  path_use: ClassVar[str] = "unused"
  positive_keys: ClassVar[tuple[str, ...]] = ()

  def __init__(self, cfg: TaskConfig):
    """Checks what every task shares: seq_len, seed, path, positive_keys."""
    checks.at_least("data", cfg, ("seq_len",) + self.positive_keys)
    checks.at_least("data", cfg, ("seed",), minimum=0)
    if cfg.path and self.path_use == "unused":
      raise ValueError(
          f"data.path is not used by task {self.name}, got {cfg.path!r}")
    if not cfg.path and self.path_use == "required":
      raise ValueError(
          f"data.path must name the files task {self.name} reads (a glob)")
    self.cfg = cfg

  @property
  def seq_len(self) -> int:
    return self.cfg.seq_len

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of token ids."""

  @property
  def special_tokens(self) -> Mapping[str, int]:
    return types.MappingProxyType({"<pad>": PAD_ID})

  @abc.abstractmethod
  def num_examples(self, split: str) -> int:
    """Number of examples in `split` ('train', 'val' or 'test')."""

  @abc.abstractmethod
  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    """Example `index` of `split`: a dict of (seq_len,) numpy arrays."""

  def source(self, split: str) -> str:
    """Where `split` comes from, for error messages ('' when generated)."""
    del split
    return ""

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.cfg})"


def check_split(split: str) -> int:
  """Returns the split's id (0, 1, 2); raises on an unknown split."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choices: {', '.join(SPLITS)}")
  return SPLITS.index(split)


def check_index(split: str, index: int, num_examples: int) -> None:
  if not 0 <= index < num_examples:
    raise IndexError(
        f"index {index} out of range for split {split!r} with "
        f"{num_examples} examples")


def example_rng(seed: int, split: str, index: int,
                stream: int = 0) -> np.random.Generator:
  """The random generator of one example, a pure function of its arguments.

  Args:
    seed: the task's generator seed.
    split: 'train', 'val' or 'test'.
    index: example index within the split.
    stream: separates independent uses of randomness for the same example.

  Returns:
    A Philox-based generator, identical on every machine and process.
  """
  entropy = [int(seed), check_split(split), int(index), int(stream)]
  return np.random.Generator(np.random.Philox(np.random.SeedSequence(entropy)))


def lm_example(tokens: Sequence[int] | np.ndarray, seq_len: int,
               answer_mask: np.ndarray | None = None,
               lag: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Shifts a token sequence into next-token inputs/targets of length seq_len.

  Args:
    tokens: (L + 1,) token ids; inputs are tokens[:-1], targets tokens[1:].
    seq_len: T >= L; positions L..T-1 are padding with loss_mask 0.
    answer_mask: (L + 1,) bool over `tokens`; where given, only targets whose
      token is marked count in the loss. None counts every target.
    lag: (L + 1,) int over `tokens`, the lag of each marked target token.

  Returns:
    The example dict.
  """
  tokens = np.asarray(tokens, np.int32)
  length = tokens.shape[0] - 1
  mask = (np.ones(length, bool) if answer_mask is None
          else np.asarray(answer_mask[1:], bool))
  out = {
      "inputs": pad(tokens[:-1], seq_len, "example"),
      "targets": pad(tokens[1:], seq_len, "example"),
      "loss_mask": pad(mask.astype(np.float32), seq_len, "example"),
  }
  if lag is not None:
    out["lag"] = pad(np.asarray(lag[1:], np.int32), seq_len, "example")
  return out


def pad(x: np.ndarray, seq_len: int, what: str = "example") -> np.ndarray:
  """Right-pads a 1-D array with zeros to seq_len; longer is an error.

  Args:
    x: (L,) array.
    seq_len: target length T.
    what: what `x` is, for the error message.

  Returns:
    (T,) array of x's dtype.

  Raises:
    ValueError: if L > T, naming both lengths.
  """
  length = x.shape[0]
  if length > seq_len:
    raise ValueError(
        f"{what} has {length} tokens, longer than data.seq_len={seq_len}; "
        "raise data.seq_len (examples are never truncated)")
  out = np.zeros((seq_len,), x.dtype)
  out[:length] = x
  return out
