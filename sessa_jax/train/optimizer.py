"""AdamW with warmup + cosine decay, gradient clipping and a decay mask."""

from __future__ import annotations

import jax
import optax

from sessa_jax.train.config import TrainConfig


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to `tc.lr`, then cosine decay to min_lr_ratio * lr.

  Args:
    tc: the train config.

  Returns:
    A function of the step (0-based count of updates already applied).
  """
  warmup = min(tc.warmup_steps, tc.steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=tc.lr,
      warmup_steps=warmup,
      decay_steps=max(tc.steps, warmup + 1),
      end_value=tc.lr * tc.min_lr_ratio)


def decay_mask(params):
  """True for weight matrices; False for biases, norm scales and scalars.

  Args:
    params: a pytree of arrays (or shape structs).

  Returns:
    The same tree of booleans: decay only parameters with two or more dims.
  """
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """The optimizer of every run.

  Args:
    tc: the train config.

  Returns:
    optax chain: clip by global norm (when `tc.grad_clip` > 0), then AdamW
    with the warmup-cosine schedule and weight decay on matrices only.
  """
  adamw = optax.adamw(
      learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2,
      weight_decay=tc.weight_decay, mask=decay_mask)
  if tc.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)
  return adamw
