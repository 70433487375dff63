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
from sessa_jax.data import text
from sessa_jax.data.base import SPLITS, Task
from sessa_jax.data.pipeline import check_split_size, make_iterator

TASKS: Mapping[str, type[Task]] = {
    "diffuse_mqar": diffuse_mqar.DiffuseMQAR,
    "mqar": mqar.MQAR,
    "symbol_soup": symbol_soup.SymbolSoup,
    "text": text.Text,
}


def get_task(data_cfg: Mapping[str, Any], *,
             workdir: str | None = None) -> Task:
  """Builds the task named by `data.task` from the `data` config section.

  Args:
    data_cfg: a mapping (or ml_collections ConfigDict) with `task` and the
      task's keys; missing keys take the task's defaults.
    workdir: the experiment's directory; tasks that cache derived files
      (the text task's tokeniser and token streams) keep them under it.

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
  cfg = cls.Config.from_mapping(name, data_cfg)
  return cls(cfg, workdir=workdir) if cls.uses_workdir else cls(cfg)


__all__ = ["SPLITS", "TASKS", "Task", "base", "check_split_size", "get_task",
           "make_iterator"]
