"""GPU (Triton) kernels for the O(T²) passes of the feedback solve.

Five kernels, each one `pallas_call` whose grid is (B, programs), all
parallel; each program walks its reduction tiles with an in-kernel loop,
keeping its running state in registers. Sequence-long operands are passed
whole (one (T, width) block per batch row) and sliced with `pl.ds`.

* `row_stats`: per row, the log-sum-exp over the keys of earlier chunks.
* `rect_apply`: one rectangle of the forward solve, given at run time: rows
  [row0, row0 + n_rows) read keys [key0, key0 + side) (in tiles), adding
  sum_j A_tj s_j to the context `ctx` in place.
* `rect_col`: one rectangle of the backward solve: keys gather from rows
  dv_j += sum_t A_tj w_t and dk_j += sum_t dlogit_tj q_t, and rows gather
  dq_t += sum_j dlogit_tj k_j from the same tiles (no separate dq pass).
* `leaf_solve` and `leaf_adjoint`: one chunk's diagonal block, s_i =
  inv_i (f_i + gamma_i ctx_i) or u_i = inv_i^T rhs_i (with w_i and delta_i),
  one program per row tile, visiting only the inverse's nonzero tiles.

The rectangles' extents change from launch to launch while the grid is
fixed at `max(largest side, MIN_PROGRAMS)` programs: a small rectangle
splits its reduction axis over the spare programs, and every program adds
its partial sums with atomic adds (as flash-attention backward kernels do
for dq). Programs with nothing to do exit at once.

Triton wants power-of-two block shapes: feature widths must be powers of two
(at least 16; `feature_width`), which the caller gets by zero-padding (exact:
padded channels add nothing to any dot product), and the tile must be a
power of two. Passing `plgpu.CompilerParams` selects the Triton lowering.
Matmul operands keep their dtype (bfloat16 feeds the tensor cores);
accumulation, statistics and accumulators are float32 (float64 for float64
inputs).

Each kernel's tile height and pipeline stages are chosen for the target's
shared memory per block (`tiling`): Triton stages every streamed operand
tile through shared memory, once per pipeline stage, so a tiling that runs
on an H200 (232,448 bytes) can fail to compile on an A100 (166,912).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sessa_jax import targets
from sessa_jax.kernels.blocks import acc_dtype, tile_dot
from sessa_jax.kernels.feedback import backend
from sessa_jax.kernels.feedback.backend import Tiling

# Least programs per batch row of a rectangle launch: with B = 2, about two
# per streaming multiprocessor of an H100/H200 (132 SMs). Interpret mode runs
# programs one after another, so it takes fewer (the smallest rectangles are
# still split).
MIN_PROGRAMS = 128
MIN_PROGRAMS_INTERPRET = 4
KERNELS = ("row_stats", "rect_apply", "rect_col", "leaf_solve",
           "leaf_adjoint")
# Largest tile height tried: 64-row bfloat16 tiles were the fastest setting
# measured on an H200 (K = D = 256).
MAX_TILE = 64
# Shared memory a kernel's Triton program asks for, in bytes per byte of one
# (tile, feature width) operand tile, by GPU architecture (Hopper's and
# Ampere's Triton layouts differ), keyed (operand itemsize 2 or 4, pipeline
# stages, tile): the largest ratio measured by deviceless compiles (jaxlib
# 0.10.2, H200 and A100 targets) over padded feature widths 128, 256 and 512,
# with float32 accumulators (`make test-targets` checks the tilings they
# give). The leaf kernels' operands are float32 (the compute dtype).
_LEAF = {(4, 1, 16): 1, (4, 1, 32): 1, (4, 1, 64): 1}
SMEM_PER_TILE_BYTE = {
    "sm_90": {
        "row_stats": {(2, 1, 16): 2, (2, 1, 32): 2, (2, 1, 64): 2,
                      (2, 2, 16): 2.032, (2, 2, 32): 2.063, (2, 2, 64): 3.032,
                      (4, 1, 16): 2, (4, 1, 32): 2, (4, 1, 64): 2},
        "rect_apply": {(2, 1, 16): 2.125, (2, 1, 32): 2.25, (2, 1, 64): 2,
                       (2, 2, 16): 3.125, (2, 2, 32): 3.25, (2, 2, 64): 5,
                       (4, 1, 16): 2, (4, 1, 32): 2, (4, 1, 64): 2},
        "rect_col": {(2, 1, 16): 5.125, (2, 1, 32): 5.25, (2, 1, 64): 4.5,
                     (2, 2, 16): 7.063, (2, 2, 32): 6.063, (2, 2, 64): 8.063,
                     (4, 1, 16): 5, (4, 1, 32): 5, (4, 1, 64): 5.5},
        "leaf_solve": _LEAF, "leaf_adjoint": _LEAF},
    "sm_80": {
        "row_stats": {(2, 1, 16): 2, (2, 1, 32): 2, (2, 1, 64): 1.5,
                      (2, 2, 16): 2.032, (2, 2, 32): 2.063, (2, 2, 64): 2.063,
                      (4, 1, 16): 2, (4, 1, 32): 2, (4, 1, 64): 1.5},
        "rect_apply": {(2, 1, 16): 2.125, (2, 1, 32): 2.25, (2, 1, 64): 2.5,
                       (2, 2, 16): 3.125, (2, 2, 32): 3.25, (2, 2, 64): 3.5,
                       (4, 1, 16): 2, (4, 1, 32): 2, (4, 1, 64): 2},
        "rect_col": {(2, 1, 16): 5.125, (2, 1, 32): 5.25, (2, 1, 64): 5.5,
                     (2, 2, 16): 7.063, (2, 2, 32): 7.063, (2, 2, 64): 6.063,
                     (4, 1, 16): 5, (4, 1, 32): 5, (4, 1, 64): 5},
        "leaf_solve": _LEAF, "leaf_adjoint": _LEAF},
}
# Bytes allowed beyond the table's estimate (per-row vectors of narrow
# widths, below the widths measured).
SMEM_SLACK = 1024


def arch(compute_capability: tuple[int, int] | None) -> str:
  """The `SMEM_PER_TILE_BYTE` table of a GPU: Hopper's for 9.x and unknown
  GPUs, Ampere's for older ones."""
  if compute_capability is None or compute_capability[0] >= 9:
    return "sm_90"
  return "sm_80"


