"""Feedback solve with its O(T²) passes as Pallas kernels (TPU and GPU).

The algorithm of `chunked` (docs/design.md#feedback-solve),
arranged for accelerators as one compiled loop over chunks per direction:

1. `row_stats`: every row's log-sum-exp over the key chunks before its own
   (one parallel flash-style pass), merged with the diagonal chunk's, all
   in float32 (float64 for float64 inputs) whatever the input dtype. With
   exact log-sum-exps, A = exp(logits - lse) blocks computed in different
   launches simply add.
2. The diagonal C x C blocks of all chunks at once (batched, O(T·C)): A_ii
   and the inverses (I - gamma_i A_ii)^{-1}.
3. Forward substitution: a `lax.fori_loop` over the n = T / C chunks
   ("leaves"). Leaf i solves s_i = (I - gamma_i A_ii)^{-1} (f_i + gamma_i
   ctx_i) in one `leaf_solve` launch (in place, with the copy of s_i in the
   matmul dtype that the rectangles read); then, with 2^l the lowest set bit
   of i + 1, one `rect_apply`
   launch lets rows of chunks [i + 1, i + 1 + 2^l) read the keys of chunks
   [i + 1 - 2^l, i + 1), adding A s to their context ctx in place. Every
   (row chunk, key chunk) pair below the diagonal is covered by exactly one
   rectangle (the one of the highest bit where the two chunk indices
   differ), after its keys are solved and before its rows are: the order of
   a divide-and-conquer over chunks, as a loop. The rectangle's offsets and
   extents are run-time operands, so the traced program (and the compile
   time) does not grow with T, while each launch parallelises over all its
   rows.
4. Backward: the adjoint u = (I - M)^{-T} g by the mirrored loop, leaves
   from last to first, each one `leaf_adjoint` launch (u_j, w_j = gamma_j
   u_j and delta_j = gamma_j u_j . ctx_j); after leaf j (> 0) one `rect_col`
   launch on rows of
   chunks [j, j + 2^l) and keys of chunks [j - 2^l, j), 2^l the lowest set
   bit of j, adds A^T (gamma u) to the keys' adjoint right-hand side and
   accumulates dk; on GPU the same launch accumulates dq with atomic adds,
   on TPU (no atomics) one causal `row_grad` pass after the loop does. The
   diagonal blocks' share of the gradients is batched JAX.

Matmul work, in causal passes P (one product over all pairs j < t with
contraction K = D): forward 3P (statistics 1, rectangles 2), backward 5P on
GPU (rectangles: logits, A^T w, w s^T, dk, dq) and 7P on TPU (rectangles 4,
`row_grad` 3); `tests/test_feedback_flops.py` audits it.

Two sizes: the chunk C (rows of each diagonal block and loop leaf, default
`defaults.DEFAULT_CHUNK`) and the kernels' tile height, which divides C and
is what fits the hardware (`kernel_tilings`). Kernels come from a backend
(`backend.Backend`, bound to each solve's `backend.Plan`): `pallas_tpu`
(Mosaic: scalar-prefetched schedule, grids sized at run time, sequential
reduction axis with VMEM scratch) or `pallas_gpu` (Triton: fixed grids,
in-kernel loops, split reductions with atomic adds). On CPU they run in
interpret mode, which is how the tests check them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from sessa_jax import targets
from sessa_jax.kernels.feedback import blocked
from sessa_jax.kernels.feedback import defaults
from sessa_jax.kernels.feedback import pallas_gpu
from sessa_jax.kernels.feedback import pallas_tpu
from sessa_jax.kernels.feedback.backend import Backend, Plan, Tiling
from sessa_jax.kernels.feedback.triangular import strict_lower
from sessa_jax.kernels.feedback.triangular import unit_lower_inverse

BACKENDS: dict[str, Backend] = {"tpu": pallas_tpu.BACKEND,
                                "gpu": pallas_gpu.BACKEND}
# TPU tile height: blocks of hundreds of rows keep the MXU busy per grid
# step; (256, K) and (256, D) tiles of float32 fit VMEM with room to spare.
TPU_TILE = 256
# Shared memory per block assumed for GPU kernels traced without a GPU
# target (interpret mode on CPU): an H200's.
DEFAULT_GPU_SMEM = targets.GPUS["h200"].smem_per_block_optin


class _Setup(NamedTuple):
  """Static (hashable) settings of one solve."""
  backend: Backend
  interpret: bool | pltpu.InterpretParams
  chunk: int
  tilings: tuple[tuple[str, int, int], ...]  # (kernel, tile, stages)
  scale: float
  mm_dtype: jnp.dtype

  def plan(self, chunks: int) -> Plan:
    """The `Plan` of this solve over `chunks` chunks (padded)."""
    tilings = {kernel: Tiling(tile, stages)
               for kernel, tile, stages in self.tilings}
    return Plan(self.chunk, chunks, tilings, self.scale, self.interpret)


def _default_backend() -> str:
  return "gpu" if targets.platform() == "gpu" else "tpu"


def kernel_tilings(backend: str, chunk: int, width: int, mm_dtype,
                   compute_dtype, smem_bytes: int | None = None
                   ) -> dict[str, tuple[int, int]]:
  """Each kernel's (tile height, pipeline stages) for one solve.

  TPU: `TPU_TILE` rows (or the largest divisor of `chunk` below it that
  gcd gives), one "stage" (Mosaic pipelines by itself). GPU: per kernel,
  the largest tile and most stages whose shared memory fits `smem_bytes`
  (`pallas_gpu.tiling`); the leaf kernels' operands are in the
  compute dtype, the others' in the matmul dtype.

  Args:
    backend: `tpu` or `gpu`.
    chunk: the solve's chunk.
    width: the larger feature width (K or D), before padding.
    mm_dtype: the matmul operands' dtype.
    compute_dtype: the solve's compute dtype (float32 or float64).
    smem_bytes: GPU shared memory per block; defaults to the active
      target's (an H200's when it is no GPU). The shared memory each tiling
      asks for is estimated for the active target's architecture.
  """
  if backend == "tpu":
    tile = math.gcd(chunk, TPU_TILE)
    return {name: (tile, 1) for name in BACKENDS["tpu"].kernels}
  chip = targets.active()
  if smem_bytes is None:
    smem_bytes = chip.smem_bytes or DEFAULT_GPU_SMEM
  gpu = pallas_gpu
  gpu_arch = gpu.arch(chip.compute_capability)
  padded = gpu.feature_width(width)
  out = {}
  for name in gpu.KERNELS:
    dtype = compute_dtype if name.startswith("leaf") else mm_dtype
    plan = gpu.tiling(name, chunk, padded, jnp.dtype(dtype).itemsize,
                      smem_bytes, gpu_arch)
    out[name] = (plan.tile, plan.stages)
  return out


def _chunked(x, chunk):
  """(B, T, ...) -> (B, T // chunk, chunk, ...)."""
  return x.reshape(x.shape[0], -1, chunk, *x.shape[2:])


def _unchunked(x):
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _diagonal_logits(q_btk, k_btk, setup, dtype):
  """Logits of every chunk's diagonal block (B, N, C, C) in `dtype`."""
  q, k = _chunked(q_btk, setup.chunk), _chunked(k_btk, setup.chunk)
  return jnp.einsum("bnck,bnsk->bncs", q, k,
                    preferred_element_type=dtype) * setup.scale


def _diagonal(q_btk, k_btk, lse_bt, setup):
  """A_ii of every chunk, (B, N, C, C), from the full-row log-sum-exp."""
  logits = _diagonal_logits(q_btk, k_btk, setup, lse_bt.dtype)
  lse = _chunked(lse_bt, setup.chunk)[..., None]
  return jnp.where(strict_lower(setup.chunk), jnp.exp(logits - lse), 0.0)


def _row_lse(q_btk, k_btk, setup, kernels):
  """Log-sum-exp over all earlier keys per row (0 for row 0), float32+."""
  lse_off = kernels.row_stats(q_btk, k_btk)
  logits = _diagonal_logits(q_btk, k_btk, setup, lse_off.dtype)
  lse_diag = jax.nn.logsumexp(
      jnp.where(strict_lower(setup.chunk), logits, -jnp.inf), axis=-1)
  lse = jnp.logaddexp(lse_off, _unchunked(lse_diag))
  return jnp.where(jnp.isfinite(lse), lse, 0.0)


def _lowest_bit(x):
  return x & -x


def _schedule(row0, n_rows, key0, side, group):
  """The rectangle operand of the kernels, in tiles (int32 (4,))."""
  return jnp.stack([row0, n_rows, key0, side]).astype(jnp.int32) * group


def _index(i):
  """A chunk index as the kernels' int32 (1,) operand."""
  return jnp.reshape(i, (1,)).astype(jnp.int32)


def _with_copy(x, mm_dtype):
  """[x] and, when the kernels' matmuls take another dtype, a copy in it."""
  return [x] if x.dtype == mm_dtype else [x, x.astype(mm_dtype)]


def _forward(q_btk, k_btk, gamma_bt, f_btd, setup):
  chunk, mm_dtype = setup.chunk, setup.mm_dtype
  n = q_btk.shape[1] // chunk
  plan = setup.plan(n)
  kernels = setup.backend.bind(plan)
  q_mm, k_mm = q_btk.astype(mm_dtype), k_btk.astype(mm_dtype)
  lse = _row_lse(q_mm, k_mm, setup, kernels)
  a_diag = _diagonal(q_btk, k_btk, lse, setup)
  inv = unit_lower_inverse(_chunked(gamma_bt, chunk)[..., None] * a_diag)
  group = plan.group("rect_apply")
  rect, leaf = kernels.rect_apply, kernels.leaf_solve

  def step(i, carry):
    s, ctx_off = carry
    s = leaf(_index(i), inv, f_btd, gamma_bt, ctx_off, s)
    side = _lowest_bit(i + 1)
    sched = _schedule(i + 1, jnp.minimum(side, n - 1 - i), i + 1 - side,
                      side, group)
    return s, rect(sched, q_mm, k_mm, s[-1], lse, ctx_off)

  init = (_with_copy(jnp.zeros_like(f_btd), mm_dtype), jnp.zeros_like(f_btd))
  s, ctx_off = jax.lax.fori_loop(0, n - 1, step, init)
  s = leaf(_index(n - 1), inv, f_btd, gamma_bt, ctx_off, s)[0]
  ctx = ctx_off + _unchunked(jnp.einsum("bncs,bnsd->bncd", a_diag,
                                        _chunked(s, chunk)))
  return s, ctx, lse


def _backward(setup, res, g_btd):
  chunk, scale, mm_dtype = setup.chunk, setup.scale, setup.mm_dtype
  q_btk, k_btk, gamma_bt, s_btd, ctx_btd, lse = res
  n = q_btk.shape[1] // chunk
  plan = setup.plan(n)
  kernels = setup.backend.bind(plan)
  q_mm, k_mm, s_mm = (x.astype(mm_dtype) for x in (q_btk, k_btk, s_btd))
  a_diag = _diagonal(q_btk, k_btk, lse, setup)
  inv = unit_lower_inverse(_chunked(gamma_bt, chunk)[..., None] * a_diag)
  dq_in_loop = kernels.row_grad is None
  group = plan.group("rect_col")
  col, leaf = kernels.rect_col, kernels.leaf_adjoint

  def step(i, carry):
    j = n - 1 - i
    outs, rhs, *grads = carry
    outs = leaf(_index(j), inv, rhs, gamma_bt, ctx_btd, outs)
    _, delta, *w = outs
    side = _lowest_bit(j)
    sched = _schedule(j, jnp.minimum(side, n - j), j - side, side, group)
    return (outs, *col(sched, q_mm, k_mm, w[-1], s_mm, delta, lse, rhs,
                       *grads))

  # The adjoint u, delta = gamma (u . ctx) and w = gamma u (with its copy).
  outs = [jnp.zeros_like(g_btd), jnp.zeros(g_btd.shape[:2], g_btd.dtype),
          *_with_copy(jnp.zeros_like(g_btd), mm_dtype)]
  init = (outs, g_btd, jnp.zeros_like(k_btk)) + (
      (jnp.zeros_like(q_btk),) if dq_in_loop else ())
  outs, rhs, dk, *dq = jax.lax.fori_loop(0, n - 1, step, init)
  u, delta, *w = leaf(_index(0), inv, rhs, gamma_bt, ctx_btd, outs)
  if dq_in_loop:
    dq = dq[0]
  else:
    dq = kernels.row_grad(q_mm, k_mm, s_mm, w[-1], delta, lse)
  w = w[0]
  # The diagonal blocks' share of the logit gradient.
  ds = a_diag * (jnp.einsum("bncd,bnsd->bncs", _chunked(w, chunk),
                            _chunked(s_btd, chunk))
                 - _chunked(delta, chunk)[..., None])
  dq = dq + _unchunked(jnp.einsum("bncs,bnsk->bnck", ds,
                                  _chunked(k_btk, chunk)))
  dk = dk + _unchunked(jnp.einsum("bncs,bnck->bnsk", ds,
                                  _chunked(q_btk, chunk)))
  dgamma = jnp.sum(u * ctx_btd, axis=-1)
  return dq * scale, dk * scale, dgamma, u


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


def _pad_features(x, width):
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def feedback_solve_pallas(q_btk: jax.Array, k_btk: jax.Array,
                          gamma_bt: jax.Array, f_btd: jax.Array, *,
                          chunk: int | None = None,
                          tile: int | None = None,
                          scale: float | None = None,
                          backend: str | None = None,
                          interpret: bool | pltpu.InterpretParams | None
                          = None) -> jax.Array:
  """Feedback solve whose O(T²) passes are Pallas kernels.

  Args:
    q_btk: feedback queries (B, T, K).
    k_btk: feedback keys (B, T, K).
    gamma_bt: per-token gains (B, T).
    f_btd: right-hand side (B, T, D).
    chunk: rows per chunk: the diagonal blocks solved in plain JAX and the
      leaves of the loop (`defaults.DEFAULT_CHUNK`). T is padded up to a
      multiple of it.
    tile: every kernel's tile height, dividing `chunk`: a multiple of 8 on
      TPU, a power of two on GPU (at least 16 when compiled; one pipeline
      stage). Defaults per kernel, backend, width, dtype and the target's
      shared memory (`kernel_tilings`).
    scale: logit scale; defaults to K ** -0.5.
    backend: `tpu` or `gpu` kernels; defaults to the active target's
      (`sessa_jax.targets`; TPU kernels on CPU).
    interpret: run the kernels in interpret mode; defaults to True when
      the active target is a CPU.
      The TPU kernels also take the TPU interpreter's settings (e.g. its
      race detector).

  Returns:
    s (B, T, D) in the dtype of `f_btd`. Solves and row statistics are in
    float32 (float64 inputs compute in float64); bfloat16 inputs feed the
    kernels' matmuls as bfloat16.
  """
  backend = _default_backend() if backend is None else backend
  if backend not in BACKENDS:
    raise ValueError(f"feedback_solve_pallas backend={backend!r} is not one "
                     f"of: {', '.join(BACKENDS)}")
  if interpret is None:
    interpret = targets.platform() == "cpu"
  compute = jnp.result_type(q_btk, k_btk, gamma_bt, f_btd, jnp.float32)
  mm_dtype = jnp.dtype(
      jnp.bfloat16 if q_btk.dtype == jnp.bfloat16 else compute)
  chunk = defaults.resolve_chunk(chunk)
  width = max(q_btk.shape[-1], f_btd.shape[-1])
  if tile is None:
    tilings = kernel_tilings(backend, chunk, width, mm_dtype, compute)
  else:
    tilings = {name: (int(tile), 1) for name in BACKENDS[backend].kernels}
  for kernel_tile, _ in tilings.values():
    _check_tiles(backend, chunk, kernel_tile, interpret)
  scale = defaults.resolve_scale(scale, q_btk)  # Before padding K.
  # Zero feature padding is exact: it adds nothing to any dot product.
  padded = BACKENDS[backend].feature_width
  kd, d = padded(q_btk.shape[-1]), padded(f_btd.shape[-1])
  s = blocked.blocked_feedback_solve(
      _forward, _backward, _pad_features(q_btk, kd), _pad_features(k_btk, kd),
      gamma_bt, _pad_features(f_btd, d), multiple=chunk,
      settings=lambda scale, compute: _Setup(
          BACKENDS[backend], interpret, chunk,
          tuple((k, *v) for k, v in sorted(tilings.items())), scale,
          mm_dtype),
      scale=scale)
  return s[..., :f_btd.shape[-1]]
