"""Data: tasks as pure functions of (config, seed, split, index), grain batches.

  task = get_task({"task": "mqar", "seq_len": 128, "num_kv_pairs": 8})
  it = make_iterator(task, "train", batch_size=32, seed=0)
  batch = next(it)  # {"inputs", "targets", "loss_mask", "lag"}: (32, 128)
"""

from __future__ import annotations

from typing import Any, Mapping

from sessa_jax.data import base
from sessa_jax.data import diffuse_mqar
from sessa_jax.data import mqar
from sessa_jax.data import symbol_soup
from sessa_jax.data.base import SPLITS, Task
from sessa_jax.data.pipeline import make_iterator

TASKS: Mapping[str, type[Task]] = {
    "diffuse_mqar": diffuse_mqar.DiffuseMQAR,
    "mqar": mqar.MQAR,
    "symbol_soup": symbol_soup.SymbolSoup,
}


def get_task(data_cfg: Mapping[str, Any], **kwargs) -> Task:
  """Builds the task named by `data.task` from the `data` config section.

  Args:
    data_cfg: a mapping (or ml_collections ConfigDict) with `task` and the
      task's keys; missing keys take the task's defaults.
    **kwargs: passed to the task's constructor (e.g. `workdir` for text).

  Returns:
    The task.

  Raises:
    ValueError: on an unknown task or key (listing the choices) or a bad value.
  """
  if hasattr(data_cfg, "to_dict"):
    data_cfg = data_cfg.to_dict()
  name = data_cfg.get("task")
  if name not in TASKS:
    raise ValueError(
        f"unknown data.task {name!r}; choices: {', '.join(sorted(TASKS))}")
  cls = TASKS[name]
  return cls(cls.Config.from_mapping(name, data_cfg), **kwargs)


__all__ = ["SPLITS", "TASKS", "Task", "base", "get_task", "make_iterator"]
