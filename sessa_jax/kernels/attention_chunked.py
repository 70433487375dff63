"""Blocked causal attention in plain JAX: no T x T array, O(T·D) residuals.

Causal (diagonal included) multi-head attention with grouped KV heads, for
CPU where XLA's dense attention materialises every B x H x T x T logit and
computes the masked upper triangle too. Query head h reads KV head h // G
(G = H / H_kv). The G query heads of one KV head are stacked as rows, so every
block product is one (C G) x d x C matmul per batch row and KV head.

Forward (`lax.fori_loop` over query chunks, so the program size does not grow
with T): chunk i takes its masked diagonal block, then walks the earlier key
chunks with an online softmax (running max, sum and output, flash-attention
style); blocks above the diagonal are never computed. It saves the output
and the row log-sum-exp.

Backward (a `jax.custom_vjp`): key chunk j rebuilds its blocks against every
query chunk i >= j from the saved log-sum-exp and accumulates
dv_j += P^T do, dk_j += dS^T q, dq_i += dS k with dS = P (do v^T - delta),
delta = rowsum(do * out). Work: forward two causal products, backward five.
T is padded up to a multiple of the chunk at the end, which causality keeps
out of the real rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sessa_jax.kernels.blocks import get_block, online_softmax_step, put_block

DEFAULT_CHUNK = 512
# Arrays are laid out (B, H_kv, rows, d); rows (axis 2) run over time.
_get = functools.partial(get_block, axis=2)
_put = functools.partial(put_block, axis=2)
# Transposed copies are laid out (B, H_kv, d, rows).
_get_t = functools.partial(get_block, axis=3)


def _diagonal_mask(chunk: int, groups: int) -> jax.Array:
  """(C G, C) causal mask of a diagonal block; row r is query r // G."""
  return jnp.repeat(jnp.tril(jnp.ones((chunk, chunk), dtype=bool)), groups,
                    axis=0)


