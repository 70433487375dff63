"""Dense reference for Sessa's feedback solve: materialise A and solve.

This is the oracle every faster implementation is tested against. It builds
the full (T, T) routing matrix per sequence, so memory grows with T^2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sessa_jax.kernels.blocks import masked_softmax
from sessa_jax.kernels.feedback import defaults
from sessa_jax.kernels.feedback.triangular import strict_lower


def feedback_matrix(q_btk: jax.Array, k_btk: jax.Array,
                    scale: float) -> jax.Array:
  """Strictly causal softmax routing A (B, T, T); row 0 is all zeros.

  Args:
    q_btk: feedback queries (B, T, K).
    k_btk: feedback keys (B, T, K).
    scale: logit scale.

  Returns:
    A with A[b, t, j] = softmax_{j < t}(scale * q_t . k_j), zero for j >= t.
  """
  logits = jnp.einsum("btk,bsk->bts", q_btk, k_btk) * scale
  return masked_softmax(logits, strict_lower(q_btk.shape[1]))


def feedback_solve_dense(q_btk: jax.Array, k_btk: jax.Array, gamma_bt: jax.Array,
                         f_btd: jax.Array, *, scale: float | None = None
                         ) -> jax.Array:
  """Solves (I - diag(gamma) A) s = f by dense forward substitution.

  Computation runs in float32 (float64 when the inputs are float64); the
  result has the dtype of `f_btd`.

  Args:
    q_btk: feedback queries (B, T, K).
    k_btk: feedback keys (B, T, K).
    gamma_bt: per-token gain (B, T).
    f_btd: forward-branch output (B, T, D).
    scale: logit scale; defaults to K ** -0.5.

  Returns:
    s (B, T, D) with s_t = f_t + gamma_t * sum_{j<t} A_tj s_j.
  """
  scale = defaults.resolve_scale(scale, q_btk)
  compute = jnp.promote_types(f_btd.dtype, jnp.float32)
  a_btt = feedback_matrix(q_btk.astype(compute), k_btk.astype(compute), scale)
  t = a_btt.shape[-1]
  system = jnp.eye(t, dtype=compute) - gamma_bt.astype(compute)[..., None] * a_btt
  s = jax.scipy.linalg.solve_triangular(
      system, f_btd.astype(compute), lower=True, unit_diagonal=True)
  return s.astype(f_btd.dtype)
