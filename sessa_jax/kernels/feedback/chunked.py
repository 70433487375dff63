"""Blocked feedback solve in plain JAX: O(T·D) memory, all large matmuls.

Solves s = (I - diag(gamma) A)^{-1} f, A the strictly causal softmax of
scale * q k^T (docs/design.md#feedback-solve), chunk by chunk in time
order (`lax.fori_loop`, so the program size does not grow with T). Chunk i
(C rows) walks the earlier key chunks with an online softmax
(flash-attention style: running max, sum and A s), which yields the row
log-sum-exp and the earlier chunks' contribution in a single pass over the
logits:

  rhs_i = f_i + gamma_i * (A_{i,<i} s_{<i}),
  s_i = (I - gamma_i A_ii)^{-1} rhs_i

The C x C unit lower-triangular inverse is built by blocked recursion
(matmuls only; XLA's triangular solve is slow on CPU). T is padded up to a
multiple of C at the end, which causality keeps out of the real rows.

The backward pass (a `jax.custom_vjp`) solves the adjoint u = (I - M)^{-T} g
in reverse time, one key chunk at a time. Key chunk j rebuilds its blocks of
A against every later row chunk from the saved log-sum-exp and gathers
everything they feed in one go: the adjoint contribution A^T (gamma u) and
the flash-attention style logit gradient
dlogit_tj = gamma_t A_tj (u_t·s_j - u_t·ctx_t) for dq and dk. Residuals are
q, k, gamma, s, ctx = A s and the log-sum-exp: O(T·D); no T x T array exists.
Work: forward two causal products (logits, A s), backward five (logits
again, A^T w, w s^T, dq, dk), as in flash attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sessa_jax.kernels.blocks import get_block, online_softmax_step, put_block
from sessa_jax.kernels.feedback import blocked
from sessa_jax.kernels.feedback import defaults
from sessa_jax.kernels.feedback.triangular import strict_lower
from sessa_jax.kernels.feedback.triangular import unit_lower_inverse


def _unit_lower_solve(a_bcc, gamma_bc, rhs_bcd, *, transpose: bool):
  """Solves (I - diag(gamma) A) x = rhs, or its transpose, per batch row."""
  inv = unit_lower_inverse(gamma_bc[..., None] * a_bcc)
  return jnp.einsum("bsc,bsd->bcd" if transpose else "bcs,bsd->bcd",
                    inv, rhs_bcd)


def _forward(q_btk, k_btk, gamma_bt, f_btd, settings):
  """Returns s, ctx = A s and the row log-sum-exp (0 for row 0).

  T must be a multiple of `chunk`.
  """
  chunk, scale = settings
  b, t, _ = q_btk.shape
  c, d = chunk, f_btd.shape[-1]
  dtype = f_btd.dtype
  mask = strict_lower(c)

  def chunk_step(i, carry):
    s_all, ctx_all, lse_all = carry
    q_i = get_block(q_btk, i, c)

    def key_step(j, state):
      # Online softmax over the earlier chunk j: running max, sum, A s.
      logits = jnp.einsum("bck,bsk->bcs", q_i, get_block(k_btk, j, c)) * scale
      return online_softmax_step(state, logits, lambda p: jnp.einsum(
          "bcs,bsd->bcd", p, get_block(s_all, j, c)))

    logits = jnp.einsum("bck,bsk->bcs", q_i, get_block(k_btk, i, c)) * scale
    logits = jnp.where(mask, logits, -jnp.inf)
    init = (jnp.max(logits, axis=-1), jnp.zeros((b, c), dtype),
            jnp.zeros((b, c, d), dtype))
    m, l, ctx_prev = jax.lax.fori_loop(0, i, key_step, init)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # Row 0 sees no keys at all.
    p_diag = jnp.exp(logits - m[..., None])
    l = l + jnp.sum(p_diag, axis=-1)
    l = jnp.where(l > 0, l, 1.0)
    a_diag = p_diag / l[..., None]
    ctx_prev = ctx_prev / l[..., None]
    gamma_i = get_block(gamma_bt, i, c)
    rhs = get_block(f_btd, i, c) + gamma_i[..., None] * ctx_prev
    s_i = _unit_lower_solve(a_diag, gamma_i, rhs, transpose=False)
    ctx_i = ctx_prev + jnp.einsum("bcs,bsd->bcd", a_diag, s_i)
    return (put_block(s_all, s_i, i, c), put_block(ctx_all, ctx_i, i, c),
            put_block(lse_all, m + jnp.log(l), i, c))

  init = (jnp.zeros_like(f_btd), jnp.zeros_like(f_btd),
          jnp.zeros((b, t), dtype))
  return jax.lax.fori_loop(0, t // c, chunk_step, init)


def _backward(settings, res, g_btd):
  """Cotangents of (q, k, gamma, f) from the adjoint recurrence.

  Key chunks are visited last to first. Chunk j first gathers what the rows
  of every later chunk read from its keys (a flash-attention backward over
  row chunks), which completes the adjoint right-hand side, then solves its
  own transposed diagonal block.
  """
  chunk, scale = settings
  q_btk, k_btk, gamma_bt, s_btd, ctx_btd, lse_bt = res
  b, t, _ = q_btk.shape
  c = chunk
  n = t // c
  mask = strict_lower(c)

  def chunk_step(step, carry):
    u_all, w_all, delta_all, dq_all, dk_all = carry
    j = n - 1 - step
    k_j, s_j = get_block(k_btk, j, c), get_block(s_btd, j, c)

    def row_step(i, acc):
      # Row chunk i > j: its logits against keys j give A, dA and dlogits.
      rhs, dk, dq_all = acc
      q_i = get_block(q_btk, i, c)
      w_i = get_block(w_all, i, c)
      logits = jnp.einsum("bck,bsk->bcs", q_i, k_j) * scale
      p = jnp.exp(logits - get_block(lse_bt, i, c)[..., None])
      rhs = rhs + jnp.einsum("bcs,bcd->bsd", p, w_i)
      ds = p * (jnp.einsum("bcd,bsd->bcs", w_i, s_j)
                - get_block(delta_all, i, c)[..., None])
      dk = dk + jnp.einsum("bcs,bck->bsk", ds, q_i)
      dq_i = get_block(dq_all, i, c) + jnp.einsum("bcs,bsk->bck", ds, k_j)
      return rhs, dk, put_block(dq_all, dq_i, i, c)

    init = (get_block(g_btd, j, c), jnp.zeros_like(k_j), dq_all)
    rhs, dk_j, dq_all = jax.lax.fori_loop(j + 1, n, row_step, init)
    q_j, gamma_j = get_block(q_btk, j, c), get_block(gamma_bt, j, c)
    logits = jnp.einsum("bck,bsk->bcs", q_j, k_j) * scale
    a_diag = jnp.where(
        mask, jnp.exp(logits - get_block(lse_bt, j, c)[..., None]), 0.0)
    u_j = _unit_lower_solve(a_diag, gamma_j, rhs, transpose=True)
    w_j = gamma_j[..., None] * u_j
    delta_j = gamma_j * jnp.sum(u_j * get_block(ctx_btd, j, c), axis=-1)
    ds = a_diag * (jnp.einsum("bcd,bsd->bcs", w_j, s_j) - delta_j[..., None])
    dk_j = dk_j + jnp.einsum("bcs,bck->bsk", ds, q_j)
    dq_j = get_block(dq_all, j, c) + jnp.einsum("bcs,bsk->bck", ds, k_j)
    return (put_block(u_all, u_j, j, c), put_block(w_all, w_j, j, c),
            put_block(delta_all, delta_j, j, c), put_block(dq_all, dq_j, j, c),
            put_block(dk_all, dk_j, j, c))

  init = (jnp.zeros_like(g_btd), jnp.zeros_like(g_btd),
          jnp.zeros((b, t), g_btd.dtype), jnp.zeros_like(q_btk),
          jnp.zeros_like(k_btk))
  u, _, _, dq, dk = jax.lax.fori_loop(0, n, chunk_step, init)
  dgamma = jnp.sum(u * ctx_btd, axis=-1)
  return dq * scale, dk * scale, dgamma, u


def feedback_solve_chunked(q_btk: jax.Array, k_btk: jax.Array,
                           gamma_bt: jax.Array, f_btd: jax.Array, *,
                           chunk: int | None = None,
                           scale: float | None = None) -> jax.Array:
  """Blocked feedback solve with an O(T·D)-memory custom VJP.

  Computes in float32 (float64 when any input is float64) and returns the
  dtype of `f_btd`; gradients come back in each input's dtype.

  Args:
    q_btk: feedback queries (B, T, K).
    k_btk: feedback keys (B, T, K).
    gamma_bt: per-token gains (B, T).
    f_btd: right-hand side (B, T, D).
    chunk: rows solved per block; defaults to `defaults.DEFAULT_CHUNK`. T
      need not be a multiple of it.
    scale: logit scale; defaults to K ** -0.5.

  Returns:
    s (B, T, D) with s_t = f_t + gamma_t * sum_{j<t} A_tj s_j.
  """
  chunk = min(defaults.resolve_chunk(chunk), q_btk.shape[1])
  return blocked.blocked_feedback_solve(
      _forward, _backward, q_btk, k_btk, gamma_bt, f_btd, multiple=chunk,
      settings=lambda scale, compute: (chunk, scale),
      scale=defaults.resolve_scale(scale, q_btk))