def _forward(q_bkrd, k_bksd, v_bksd, chunk, groups, scale):
  """Returns the output (B, H_kv, T G, d) and row log-sum-exp (B, H_kv, T G).

  Rows of q are (time, group) pairs; T is a multiple of `chunk`.
  """
  c, r = chunk, chunk * groups
  mask = _diagonal_mask(c, groups)

  def query_step(i, carry):
    out_all, lse_all = carry
    q_i = _get(q_bkrd, i, r) * scale

    def key_step(j, state):
      logits = jnp.einsum("bkrd,bksd->bkrs", q_i, _get(k_bksd, j, c))
      return online_softmax_step(state, logits, lambda p: jnp.einsum(
          "bkrs,bksd->bkrd", p, _get(v_bksd, j, c)))

    # The diagonal block first: every row sees its own key, so m is finite.
    logits = jnp.einsum("bkrd,bksd->bkrs", q_i, _get(k_bksd, i, c))
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1)
    p = jnp.exp(logits - m[..., None])
    init = (m, jnp.sum(p, axis=-1),
            jnp.einsum("bkrs,bksd->bkrd", p, _get(v_bksd, i, c)))
    m, l, o = jax.lax.fori_loop(0, i, key_step, init)
    return (_put(out_all, o / l[..., None], i, r),
            _put(lse_all, m + jnp.log(l), i, r))

  init = (jnp.zeros_like(q_bkrd), jnp.zeros_like(q_bkrd[..., 0]))
  return jax.lax.fori_loop(0, k_bksd.shape[2] // c, query_step, init)


def _backward(chunk, groups, scale, res, g_bkrd):
  """Cotangents of (q, k, v), one key chunk at a time.

  dk and dv are gathered transposed (d x C, as q^T dS and do^T P) from
  transposed copies of q and do, so every block product contracts the last
  axis of its left operand: XLA's CPU matmul library takes that form, and
  falls back to a slower one for P^T-style products.
  """
  q_bkrd, k_bksd, v_bksd, out_bkrd, lse_bkr = res
  c, r = chunk, chunk * groups
  n = k_bksd.shape[2] // c
  mask = _diagonal_mask(c, groups)
  delta_bkr = jnp.sum(g_bkrd * out_bkrd, axis=-1)
  q_bkdr, g_bkdr = q_bkrd.swapaxes(2, 3), g_bkrd.swapaxes(2, 3)

  def block(i, k_j, v_j, dk_t, dv_t, dq_all, masked):
    """Adds query chunk i's share against key chunk j."""
    q_i, g_i = _get(q_bkrd, i, r), _get(g_bkrd, i, r)
    logits = jnp.einsum("bkrd,bksd->bkrs", q_i * scale, k_j)
    p = jnp.exp(logits - _get(lse_bkr, i, r)[..., None])
    if masked:
      p = jnp.where(mask, p, 0.0)
    dv_t = dv_t + jnp.einsum("bkdr,bkrs->bkds", _get_t(g_bkdr, i, r), p)
    dp = jnp.einsum("bkrd,bksd->bkrs", g_i, v_j)
    ds = p * (dp - _get(delta_bkr, i, r)[..., None])
    dk_t = dk_t + jnp.einsum("bkdr,bkrs->bkds", _get_t(q_bkdr, i, r), ds)
    dq_i = _get(dq_all, i, r) + jnp.einsum("bkrs,bksd->bkrd", ds, k_j)
    return dk_t, dv_t, _put(dq_all, dq_i, i, r)

  def key_step(j, carry):
    dq_all, dk_all, dv_all = carry
    k_j, v_j = _get(k_bksd, j, c), _get(v_bksd, j, c)
    zeros = jnp.zeros_like(k_j.swapaxes(2, 3))
    dk_t, dv_t, dq_all = block(j, k_j, v_j, zeros, zeros, dq_all, masked=True)
    dk_t, dv_t, dq_all = jax.lax.fori_loop(
        j + 1, n, lambda i, acc: block(i, k_j, v_j, *acc, masked=False),
        (dk_t, dv_t, dq_all))
    return (dq_all, _put(dk_all, dk_t.swapaxes(2, 3), j, c),
            _put(dv_all, dv_t.swapaxes(2, 3), j, c))

  init = (jnp.zeros_like(q_bkrd), jnp.zeros_like(k_bksd),
          jnp.zeros_like(v_bksd))
  dq, dk, dv = jax.lax.fori_loop(0, n, key_step, init)
  return dq * scale, dk * scale, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _attend(q_bkrd, k_bksd, v_bksd, chunk, groups, scale):
  return _forward(q_bkrd, k_bksd, v_bksd, chunk, groups, scale)[0]


def _attend_fwd(q_bkrd, k_bksd, v_bksd, chunk, groups, scale):
  out, lse = _forward(q_bkrd, k_bksd, v_bksd, chunk, groups, scale)
  return out, (q_bkrd, k_bksd, v_bksd, out, lse)


_attend.defvjp(_attend_fwd, _backward)


def _to_rows(x_bthd: jax.Array, kv_heads: int) -> jax.Array:
  """(B, T, H, d) -> (B, H_kv, T G, d), rows ordered (time, group)."""
  b, t, h, d = x_bthd.shape
  x = x_bthd.reshape(b, t, kv_heads, h // kv_heads, d)
  return x.transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, -1, d)


def causal_attention_chunked(q_bthd: jax.Array, k_bthd: jax.Array,
                             v_bthd: jax.Array, *, scale: float | None = None,
                             chunk: int | None = None) -> jax.Array:
  """Causal attention (diagonal included) with an O(T·D)-memory custom VJP.

  Computes in float32 (float64 when any input is float64) and returns the
  dtype of `q_bthd`; gradients come back in each input's dtype.

  Args:
    q_bthd: queries (B, T, H, d), RoPE applied.
    k_bthd: keys (B, T, H_kv, d), RoPE applied; H_kv divides H.
    v_bthd: values (B, T, H_kv, d).
    scale: logit scale; defaults to d ** -0.5.
    chunk: query and key rows per block; defaults to `DEFAULT_CHUNK`. T need
      not be a multiple of it.

  Returns:
    Outputs (B, T, H, d).
  """
  b, t, h, d = q_bthd.shape
  kv_heads = k_bthd.shape[2]
  if k_bthd.shape != v_bthd.shape or k_bthd.shape[:2] != (b, t) or (
      h % kv_heads):
    raise ValueError(
        f"attention shapes q {q_bthd.shape}, k {k_bthd.shape}, v "
        f"{v_bthd.shape}: need k == v == (B, T, H_kv, d), H_kv dividing H")
  chunk = DEFAULT_CHUNK if chunk is None else int(chunk)
  if chunk < 1:
    raise ValueError(f"attention chunk must be >= 1, got {chunk}")
  chunk = min(chunk, t)
  scale = d ** -0.5 if scale is None else float(scale)
  compute = jnp.result_type(q_bthd, k_bthd, v_bthd, jnp.float32)
  pad = -t % chunk
  # Padding goes after the last row; causality keeps it out of real rows.
  rows = lambda x: _to_rows(
      jnp.pad(x.astype(compute), [(0, 0), (0, pad), (0, 0), (0, 0)]),
      kv_heads)
  out = _attend(rows(q_bthd), rows(k_bthd), rows(v_bthd), chunk,
                h // kv_heads, scale)
  out = out.reshape(b, kv_heads, t + pad, h // kv_heads, d)
  out = out.transpose(0, 2, 1, 3, 4).reshape(b, t + pad, h, d)
  return out[:, :t].astype(q_bthd.dtype)
