"""Feedback solve with its O(T²) passes as Pallas kernels (TPU and GPU).

The algorithm of `feedback_chunked` (docs/design.md#feedback-solve),
arranged for accelerators:

1. `row_stats`: every row's log-sum-exp over the key chunks before its own
   (a parallel flash-style pass), merged with the diagonal chunk's in JAX.
   With exact log-sum-exps, A = exp(logits - lse) blocks from different
   passes simply add.
2. The diagonal C x C blocks of all chunks at once (batched, O(T·C)): A_ii
   and the inverses (I - gamma_i A_ii)^{-1} by blocked recursion.
3. Forward substitution as a divide-and-conquer over chunks: solve the left
   half, let the right half's rows read it in one parallel `row_apply`
   rectangle, solve the right half. Every rectangle is a full-width kernel
   launch, so the sequential depth is the number of chunks while the work
   in each launch parallelises over all its rows.
4. Backward: the adjoint u = (I - M)^{-T} g by the mirrored recursion (right
   half first; `col_apply` rectangles give the left keys both their adjoint
   contribution A^T (gamma u) and their dk), then one parallel `row_grad`
   pass for dq, plus the diagonal blocks in JAX.

Two sizes: the chunk C (rows of each diagonal block, leaves of the
recursion; default 256) and the kernels' tile height, which divides C and is
what fits the hardware (128 on TPU; on GPU 64 rows of bfloat16 or 32 of
float32 at width 256). The causal kernels skip whole chunks, so the diagonal
blocks are counted once. The recursion is unrolled at trace time: its depth,
the number of kernel launches and the compile time grow with T / C, which a
larger chunk keeps small (an H200 compiled chunk = tile = 64 at T = 32768 in
105 s).

Kernels come from `feedback_pallas_tpu` (Mosaic, sequential reduction axis
with VMEM scratch) or `feedback_pallas_gpu` (Triton, in-kernel loops). On
CPU they run in interpret mode, which is how the tests check them.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sessa_jax.kernels import blocks
from sessa_jax.kernels import feedback_pallas_gpu
from sessa_jax.kernels import feedback_pallas_tpu

BACKENDS = {"tpu": feedback_pallas_tpu, "gpu": feedback_pallas_gpu}
TPU_TILE = 128
# Largest (tile x feature width) operand tile of the GPU kernels, in bytes.
# Measured on an H200 at K = D = 256: 64 rows of bfloat16 and 32 rows of
# float32 compile; 64 rows of float32 ask for more shared memory than a
# block may have.
GPU_TILE_BYTES = 32 * 1024


class _Setup(NamedTuple):
  """Static (hashable) settings of one solve."""
  backend: str
  interpret: bool
  chunk: int
  tile: int
  scale: float
  mm_dtype: jnp.dtype

  @property
  def group(self) -> int:
    """Kernel tiles per chunk: the causal passes skip whole chunks."""
    return self.chunk // self.tile

  def op(self, name):
    """Kernel `name` of this backend, with tiles of `tile` rows."""
    return functools.partial(getattr(BACKENDS[self.backend], name),
                             block=self.tile, scale=self.scale,
                             interpret=self.interpret)


def _default_backend() -> str:
  return "gpu" if jax.default_backend() == "gpu" else "tpu"


def default_tile(backend: str, chunk: int, width: int, mm_dtype) -> int:
  """Kernel tile height for this chunk, operand width and dtype.

  The largest legal tile that divides `chunk` and is at most: `TPU_TILE` on
  TPU; on GPU the largest power of two up to 64 whose tile of the
  (power-of-two padded) feature width fits `GPU_TILE_BYTES`, at least 16.
  """
  if backend == "tpu":
    return math.gcd(chunk, TPU_TILE)
  tile_row = max(16, 1 << (width - 1).bit_length()) * mm_dtype.itemsize
  cap = 64
  while cap > 16 and cap * tile_row > GPU_TILE_BYTES:
    cap //= 2
  return math.gcd(chunk, cap)


def _chunked(x, chunk):
  """(B, T, ...) -> (B, T // chunk, chunk, ...)."""
  return x.reshape(x.shape[0], -1, chunk, *x.shape[2:])


def _unchunked(x):
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _diagonal(q_btk, k_btk, lse_bt, chunk, scale):
  """A_ii of every chunk, (B, N, C, C), from the full-row log-sum-exp."""
  q, k = _chunked(q_btk, chunk), _chunked(k_btk, chunk)
  logits = jnp.einsum("bnck,bnsk->bncs", q, k) * scale
  mask = jnp.tril(jnp.ones((chunk, chunk), bool), k=-1)
  lse = _chunked(lse_bt, chunk)[..., None]
  return jnp.where(mask, jnp.exp(logits - lse), 0.0)


def _row_lse(q_btk, k_btk, setup):
  """Log-sum-exp over all earlier keys per row (0 for row 0)."""
  chunk, scale = setup.chunk, setup.scale
  lse_off = setup.op("row_stats")(q_btk, k_btk, group=setup.group)
  q, k = _chunked(q_btk, chunk), _chunked(k_btk, chunk)
  logits = jnp.einsum("bnck,bnsk->bncs", q, k,
                      preferred_element_type=lse_off.dtype) * scale
  mask = jnp.tril(jnp.ones((chunk, chunk), bool), k=-1)
  lse_diag = jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1)
  lse = jnp.logaddexp(lse_off, _unchunked(lse_diag))
  return jnp.where(jnp.isfinite(lse), lse, 0.0)


