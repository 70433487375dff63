"""The train state and the pure steps over it, jitted for a mesh.

The state is the dict {'params', 'opt_state', 'step'}. `make_state_spec`
gives its shapes, shardings and initialiser; `make_train_step` the jitted
(state, batch) -> (state, metrics); `make_finite_check` whether a state holds
only finite numbers. Nothing here reads or writes files.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sessa_jax import models
from sessa_jax.models.config import ModelConfig
from sessa_jax.train import evaluate as evaluate_lib
from sessa_jax.train import optimizer as optimizer_lib
from sessa_jax.train import sharding as sharding_lib
from sessa_jax.train.config import TrainConfig


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