def feature_width(width: int) -> int:
  """The padded feature width the kernels take: a power of two, >= 16."""
  return max(16, 1 << (width - 1).bit_length())


def smem_estimate(kernel: str, tiling: Tiling, width: int, itemsize: int,
                  gpu_arch: str = "sm_90") -> int | None:
  """Shared memory (bytes) `kernel` asks for; None when not tabulated.

  Args:
    kernel: one of `KERNELS`.
    tiling: its tile height and pipeline stages.
    width: the padded feature width (the larger of K and D).
    itemsize: bytes per element of the kernel's matmul operands (the
      compute dtype's for the leaf kernels); 8-byte operands scale the
      4-byte ratios.
    gpu_arch: `sm_90` or `sm_80` (`arch`).
  """
  ratio = SMEM_PER_TILE_BYTE[gpu_arch][kernel].get(
      (2 if itemsize <= 2 else 4, tiling.stages, tiling.tile))
  if ratio is None:
    return None
  return int(ratio * tiling.tile * width * itemsize) + SMEM_SLACK


def tiling(kernel: str, chunk: int, width: int, itemsize: int,
           smem_bytes: int, gpu_arch: str = "sm_90") -> Tiling:
  """The largest tile (then the most stages) of `kernel` that fits.

  Tiles are powers of two from `MAX_TILE` down to 16 that divide `chunk`;
  16-bit operands try two pipeline stages before one, wider ones take one.
  A chunk with no such divisor gets its largest power-of-two divisor, which
  only interpret mode takes (Triton's dots need 16 rows).

  Args:
    kernel: one of `KERNELS`.
    chunk: the solve's chunk (tiles must divide it).
    width: the padded feature width (the larger of K and D).
    itemsize: bytes per element of the kernel's operands.
    smem_bytes: the target's shared memory per block.
    gpu_arch: `sm_90` or `sm_80` (`arch`).

  Raises:
    ValueError: naming the kernel, the smallest request and the limit when
      no tiling fits.
  """
  tiles = [t for t in (64, 32, 16) if t <= MAX_TILE and chunk % t == 0]
  if not tiles:
    return Tiling(chunk & -chunk if chunk & -chunk < MAX_TILE else MAX_TILE,
                  1)
  needs = []
  for tile in tiles:
    for stages in range(2 if itemsize <= 2 else 1, 0, -1):
      need = smem_estimate(kernel, Tiling(tile, stages), width, itemsize,
                           gpu_arch)
      if need <= smem_bytes:
        return Tiling(tile, stages)
      needs.append(need)
  raise ValueError(
      f"feedback_solve GPU kernel {kernel}: no tile of chunk={chunk} fits "
      f"{smem_bytes:,} bytes of shared memory per block at feature width "
      f"{width} with {itemsize}-byte operands (the smallest asks for "
      f"{min(needs):,} bytes)")


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret, stages,
          aliases=None, name=None):
  """The pallas_call, with `stages` Triton pipeline stages.

  Named `name` (default: the kernel function's) in compile reports, with
  its tile height and stages.
  """
  name = name or kernel.func.__name__.strip("_").removesuffix("_kernel")
  block = kernel.keywords["block"]
  return targets.traced(f"{name} (gpu, tile {block}, {stages} stage"
                        f"{'s' if stages > 1 else ''})", pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, input_output_aliases=aliases or {},
      compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=stages),
      interpret=bool(interpret), name=name))


