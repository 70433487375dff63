"""The public feedback-solve op: one signature, several implementations."""

from __future__ import annotations

import jax

from sessa_jax.kernels import feedback_ref

IMPLS = ("dense",)


def feedback_solve(q_b: jax.Array, k_b: jax.Array, gamma: jax.Array,
                   f: jax.Array, *, impl: str = "dense",
                   chunk: int | None = None,
                   scale: float | None = None) -> jax.Array:
  """Solves Sessa's feedback system s_t = f_t + gamma_t sum_{j<t} A_tj s_j.

  A is the strictly causal softmax of scale * q_b k_b^T (row 0 all zeros).

  Args:
    q_b: feedback queries (B, T, K).
    k_b: feedback keys (B, T, K).
    gamma: gains (B, T).
    f: right-hand side (B, T, D).
    impl: implementation name, one of `IMPLS`.
    chunk: chunk size for blocked implementations.
    scale: logit scale; defaults to K ** -0.5.

  Returns:
    s (B, T, D) in the dtype of `f`.
  """
  del chunk  # The dense oracle has no chunking.
  impl = "dense" if impl == "auto" else impl  # Only the dense oracle so far.
  if impl not in IMPLS:
    raise ValueError(f"feedback_solve impl={impl!r} is not one of: {', '.join(IMPLS)}")
  return feedback_ref.feedback_solve_dense(q_b, k_b, gamma, f, scale=scale)
