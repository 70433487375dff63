"""The entry the blocked feedback solves share: dtype, padding, custom VJP.

`chunked` and `pallas` each supply a forward and a backward over padded
inputs; this module casts, pads time and wires them into a `jax.custom_vjp`
whose residuals are O(T·D).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 6))
def _solve(forward, backward, q_btk, k_btk, gamma_bt, f_btd, settings):
  return forward(q_btk, k_btk, gamma_bt, f_btd, settings)[0]


def _solve_fwd(forward, backward, q_btk, k_btk, gamma_bt, f_btd, settings):
  del backward  # jax.custom_vjp passes every nondiff argument to both.
  s, ctx, lse = forward(q_btk, k_btk, gamma_bt, f_btd, settings)
  return s, (q_btk, k_btk, gamma_bt, s, ctx, lse)


def _solve_bwd(forward, backward, settings, res, g_btd):
  del forward  # jax.custom_vjp passes every nondiff argument to both.
  return backward(settings, res, g_btd)


_solve.defvjp(_solve_fwd, _solve_bwd)


def blocked_feedback_solve(forward: Callable, backward: Callable,
                           q_btk: jax.Array, k_btk: jax.Array,
                           gamma_bt: jax.Array, f_btd: jax.Array, *,
                           multiple: int, settings: Callable[..., Any],
                           scale: float) -> jax.Array:
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
    scale: logit scale (`defaults.resolve_scale`).

  Returns:
    s (B, T, D) in the dtype of `f_btd`.
  """
  compute = jnp.result_type(q_btk, k_btk, gamma_bt, f_btd, jnp.float32)
  t = q_btk.shape[1]
  pad = -t % multiple
  time_pad = lambda x: jnp.pad(
      x.astype(compute), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  s = _solve(forward, backward, time_pad(q_btk), time_pad(k_btk),
             time_pad(gamma_bt), time_pad(f_btd),
             settings(float(scale), jnp.dtype(compute)))
  return s[:, :t].astype(f_btd.dtype)
