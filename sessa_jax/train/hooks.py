"""The train loop's periodic work, each piece registered with its cadence.

Modelled on Levanter's `add_hook(fn, every=N)`: the loop adds each piece of
periodic work (checks, progress, metrics, evaluation, checkpoints) to a
`Hooks` with how often it runs, and calls `Hooks.run` after every step.
Hooks run in the order added and share one `StepInfo`, so a hook sees what
an earlier one set on it (the stop decision).
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass
class StepInfo:
  """What the hooks learn of a finished step.

  Attributes:
    step: steps completed, this one included.
    metrics: the step's metrics as floats.
    last: whether this step is the run's final one (`train.steps`).
    stop: whether the run stops after this step, early; set by a hook.
  """

  step: int
  metrics: dict[str, float]
  last: bool
  stop: bool = False


@dataclasses.dataclass(frozen=True)
class _Hook:
  fn: Callable[[StepInfo], None]
  every: int
  at_last: bool
  on_stop: bool

  def due(self, info: StepInfo) -> bool:
    return bool((self.every and info.step % self.every == 0)
                or (self.at_last and info.last)
                or (self.on_stop and info.stop))


class Hooks:
  """Functions of a `StepInfo` the loop runs after each step, when due."""

  def __init__(self):
    self._hooks: list[_Hook] = []

  def add(self, fn: Callable[[StepInfo], None], *, every: int = 1,
          at_last: bool = False, on_stop: bool = False) -> None:
    """Runs `fn` after every `every`-th step (0: on no cadence).

    Args:
      fn: the work, called with the step's `StepInfo`.
      every: the cadence in steps.
      at_last: also after the run's final step.
      on_stop: also after a step the run stops at early (`StepInfo.stop`
        set by a hook added before this one).
    """
    self._hooks.append(_Hook(fn, every, at_last, on_stop))

  def run(self, info: StepInfo) -> None:
    """Calls the hooks due after `info.step`, in the order they were added."""
    for hook in self._hooks:
      if hook.due(info):
        hook.fn(info)