def _forward(q_btk, k_btk, gamma_bt, f_btd, setup):
  chunk, scale, mm_dtype = setup.chunk, setup.scale, setup.mm_dtype
  n = q_btk.shape[1] // chunk
  lse = _row_lse(q_btk.astype(mm_dtype), k_btk.astype(mm_dtype), setup)
  a_diag = _diagonal(q_btk, k_btk, lse, chunk, scale)
  gamma = _chunked(gamma_bt, chunk)
  inv = blocks.unit_lower_inverse(gamma[..., None] * a_diag)
  f = _chunked(f_btd, chunk)
  s = [None] * n
  ctx_off = [jnp.zeros_like(f[:, 0])] * n
  rows = lambda x, lo, hi: x[:, lo * chunk:hi * chunk].astype(mm_dtype)

  def solve(lo, hi):
    if hi - lo == 1:
      rhs = f[:, lo] + gamma[:, lo, :, None] * ctx_off[lo]
      s[lo] = jnp.einsum("bcs,bsd->bcd", inv[:, lo], rhs)
      return
    mid = (lo + hi) // 2
    solve(lo, mid)
    read = setup.op("row_apply")(
        rows(q_btk, mid, hi), rows(k_btk, lo, mid),
        jnp.concatenate(s[lo:mid], axis=1).astype(mm_dtype),
        lse[:, mid * chunk:hi * chunk])
    for i in range(mid, hi):
      ctx_off[i] = ctx_off[i] + read[:, (i - mid) * chunk:(i - mid + 1) * chunk]
    solve(mid, hi)

  solve(0, n)
  s_bnd = jnp.stack(s, axis=1)
  ctx = jnp.stack(ctx_off, axis=1) + jnp.einsum("bncs,bnsd->bncd", a_diag,
                                                s_bnd)
  return _unchunked(s_bnd), _unchunked(ctx), lse


def _backward(setup, res, g_btd):
  chunk, scale, mm_dtype = setup.chunk, setup.scale, setup.mm_dtype
  q_btk, k_btk, gamma_bt, s_btd, ctx_btd, lse = res
  n = q_btk.shape[1] // chunk
  a_diag = _diagonal(q_btk, k_btk, lse, chunk, scale)
  gamma = _chunked(gamma_bt, chunk)
  inv = blocks.unit_lower_inverse(gamma[..., None] * a_diag)
  ctx = _chunked(ctx_btd, chunk)
  rhs = [g for g in jnp.moveaxis(_chunked(g_btd, chunk), 1, 0)]
  dk_off = [jnp.zeros_like(k_btk[:, :chunk])] * n
  u, w, delta = [None] * n, [None] * n, [None] * n
  rows = lambda x, lo, hi: x[:, lo * chunk:hi * chunk]

  def adjoint(lo, hi):
    if hi - lo == 1:
      u[lo] = jnp.einsum("bsc,bsd->bcd", inv[:, lo], rhs[lo])
      w[lo] = gamma[:, lo, :, None] * u[lo]
      delta[lo] = gamma[:, lo] * jnp.sum(u[lo] * ctx[:, lo], axis=-1)
      return
    mid = (lo + hi) // 2
    adjoint(mid, hi)
    dv, dk = setup.op("col_apply")(
        rows(q_btk, mid, hi).astype(mm_dtype),
        rows(k_btk, lo, mid).astype(mm_dtype),
        jnp.concatenate(w[mid:hi], axis=1).astype(mm_dtype),
        rows(s_btd, lo, mid).astype(mm_dtype),
        jnp.concatenate(delta[mid:hi], axis=1), rows(lse, mid, hi))
    for j in range(lo, mid):
      part = slice((j - lo) * chunk, (j - lo + 1) * chunk)
      rhs[j] = rhs[j] + dv[:, part]
      dk_off[j] = dk_off[j] + dk[:, part]
    adjoint(lo, mid)

  adjoint(0, n)
  u_btd = jnp.concatenate(u, axis=1)
  w_btd = jnp.concatenate(w, axis=1)
  delta_bt = jnp.concatenate(delta, axis=1)
  dq = setup.op("row_grad")(
      q_btk.astype(mm_dtype), k_btk.astype(mm_dtype), s_btd.astype(mm_dtype),
      w_btd.astype(mm_dtype), delta_bt, lse, group=setup.group)
  # The diagonal blocks' share of the logit gradient.
  w_c, s_c = _chunked(w_btd, chunk), _chunked(s_btd, chunk)
  ds = a_diag * (jnp.einsum("bncd,bnsd->bncs", w_c, s_c)
                 - _chunked(delta_bt, chunk)[..., None])
  dq = dq + _unchunked(jnp.einsum("bncs,bnsk->bnck", ds,
                                  _chunked(k_btk, chunk)))
  dk = jnp.concatenate(dk_off, axis=1) + _unchunked(
      jnp.einsum("bncs,bnck->bnsk", ds, _chunked(q_btk, chunk)))
  dgamma = jnp.sum(u_btd * ctx_btd, axis=-1)
  return dq * scale, dk * scale, dgamma, u_btd


