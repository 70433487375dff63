"""Helpers shared by the blocked kernels.

Time-chunk slicing, the online-softmax update, masked softmax, the inverse
of a unit lower-triangular block, Pallas tile products, and the entry that
the blocked feedback solves (`feedback_chunked`, `feedback_pallas`) share:
argument defaults, compute dtype, time padding and the custom VJP.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Rows per chunk of the blocked feedback solves (diagonal blocks solved
# directly; the chunked solve's step, the Pallas solve's loop leaves).
DEFAULT_CHUNK = 256


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


_LEAF = 16  # Blocks this small are inverted by repeated squaring.


def unit_lower_inverse(n_bcc: jax.Array) -> jax.Array:
  """(I - N)^{-1} for strictly lower-triangular N, batched, all matmuls.

  Blocks of up to `_LEAF` rows use (I - N)^{-1} = (I + N)(I + N^2)(I + N^4)...
  Larger ones are padded to a power of two and split in halves, whose
  inverses are found together in one batched recursive call:
  [[X11, 0], [X22 N21 X11, X22]].

  Args:
    n_bcc: strictly lower-triangular matrices (..., C, C).

  Returns:
    The inverses (..., C, C).
  """
  c = n_bcc.shape[-1]
  if c <= _LEAF:
    x = jnp.eye(c, dtype=n_bcc.dtype) + n_bcc
    power, reach = n_bcc, 2
    while reach < c:
      power = power @ power
      x = x + x @ power
      reach *= 2
    return x
  padded = 1 << (c - 1).bit_length()
  if padded != c:
    pad = [(0, 0)] * (n_bcc.ndim - 2) + [(0, padded - c)] * 2
    return unit_lower_inverse(jnp.pad(n_bcc, pad))[..., :c, :c]
  h = c // 2
  x_both = unit_lower_inverse(
      jnp.stack([n_bcc[..., :h, :h], n_bcc[..., h:, h:]]))
  x11, x22 = x_both[0], x_both[1]
  x21 = x22 @ n_bcc[..., h:, :h] @ x11
  top = jnp.concatenate([x11, jnp.zeros_like(x11)], axis=-1)
  return jnp.concatenate([top, jnp.concatenate([x21, x22], axis=-1)], axis=-2)


def resolve_chunk(chunk: int | None) -> int:
  """`chunk`, or `DEFAULT_CHUNK` for None; raises if it is below 1."""
  chunk = DEFAULT_CHUNK if chunk is None else int(chunk)
  if chunk < 1:
    raise ValueError(f"feedback_solve chunk must be >= 1, got {chunk}")
  return chunk


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 6))
def _solve(forward, backward, q_btk, k_btk, gamma_bt, f_btd, settings):
  return forward(q_btk, k_btk, gamma_bt, f_btd, settings)[0]


def _solve_fwd(forward, backward, q_btk, k_btk, gamma_bt, f_btd, settings):
  del backward
  s, ctx, lse = forward(q_btk, k_btk, gamma_bt, f_btd, settings)
  return s, (q_btk, k_btk, gamma_bt, s, ctx, lse)


def _solve_bwd(forward, backward, settings, res, g_btd):
  del forward
  return backward(settings, res, g_btd)


_solve.defvjp(_solve_fwd, _solve_bwd)


def blocked_feedback_solve(forward: Callable, backward: Callable,
                           q_btk: jax.Array, k_btk: jax.Array,
                           gamma_bt: jax.Array, f_btd: jax.Array, *,
                           multiple: int, settings: Callable[..., Any],
                           scale: float | None) -> jax.Array:
  """The entry of a blocked feedback solve with an O(T·D)-memory VJP.

  Casts the inputs to the compute dtype (float32, float64 when any input is
  float64), pads time up to a multiple of `multiple` (padding goes after the
  last row; causality keeps it out of the real rows), and solves with a
  custom VJP whose residuals are q, k, gamma, s, ctx = A s and the row
  log-sum-exp.

  Args:
    forward: (q, k, gamma, f, settings) -> (s, ctx, lse) on padded inputs.
    backward: (settings, residuals, ds) -> (dq, dk, dgamma, df).
    q_btk: feedback queries (B, T, K).
    k_btk: feedback keys (B, T, K).
    gamma_bt: per-token gains (B, T).
    f_btd: right-hand side (B, T, D).
    multiple: T is padded up to a multiple of this.
    settings: (scale, compute dtype) -> the hashable static settings passed
      to `forward` and `backward`.
    scale: logit scale; defaults to K ** -0.5.

  Returns:
    s (B, T, D) in the dtype of `f_btd`.
  """
  if scale is None:
    scale = q_btk.shape[-1] ** -0.5
  compute = jnp.result_type(q_btk, k_btk, gamma_bt, f_btd, jnp.float32)
  t = q_btk.shape[1]
  pad = -t % multiple
  time_pad = lambda x: jnp.pad(
      x.astype(compute), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  s = _solve(forward, backward, time_pad(q_btk), time_pad(k_btk),
             time_pad(gamma_bt), time_pad(f_btd),
             settings(float(scale), jnp.dtype(compute)))
  return s[:, :t].astype(f_btd.dtype)
