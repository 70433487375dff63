"""Dense reference for Sessa's feedback solve: materialise A and solve.

This is the oracle every faster implementation is tested against. It builds
the full (T, T) routing matrix per sequence, so memory grows with T^2.

The triangular system is solved with matmuls only, by row blocks, rather than
by LAPACK's triangular solve: jaxlib's CPU solve splits a batch over XLA's
intra-op thread pool and blocks a pool thread until the parts finish, so two
independent solves in one program (a JVP's primal and tangent, two layers)
can hold every thread of a small pool and wait forever; on a 2-core machine
with one CPU device that stalled memory-tail measurements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sessa_jax.kernels.blocks import masked_softmax
from sessa_jax.kernels.feedback import defaults
from sessa_jax.kernels.feedback.triangular import strict_lower
from sessa_jax.kernels.feedback.triangular import unit_lower_inverse

ROW_BLOCK = 64  # Rows of the dense solve handled by one small inverse.


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


def feedback_solve_dense(q_btk: jax.Array, k_btk: jax.Array,
                         gamma_bt: jax.Array, f_btd: jax.Array, *,
                         scale: float | None = None) -> jax.Array:
  """Solves (I - diag(gamma) A) s = f with A materialised.

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
  with jax.default_matmul_precision("highest"):
    s = unit_lower_solve(gamma_bt.astype(compute)[..., None] * a_btt,
                         f_btd.astype(compute))
  return s.astype(f_btd.dtype)


def unit_lower_solve(n_btt: jax.Array, f_btd: jax.Array) -> jax.Array:
  """Solves (I - N) s = f for strictly lower-triangular N, by row blocks.

  Blocks of `ROW_BLOCK` rows in order: a block's solution is the inverse of
  its diagonal block (`unit_lower_inverse`) times its right-hand side, which
  then takes the block's contribution to every later row in one matmul.
  Matmuls only, so it differentiates in forward and reverse mode and calls
  no LAPACK routine.

  Args:
    n_btt: strictly lower-triangular matrices (B, T, T).
    f_btd: right-hand sides (B, T, D).

  Returns:
    s (B, T, D).
  """
  t = n_btt.shape[-1]
  rhs, blocks = f_btd, []
  for start in range(0, t, ROW_BLOCK):
    stop = min(start + ROW_BLOCK, t)
    inverse = unit_lower_inverse(n_btt[:, start:stop, start:stop])
    blocks.append(inverse @ rhs[:, :stop - start])
    rhs = rhs[:, stop - start:] + n_btt[:, stop:, start:stop] @ blocks[-1]
  return jnp.concatenate(blocks, axis=1)