def _block(width, block):
  return pl.BlockSpec((None, block, width), lambda b, i: (b, i, 0))


def _whole(x):
  """The batch row of x (B, T[, width]) as one block."""
  return pl.BlockSpec((None, *x.shape[1:]),
                      lambda b, i: (b,) + (0,) * (x.ndim - 1))


def _vec_block(block):
  return pl.BlockSpec((None, block), lambda b, i: (b, i))


_SCHEDULE = pl.BlockSpec((4,), lambda b, i: (0,))


def _tiles(start, block):
  """`pl.ds` of tile `start` (a traced tile index) of height `block`."""
  return pl.ds(pl.multiple_of(start * block, block), block)


def _programs(side_max, interpret):
  """Grid size per batch row of the rectangle kernels."""
  return max(side_max,
             MIN_PROGRAMS_INTERPRET if interpret else MIN_PROGRAMS)


def _atomic_add_rows(ref, rows, value):
  """ref[rows, :] += value, atomically (other programs add to it too)."""
  # The column start is int32 like the rows' (not int64 under x64).
  plgpu.atomic_add(ref, (rows, pl.ds(jnp.int32(0), ref.shape[-1])), value)


def _causal_key_count(r, group):
  """Key tiles row tile r reads in a causal pass: those of earlier groups."""
  return (r // group) * group


def _row_stats_kernel(q_ref, k_ref, lse_ref, *, block, group, scale):
  r = pl.program_id(1)
  q = q_ref[...]

  def body(c, carry):
    m, l = carry
    logits = tile_dot(q, k_ref[_tiles(c, block), :], trans_b=True) * scale
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), 1)
    return m_new, l

  init = (jnp.full((block,), -jnp.inf, lse_ref.dtype),
          jnp.zeros((block,), lse_ref.dtype))
  m, l = lax.fori_loop(0, _causal_key_count(r, group), body, init)
  lse_ref[...] = jnp.where(l > 0, m + jnp.log(l), -jnp.inf)