def _check_tiles(backend, chunk, tile, interpret):
  """Raises ValueError naming the setting the backend's kernels cannot take."""
  if chunk < 1 or tile < 1 or chunk % tile:
    raise ValueError(f"feedback_solve tile={tile} must divide chunk={chunk}")
  if backend == "tpu" and tile % 8:
    raise ValueError(f"feedback_solve chunk={chunk} (tile {tile}) must be a "
                     f"multiple of 8 for the TPU kernels")
  if backend == "gpu" and tile & (tile - 1):
    raise ValueError(f"feedback_solve tile={tile} must be a power of two for "
                     f"the GPU kernels")
  if backend == "gpu" and not interpret and tile < 16:
    raise ValueError(f"feedback_solve chunk={chunk} gives GPU tiles of {tile} "
                     f"rows; Triton's dots need 16: use a multiple of 16")


def feedback_solve_pallas(q_btk: jax.Array, k_btk: jax.Array,
                          gamma_bt: jax.Array, f_btd: jax.Array, *,
                          chunk: int | None = None,
                          tile: int | None = None,
                          scale: float | None = None,
                          backend: str | None = None,
                          interpret: bool | None = None) -> jax.Array:
  """Feedback solve whose O(T²) passes are Pallas kernels.

  Args:
    q_btk: feedback queries (B, T, K).
    k_btk: feedback keys (B, T, K).
    gamma_bt: per-token gains (B, T).
    f_btd: right-hand side (B, T, D).
    chunk: rows per chunk: the diagonal blocks solved in plain JAX and the
      leaves of the divide-and-conquer (`blocks.DEFAULT_CHUNK`). T is padded up to
      a multiple of it.
    tile: the kernels' tile height, dividing `chunk`: a multiple of 8 on
      TPU, a power of two on GPU (at least 16 when compiled). Defaults per
      backend, width and dtype (`default_tile`).
    scale: logit scale; defaults to K ** -0.5.
    backend: `tpu` or `gpu` kernels; defaults to the platform's (TPU kernels
      when running on CPU).
    interpret: run the kernels in interpret mode; defaults to True on CPU.

  Returns:
    s (B, T, D) in the dtype of `f_btd`. Solves accumulate in float32
    (float64 inputs compute in float64); bfloat16 inputs feed the kernels'
    matmuls as bfloat16.
  """
  backend = _default_backend() if backend is None else backend
  if backend not in BACKENDS:
    raise ValueError(f"feedback_solve_pallas backend={backend!r} is not one "
                     f"of: {', '.join(BACKENDS)}")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  compute = jnp.result_type(q_btk, k_btk, gamma_bt, f_btd, jnp.float32)
  mm_dtype = jnp.dtype(
      jnp.bfloat16 if q_btk.dtype == jnp.bfloat16 else compute)
  chunk = blocks.resolve_chunk(chunk)
  if tile is None:
    tile = default_tile(backend, chunk,
                        max(q_btk.shape[-1], f_btd.shape[-1]), mm_dtype)
  tile = int(tile)
  _check_tiles(backend, chunk, tile, interpret)
  return blocks.blocked_feedback_solve(
      _forward, _backward, q_btk, k_btk, gamma_bt, f_btd, multiple=chunk,
      settings=lambda scale, compute: _Setup(
          backend, bool(interpret), chunk, tile, scale, mm_dtype),
      scale=scale)
