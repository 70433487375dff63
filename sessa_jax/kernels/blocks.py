"""Helpers shared by the blocked kernels.

Time-chunk slicing, the online-softmax update, masked softmax and Pallas
tile products. What only the feedback solves share lives in
`kernels/feedback/` (`defaults`, `triangular`, `blocked`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def get_block(x: jax.Array, i: jax.Array | int, size: int,
              axis: int = 1) -> jax.Array:
  """Rows [i * size, (i + 1) * size) of x along `axis` (time)."""
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def put_block(x: jax.Array, value: jax.Array, i: jax.Array | int,
              size: int, axis: int = 1) -> jax.Array:
  """x with rows [i * size, (i + 1) * size) along `axis` replaced by value."""
  return jax.lax.dynamic_update_slice_in_dim(x, value, i * size, axis=axis)


def online_softmax_step(state, logits: jax.Array, weigh):
  """Folds one block of logits into a running (max, sum, weighted sum).

  Args:
    state: (m, l, acc): running row max (..., R), sum of exp(logit - m)
      (..., R) and exp-weighted sum of values (..., R, D).
    logits: the new block (..., R, S).
    weigh: maps the block's exp(logits - new max) (..., R, S) to its
      weighted values (..., R, D).

  Returns:
    The updated (m, l, acc).
  """
  m, l, acc = state
  m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
  p = jnp.exp(logits - m_new[..., None])
  rescale = jnp.exp(m - m_new)
  return (m_new, l * rescale + jnp.sum(p, axis=-1),
          acc * rescale[..., None] + weigh(p))


def acc_dtype(x: jax.Array) -> jnp.dtype:
  """Accumulation dtype: float32, or float64 for float64 inputs."""
  return jnp.promote_types(x.dtype, jnp.float32)


def tile_dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False,
             trans_b: bool = False) -> jax.Array:
  """Product of two 2-D tiles inside a Pallas kernel, accumulated in f32+.

  The transposes are contraction choices of one `dot_general`, which the
  Mosaic and Triton lowerings map onto the matrix units without moving data.

  Args:
    a: (M, N) tile, or (N, M) with `trans_a`.
    b: (N, P) tile, or (P, N) with `trans_b`.
    trans_a: contract a's first axis.
    trans_b: contract b's last axis.

  Returns:
    (M, P) in float32 (float64 when either input is float64).
  """
  out = jnp.promote_types(acc_dtype(a), acc_dtype(b))
  return jax.lax.dot_general(
      a, b, (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ())),
      preferred_element_type=out)


def masked_softmax(logits: jax.Array, allowed: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to `allowed`; empty rows are zero.

  Args:
    logits: scores (..., S).
    allowed: boolean mask broadcastable to `logits`.

  Returns:
    Weights of the shape of `logits`, zero where not allowed and on rows
    with nothing allowed (Sessa's first feedback row).
  """
  logits = jnp.where(allowed, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.where(allowed, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  return weights / jnp.where(denom > 0, denom, 1.0)