def row_stats(q_btk, k_btk, *, block, group, scale, interpret, stages=1):
  """Row log-sum-exps over keys of earlier groups, -inf where none: (B, T)."""
  b, t, kd = q_btk.shape
  return _call(
      functools.partial(_row_stats_kernel, block=block, group=group,
                        scale=scale),
      (b, t // block), [_block(kd, block), _whole(k_btk)],
      _vec_block(block), jax.ShapeDtypeStruct((b, t), acc_dtype(q_btk)),
      interpret, stages)(q_btk, k_btk)


def _share(p, side, extent, programs):
  """Program p's tile on the rectangle's side and its part of the other axis.

  Program p takes side tile p % side and part p // side of the `extent`
  tiles of the reduction axis, split into programs // side parts.

  Returns:
    (side tile, first reduction tile, end reduction tile); an empty range
    when the program has nothing to do.
  """
  # lax.div/rem: truncating integer ops (all operands are non-negative),
  # which lower to single Triton instructions.
  parts = lax.div(jnp.int32(programs), side)
  per = lax.div(extent + parts - 1, parts)
  lo = lax.div(p, side) * per
  return lax.rem(p, side), lo, jnp.minimum(extent, lo + per)


def _rect_apply_kernel(sched_ref, q_ref, k_ref, s_ref, lse_ref, _, ctx_ref,
                       *, block, programs, scale):
  row0, n_rows, key0, side = [sched_ref[i] for i in range(4)]
  r, lo, hi = _share(pl.program_id(1), side, side, programs)

  @pl.when((r < n_rows) & (lo < hi))
  def _():
    rows = _tiles(row0 + r, block)
    q, lse = q_ref[rows, :], lse_ref[rows]

    def body(c, acc):
      keys = _tiles(key0 + c, block)
      p = jnp.exp(tile_dot(q, k_ref[keys, :], trans_b=True) * scale
                  - lse[:, None])
      s = s_ref[keys, :]
      return acc + tile_dot(p.astype(s.dtype), s)

    acc = lax.fori_loop(lo, hi, body,
                        jnp.zeros((block, ctx_ref.shape[-1]), ctx_ref.dtype))
    _atomic_add_rows(ctx_ref, rows, acc)


_RECT_APPLY_ALIASES = backend.aliases(backend.RECT_APPLY, ("ctx",))


def rect_apply(sched, q_btk, k_btk, s_btd, lse_bt, ctx_btd, *, block,
               side_max, scale, interpret, stages=1):
  """ctx_t += sum_j exp(q_t.k_j * scale - lse_t) s_j over one rectangle.

  Args:
    sched: int32 (4,): first row tile, row tiles, first key tile, key tiles
      (the rectangle's side; rows may be fewer at the end of the sequence).
    q_btk, k_btk: queries and keys (B, T, K), matmul dtype.
    s_btd: solved rows (B, T, D), matmul dtype.
    lse_bt: row log-sum-exps (B, T), float32 or wider.
    ctx_btd: the context accumulator (B, T, D), updated in place.
    block: tile height.
    side_max: the largest side (in tiles) of any rectangle of this solve.
    scale: logit scale.
    interpret: run in interpret mode.
    stages: Triton pipeline stages.

  Returns:
    The updated ctx.
  """
  programs = _programs(side_max, interpret)
  operands = (sched, q_btk, k_btk, s_btd, lse_bt, ctx_btd)
  return _call(
      functools.partial(_rect_apply_kernel, block=block, programs=programs,
                        scale=scale),
      (q_btk.shape[0], programs),
      [_SCHEDULE] + [_whole(x) for x in operands[1:]],
      _whole(ctx_btd), jax.ShapeDtypeStruct(ctx_btd.shape, ctx_btd.dtype),
      interpret, stages, aliases=_RECT_APPLY_ALIASES)(*operands)


def _rect_col_kernel(sched_ref, q_ref, k_ref, w_ref, s_ref, delta_ref,
                     lse_ref, _, __, ___, dv_ref, dk_ref, dq_ref, *, block,
                     programs, scale):
  row0, n_rows, key0, side = [sched_ref[i] for i in range(4)]
  c, lo, hi = _share(pl.program_id(1), side, n_rows, programs)

  @pl.when(lo < hi)
  def _():
    keys = _tiles(key0 + c, block)
    k, s = k_ref[keys, :], s_ref[keys, :]

    def body(r, carry):
      dv, dk = carry
      rows = _tiles(row0 + r, block)
      q, w = q_ref[rows, :], w_ref[rows, :]
      p = jnp.exp(tile_dot(q, k, trans_b=True) * scale
                  - lse_ref[rows][:, None])
      dv = dv + tile_dot(p.astype(w.dtype), w, trans_a=True)
      ds = p * (tile_dot(w, s, trans_b=True) - delta_ref[rows][:, None])
      dk = dk + tile_dot(ds.astype(q.dtype), q, trans_a=True)
      _atomic_add_rows(dq_ref, rows, tile_dot(ds.astype(k.dtype), k))
      return dv, dk

    init = (jnp.zeros((block, dv_ref.shape[-1]), dv_ref.dtype),
            jnp.zeros((block, dk_ref.shape[-1]), dk_ref.dtype))
    dv, dk = lax.fori_loop(lo, hi, body, init)
    _atomic_add_rows(dv_ref, keys, dv)
    _atomic_add_rows(dk_ref, keys, dk)


_RECT_COL_ALIASES = backend.aliases(backend.RECT_COL + ("dq",),
                                   ("dv", "dk", "dq"))


def rect_col(sched, q_btk, k_btk, w_btd, s_btd, delta_bt, lse_bt, dv_btd,
             dk_btk, dq_btk, *, block, side_max, scale, interpret,
             stages=1):
  """One backward rectangle: dv, dk (keys) and dq (rows), in place.

  For keys j and rows t of the rectangle `sched` (see `rect_apply`), with
  A_tj = exp(q_t.k_j * scale - lse_t) and dlogit_tj = A_tj (w_t.s_j -
  delta_t) (unscaled): dv_j += sum_t A_tj w_t, dk_j += sum_t dlogit_tj q_t,
  dq_t += sum_j dlogit_tj k_j.

  Returns:
    The updated (dv, dk, dq).
  """
  programs = _programs(side_max, interpret)
  operands = (sched, q_btk, k_btk, w_btd, s_btd, delta_bt, lse_bt, dv_btd,
              dk_btk, dq_btk)
  outs = operands[7:]
  return _call(
      functools.partial(_rect_col_kernel, block=block, programs=programs,
                        scale=scale),
      (q_btk.shape[0], programs),
      [_SCHEDULE] + [_whole(x) for x in operands[1:]],
      [_whole(x) for x in outs],
      [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outs],
      interpret, stages, aliases=_RECT_COL_ALIASES)(*operands)


_INDEX = pl.BlockSpec((1,), lambda b, r: (0,))


def _leaf_kernel(index_ref, inv_ref, rhs_ref, gamma_ref, ctx_ref, *refs,
                 block, group, transpose):
  n_out = len(refs) // 2
  outs = refs[n_out:]
  i, r = index_ref[0], pl.program_id(1)
  rows = _tiles(i * group + r, block)
  rows_in_chunk = _tiles(r, block)

  def body(c, acc):
    cols_in_chunk = _tiles(c, block)
    other = _tiles(i * group + c, block)
    if transpose:  # Rows r of inv^T: column tile r of inv, row tiles c >= r.
      inv = inv_ref[i, cols_in_chunk, rows_in_chunk]
      return acc + tile_dot(inv, rhs_ref[other, :], trans_a=True)
    rhs = (rhs_ref[other, :] + gamma_ref[other][:, None] * ctx_ref[other, :])
    return acc + tile_dot(inv_ref[i, rows_in_chunk, cols_in_chunk], rhs)

  # inv is unit lower triangular: tile (r, c) is zero for c > r.
  lo, hi = (r, group) if transpose else (0, r + 1)
  x = lax.fori_loop(lo, hi, body,
                    jnp.zeros((block, outs[0].shape[-1]), outs[0].dtype))
  if not transpose:
    for out in outs:
      out[rows, :] = x.astype(out.dtype)
    return
  u_ref, delta_ref, *w_refs = outs
  gamma = gamma_ref[rows]
  u_ref[rows, :] = x
  delta_ref[rows] = gamma * jnp.sum(x * ctx_ref[rows, :], axis=1)
  for w_ref in w_refs:
    w_ref[rows, :] = (gamma[:, None] * x).astype(w_ref.dtype)


def _leaf(index, inv_bncc, rhs_btd, gamma_bt, ctx_btd, outs, *, block,
          transpose, interpret, stages):
  b, n, c = inv_bncc.shape[:3]
  names = (backend.LEAF_ADJOINT_OUTS if transpose
           else backend.LEAF_SOLVE_OUTS)[:len(outs)]
  operands = (index, inv_bncc, rhs_btd, gamma_bt, ctx_btd, *outs)
  return list(_call(
      functools.partial(_leaf_kernel, block=block, group=c // block,
                        transpose=transpose),
      (b, c // block), [_INDEX] + [_whole(x) for x in operands[1:]],
      [_whole(x) for x in outs],
      [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outs],
      interpret, stages, aliases=backend.aliases(backend.LEAF + names, names),
      name="leaf_adjoint" if transpose else "leaf_solve")(*operands))


def leaf_solve(index, inv_bncc, f_btd, gamma_bt, ctx_btd, s_outs, *, block,
               interpret, stages=1):
  """Solves chunk `index`: s_i = inv_i (f_i + gamma_i ctx_i), in place.

  Args:
    index: int32 (1,): the chunk.
    inv_bncc: (I - gamma_i A_ii)^{-1} of every chunk (B, N, C, C).
    f_btd: right-hand side (B, T, D).
    gamma_bt: gains (B, T).
    ctx_btd: the context the rows have read so far (B, T, D).
    s_outs: the solution (B, T, D), and optionally its copy in the kernels'
      matmul dtype; both updated in place.
    block: tile height (dividing C).
    interpret: run in interpret mode.
    stages: Triton pipeline stages.

  Returns:
    The updated `s_outs`.
  """
  return _leaf(index, inv_bncc, f_btd, gamma_bt, ctx_btd, s_outs,
               block=block, transpose=False, interpret=interpret,
               stages=stages)


def leaf_adjoint(index, inv_bncc, rhs_btd, gamma_bt, ctx_btd, outs, *, block,
                 interpret, stages=1):
  """Solves chunk `index` of the adjoint: u_i = inv_i^T rhs_i, in place.

  Also writes delta_i = gamma_i (u_i . ctx_i) and w_i = gamma_i u_i.

  Args:
    index, inv_bncc, gamma_bt, ctx_btd, block, interpret, stages: as
      for `leaf_solve`.
    rhs_btd: the adjoint right-hand side (B, T, D).
    outs: (u (B, T, D), delta (B, T), w (B, T, D)[, w in the matmul dtype]),
      updated in place.

  Returns:
    The updated `outs`.
  """
  return _leaf(index, inv_bncc, rhs_btd, gamma_bt, ctx_btd, outs,
               block=block, transpose=True, interpret=interpret,
               stages=stages)


def bind(plan: backend.Plan) -> backend.Kernels:
  """These kernels bound to one solve: tiles, stages, programs and scale.

  dq is accumulated by `rect_col` (atomic adds), so there is no `row_grad`.
  """
  def tiled(kernel, **static):
    tiling = plan.tilings[kernel.__name__]
    return functools.partial(kernel, block=tiling.tile, stages=tiling.stages,
                             interpret=plan.interpret, **static)

  return backend.Kernels(
      row_stats=tiled(row_stats, group=plan.group("row_stats"),
                      scale=plan.scale),
      rect_apply=tiled(rect_apply, side_max=plan.side_max("rect_apply"),
                       scale=plan.scale),
      rect_col=tiled(rect_col, side_max=plan.side_max("rect_col"),
                     scale=plan.scale),
      leaf_solve=tiled(leaf_solve), leaf_adjoint=tiled(leaf_adjoint),
      row_grad=None)


BACKEND = backend.Backend(kernels=KERNELS, feature_width=feature_width,
                          bind=bind)
