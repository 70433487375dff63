"""The start-of-run introduction: hardware, mesh, model size, cost, dtypes."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import jax

from sessa_jax import budget
from sessa_jax.models.config import ModelConfig
from sessa_jax.train.processes import RunProcesses

FILENAME = "run_info.json"


def param_counts(abstract_params: Mapping[str, Any]) -> dict[str, Any]:
  """Parameter counts: `total` and `by_module` (per top-level module).

  Args:
    abstract_params: the model's parameters as a pure dict (arrays or shape
      structs), keyed by top-level module ('embedding', 'blocks', ...).
  """
  def count(tree):
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
  by_module = {name: count(tree) for name, tree in abstract_params.items()}
  return {"total": sum(by_module.values()), "by_module": by_module}


def describe(*, model_cfg: ModelConfig, abstract_params: Mapping[str, Any],
             mesh: jax.sharding.Mesh, task: Any, batch_size: int,
             overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """What a run is about to do, as a JSON-able dict.

  Args:
    model_cfg: the model.
    abstract_params: its parameters' shapes (pure dict).
    mesh: the device mesh.
    task: the data task (name, seq_len).
    batch_size: global sequences per optimizer step.
    overrides: config keys set on top of the config file (dotted key ->
      value), e.g. from the command line or a sweep point.

  Returns:
    dict with `devices`, `mesh`, `params`, `flops_per_token` (forward, by
    `budget.flops_per_token`), `tokens_per_step`, `dtypes`, `model`, `task`,
    `overrides`.
  """
  device = mesh.devices.flat[0]
  return {
      "devices": {"count": int(mesh.devices.size), "platform": device.platform,
                  "kind": device.device_kind,
                  "processes": RunProcesses.of(mesh.devices.flat).count},
      "mesh": {name: int(size) for name, size in mesh.shape.items()},
      "params": param_counts(abstract_params),
      "flops_per_token": float(budget.flops_per_token(model_cfg, task.seq_len)),
      "tokens_per_step": batch_size * task.seq_len,
      "dtypes": {"compute": model_cfg.dtype, "params": model_cfg.param_dtype},
      "model": model_cfg.mixer,
      "task": task.name,
      "overrides": {k: _jsonable(v) for k, v in (overrides or {}).items()},
  }


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


def format_info(info: Mapping[str, Any]) -> str:
  """A few human-readable lines of `describe`'s dict."""
  devices, params = info["devices"], info["params"]
  modules = ", ".join(f"{k} {v:,}" for k, v in params["by_module"].items())
  mesh = " x ".join(f"{k}={v}" for k, v in info["mesh"].items())
  overrides = ", ".join(f"{k}={v!r}" for k, v in info["overrides"].items())
  return "\n".join([
      f"{info['model']} on {info['task']}: {params['total']:,} parameters "
      f"({modules})",
      f"devices: {devices['count']} x {devices['kind']} ({devices['platform']}"
      f", {devices['processes']} process(es)); mesh {mesh}",
      f"forward FLOPs/token {info['flops_per_token']:.4g}; tokens/step "
      f"{info['tokens_per_step']:,}; compute {info['dtypes']['compute']}, "
      f"parameters {info['dtypes']['params']}",
      f"set over the config file: {overrides or 'nothing'}",
  ])

