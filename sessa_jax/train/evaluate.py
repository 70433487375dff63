"""Loss, accuracy and their reductions over a split (optionally by lag)."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sessa_jax.train import sharding as sharding_lib

# Accuracy by lag is reported in bins (2^(k-1), 2^k]; bin k=0 holds lag 1.
NUM_LAG_BINS = 24


def token_stats(logits_btv: jax.Array, batch: Mapping[str, jax.Array]
               ) -> dict[str, jax.Array]:
  """Summed loss, token count and correct predictions over masked positions.

  Args:
    logits_btv: float32 logits.
    batch: `targets` (B, T) int32, `loss_mask` (B, T) float32, optionally
      `lag` (B, T) int32.

  Returns:
    dict of float32 scalars `loss_sum`, `count`, `correct`, and with `lag`
    also (NUM_LAG_BINS,) vectors `lag_count`, `lag_correct`.
  """
  logits_btv = logits_btv.astype(jnp.float32)
  targets_bt, mask_bt = batch["targets"], batch["loss_mask"]
  logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(
      logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  correct_bt = (jnp.argmax(logits_btv, -1) == targets_bt).astype(jnp.float32)
  stats = {
      "loss_sum": jnp.sum((logz_bt - target_logit_bt) * mask_bt),
      "count": jnp.sum(mask_bt),
      "correct": jnp.sum(correct_bt * mask_bt),
  }
  if "lag" in batch:
    lag_bt = batch["lag"]
    bin_bt = jnp.ceil(jnp.log2(jnp.maximum(lag_bt, 1).astype(jnp.float32)))
    bin_bt = jnp.clip(bin_bt.astype(jnp.int32), 0, NUM_LAG_BINS - 1)
    onehot_btk = jax.nn.one_hot(bin_bt, NUM_LAG_BINS) * (
        mask_bt * (lag_bt > 0))[..., None]
    stats["lag_count"] = jnp.sum(onehot_btk, axis=(0, 1))
    stats["lag_correct"] = jnp.einsum("btk,bt->k", onehot_btk, correct_bt)
  return stats


def make_eval_step(graphdef: nnx.GraphDef, param_shardings: Any,
                   mesh: jax.sharding.Mesh) -> Callable:
  """Jitted (params, batch) -> `token_stats`, replicated outputs."""
  def eval_step(params, batch):
    logits_btv = nnx.merge(graphdef, params)(batch["inputs"])
    return token_stats(logits_btv, batch)
  return jax.jit(
      sharding_lib.with_abstract_mesh(eval_step, mesh),
      in_shardings=(param_shardings, sharding_lib.batch_sharding(mesh)),
      out_shardings=sharding_lib.replicated(mesh))


def evaluate_batches(eval_step: Callable, params: Any, batches, *,
                     max_batches: int, mesh: jax.sharding.Mesh, task: Any,
                     prefix: str) -> dict[str, Any]:
  """Runs `eval_step` over a split and reduces the sums to metrics.

  Args:
    eval_step: from `make_eval_step`.
    params: the parameters (pure dict, sharded).
    batches: iterable of this process's batches (dicts of numpy arrays),
      all of the same size.
    max_batches: stop after this many batches (0: the whole iterable).
    mesh: the device mesh.
    task: the task (for its metrics and bytes_per_token).
    prefix: metric name prefix, 'eval' or 'test'.

  Returns:
    dict with `<prefix>/loss`, and as the task reports them `<prefix>/accuracy`,
    `<prefix>/perplexity`, `<prefix>/bits_per_byte`; with lags also
    `<prefix>/accuracy_by_lag` {bin upper bound: accuracy}.
  """
  totals = None
  for i, local_batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    batch = sharding_lib.global_batch(local_batch, mesh)
    stats = eval_step(params, batch)
    totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
  if totals is None:
    raise ValueError(f"the {prefix} split yielded no batches")
  totals = jax.tree.map(np.asarray, jax.device_get(totals))
  count = max(float(totals["count"]), 1.0)
  loss = float(totals["loss_sum"]) / count
  out = {f"{prefix}/loss": loss}
  if "accuracy" in task.metrics:
    out[f"{prefix}/accuracy"] = float(totals["correct"]) / count
  if "perplexity" in task.metrics:
    out[f"{prefix}/perplexity"] = math.exp(min(loss, 700.0))
  if "bits_per_byte" in task.metrics and task.bytes_per_token:
    out[f"{prefix}/bits_per_byte"] = loss / math.log(2) / task.bytes_per_token
  if "lag_count" in totals:
    out[f"{prefix}/accuracy_by_lag"] = {
        str(2 ** k): float(totals["lag_correct"][k] / totals["lag_count"][k])
        for k in range(NUM_LAG_BINS) if totals["lag_count"][k] > 0}
  return out
