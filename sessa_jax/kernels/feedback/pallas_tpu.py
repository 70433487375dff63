"""Mosaic TPU kernels for the O(T²) passes of the feedback solve.

Flash-attention style passes over (row tile, key tile) pairs, each a
`pallas_call` whose grid runs each outer tile's reduction steps in order
("arbitrary"), with the running state in VMEM scratch. Blocks are (C, K) and
(C, D) tiles, C a multiple of 8
(hundreds of rows in practice) and K, D the full feature widths; per-row
scalars travel as (B, T, 1) arrays so their (C, 1) tiles are legal too.

* `row_stats` and `row_grad` run over the whole sequence, causal by groups
  of `group` consecutive tiles (one chunk of the solve): a row tile reads
  only key tiles of earlier groups, the chunks' diagonal blocks being
  handled outside, in plain JAX. Their grid walks a triangular list of
  (row tile, key tile) pairs (scalar-prefetched), so fully masked tiles are
  never visited.
* `rect_apply` and `rect_col` run on one rectangle of the solve's loop
  (every key precedes every row), whose offsets and extents arrive at run
  time: the schedule is scalar-prefetched into SMEM, it offsets the block
  index maps, and it sizes the grid (Mosaic takes dynamic grid bounds), so
  every grid step does work. Accumulators are updated in place
  (`input_output_aliases`).
* `leaf_solve` and `leaf_adjoint` solve one chunk's diagonal block, in
  place: one grid step per batch row holds the chunk's (C, C) inverse.

Logits use log-sum-exps `lse` computed by `row_stats`, so A = exp(l - lse)
needs no rescaling and contributions from different calls simply add.
Matmul operands keep their input dtype (bfloat16 feeds the MXU directly);
accumulation and every output are float32 (float64 for float64 inputs).
There are no atomics on TPU, so dq is `row_grad`'s own pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sessa_jax import targets
from sessa_jax.kernels.blocks import acc_dtype, tile_dot
from sessa_jax.kernels.feedback import backend

KERNELS = ("row_stats", "rect_apply", "rect_col", "row_grad", "leaf_solve",
           "leaf_adjoint")


def feature_width(width: int) -> int:
  """The feature width the kernels take: any (blocks span it whole)."""
  return width


def _interpret(interpret):
  """pallas_call's `interpret`: TPU interpreter settings, or False."""
  if isinstance(interpret, pltpu.InterpretParams):
    return interpret
  return pltpu.InterpretParams() if interpret else False


def _name(kernel) -> str:
  """A kernel's name for compile reports: `rect_col (tpu)`."""
  name = getattr(kernel, "func", kernel).__name__
  return name.strip("_").removesuffix("_kernel") + " (tpu)"


def _logits(q_ref, k_ref, scale):
  return tile_dot(q_ref[...], k_ref[...], trans_b=True) * scale


# Causal passes over the whole sequence: a list of the visited tile pairs.

_FIRST, _LAST, _VISIBLE = 1, 2, 4


def _causal_pairs(n_tiles, group):
  """The (row tile, key tile) steps of a pass causal by groups, in order.

  Row tile r reads the key tiles of earlier groups, [0, (r // group) *
  group); a row tile with none gets one idle step so its output is written.
  Fully masked tiles are never visited.

  Returns:
    int32 arrays (rows, keys, flags), flags marking a row's first and last
    step and the steps that read keys.
  """
  rows, keys, flags = [], [], []
  for r in range(n_tiles):
    n_keys = (r // group) * group
    steps = max(n_keys, 1)
    for c in range(steps):
      rows.append(r)
      keys.append(c)
      flags.append(_FIRST * (c == 0) + _LAST * (c == steps - 1)
                   + _VISIBLE * (c < n_keys))
  return [jnp.asarray(np.asarray(x, np.int32)) for x in (rows, keys, flags)]


def _causal_call(kernel, operands, row_operands, out_width, acc, scratch,
                 block, group, interpret):
  """A causal-by-groups pass over the tile pairs of `_causal_pairs`.

  `operands` are (B, T, width) arrays, row-side where `row_operands` says
  so, key-side otherwise; the output (B, T, out_width) is row-side.
  """
  b, t = operands[0].shape[:2]
  pairs = _causal_pairs(t // block, group)
  row = lambda p, rows, keys, flags: rows[p]
  key = lambda p, rows, keys, flags: keys[p]

  def spec(width, tile_of):
    return pl.BlockSpec((None, block, width),
                        lambda b, p, *sched: (b, tile_of(p, *sched), 0))

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(b, pairs[0].shape[0]),
      in_specs=[spec(x.shape[-1], row if is_row else key)
                for x, is_row in zip(operands, row_operands)],
      out_specs=spec(out_width, row), scratch_shapes=scratch)
  return targets.traced(_name(kernel), pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((b, t, out_width), acc),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary")),
      interpret=_interpret(interpret)))(*pairs, *operands)


def _step_flags(flags_ref):
  """Whether this step is its row's first, its last, and reads keys."""
  flags = flags_ref[pl.program_id(1)]
  return ((flags & _FIRST) != 0, (flags & _LAST) != 0,
          (flags & _VISIBLE) != 0)


# Row log-sum-exp over the key blocks of earlier groups.


def _row_stats_kernel(rows_ref, keys_ref, flags_ref, q_ref, k_ref, lse_ref,
                      m_sc, l_sc, *, scale):
  del rows_ref, keys_ref
  first, last, visible = _step_flags(flags_ref)

  @pl.when(first)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, m_sc.dtype)
    l_sc[...] = jnp.zeros(l_sc.shape, l_sc.dtype)

  @pl.when(visible)
  def _():
    logits = _logits(q_ref, k_ref, scale)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
    l_sc[...] = l_sc[...] * jnp.exp(m_prev - m_new) + jnp.sum(
        jnp.exp(logits - m_new), axis=1, keepdims=True)
    m_sc[...] = m_new

  @pl.when(last)
  def _():
    l = l_sc[...]
    lse_ref[...] = jnp.where(l > 0, m_sc[...] + jnp.log(l), -jnp.inf)


def row_stats(q_btk, k_btk, *, block, group, scale, interpret):
  """Row log-sum-exps over keys of earlier groups, -inf where none: (B, T)."""
  acc = acc_dtype(q_btk)
  lse = _causal_call(
      functools.partial(_row_stats_kernel, scale=scale), (q_btk, k_btk),
      (True, False), 1, acc,
      [pltpu.VMEM((block, 1), acc), pltpu.VMEM((block, 1), acc)], block,
      group, interpret)
  return lse[..., 0]


# Rectangles of the solve, extents given at run time.


def _rect_call(kernel, sched, grid, in_specs, out_specs, outs, scratch,
               aliases, interpret, operands):
  """A rectangle's pallas_call: `sched` is scalar-prefetched and sets the
  grid's extents, the accumulators `outs` are updated in place."""
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
      out_specs=out_specs, scratch_shapes=scratch)
  return targets.traced(_name(kernel), pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outs],
      input_output_aliases=aliases,
      # Grid axes sized at run time must be "arbitrary" (the interpreter
      # needs parallel extents when tracing); the batch axis stays parallel.
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=_interpret(interpret)))(sched, *operands)


_ROWS, _KEYS = 0, 2  # Where each side's first tile sits in the schedule.


def _rect_spec(block, width, side, grid_axis):
  """Block of one side of a rectangle: tile sched[side] + that grid index.

  Args:
    block: tile height.
    width: feature width.
    side: `_ROWS` or `_KEYS`.
    grid_axis: the grid axis (1 or 2) that walks this side.
  """
  return pl.BlockSpec(
      (None, block, width),
      lambda b, i, j, sched: (b, sched[side] + (i, j)[grid_axis - 1], 0))


def _rect_apply_kernel(sched_ref, q_ref, k_ref, s_ref, lse_ref, ctx_in_ref,
                       ctx_ref, acc_sc, *, scale):
  del sched_ref
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    acc_sc[...] = jnp.zeros(acc_sc.shape, acc_sc.dtype)

  p = jnp.exp(_logits(q_ref, k_ref, scale) - lse_ref[...])
  acc_sc[...] += tile_dot(p.astype(s_ref.dtype), s_ref[...])

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    ctx_ref[...] = ctx_in_ref[...] + acc_sc[...]


_RECT_APPLY_ALIASES = backend.aliases(backend.RECT_APPLY, ("ctx",))


def rect_apply(sched, q_btk, k_btk, s_btd, lse_bt, ctx_btd, *, block, scale,
               interpret):
  """ctx_t += sum_j exp(q_t.k_j * scale - lse_t) s_j over one rectangle.

  The grid (B, row tiles, key tiles) takes its extents from `sched` at run
  time (see `pallas_gpu.rect_apply` for the arguments), so no step is idle.
  """
  acc = ctx_btd.dtype
  b, _, kd = q_btk.shape
  d = s_btd.shape[-1]
  row = lambda width: _rect_spec(block, width, _ROWS, grid_axis=1)
  key = lambda width: _rect_spec(block, width, _KEYS, grid_axis=2)
  (ctx,) = _rect_call(
      functools.partial(_rect_apply_kernel, scale=scale), sched,
      (b, sched[1], sched[3]), [row(kd), key(kd), key(d), row(1), row(d)],
      [row(d)], [ctx_btd], [pltpu.VMEM((block, d), acc)], _RECT_APPLY_ALIASES,
      interpret,
      (q_btk, k_btk, s_btd, lse_bt[..., None], ctx_btd))
  return ctx


def _rect_col_kernel(sched_ref, q_ref, k_ref, w_ref, s_ref, delta_ref,
                     lse_ref, dv_in_ref, dk_in_ref, dv_ref, dk_ref, dv_sc,
                     dk_sc, *, scale):
  del sched_ref
  r = pl.program_id(2)

  @pl.when(r == 0)
  def _():
    dv_sc[...] = jnp.zeros(dv_sc.shape, dv_sc.dtype)
    dk_sc[...] = jnp.zeros(dk_sc.shape, dk_sc.dtype)

  p = jnp.exp(_logits(q_ref, k_ref, scale) - lse_ref[...])  # (rows, keys)
  w = w_ref[...]
  dv_sc[...] += tile_dot(p.astype(w.dtype), w, trans_a=True)
  ds = p * (tile_dot(w, s_ref[...], trans_b=True) - delta_ref[...])
  dk_sc[...] += tile_dot(ds.astype(q_ref.dtype), q_ref[...], trans_a=True)

  @pl.when(r == pl.num_programs(2) - 1)
  def _():
    dv_ref[...] = dv_in_ref[...] + dv_sc[...]
    dk_ref[...] = dk_in_ref[...] + dk_sc[...]


_RECT_COL_ALIASES = backend.aliases(backend.RECT_COL, ("dv", "dk"))


def rect_col(sched, q_btk, k_btk, w_btd, s_btd, delta_bt, lse_bt, dv_btd,
             dk_btk, *, block, scale, interpret):
  """One backward rectangle's key side: dv_j += sum_t A_tj w_t and dk_j +=
  sum_t dlogit_tj q_t (unscaled), in place; grid (B, key tiles, row tiles)
  sized from `sched` at run time. dq is `row_grad`'s (no atomics on TPU).

  Returns:
    The updated (dv, dk).
  """
  acc = dv_btd.dtype
  b, _, kd = q_btk.shape
  d = w_btd.shape[-1]
  row = lambda width: _rect_spec(block, width, _ROWS, grid_axis=2)
  key = lambda width: _rect_spec(block, width, _KEYS, grid_axis=1)
  return tuple(_rect_call(
      functools.partial(_rect_col_kernel, scale=scale), sched,
      (b, sched[3], sched[1]),
      [row(kd), key(kd), row(d), key(d), row(1), row(1), key(d), key(kd)],
      [key(d), key(kd)], [dv_btd, dk_btk],
      [pltpu.VMEM((block, d), acc), pltpu.VMEM((block, kd), acc)],
      _RECT_COL_ALIASES, interpret,
      (q_btk, k_btk, w_btd, s_btd, delta_bt[..., None], lse_bt[..., None],
       dv_btd, dk_btk)))


# Rows gather from keys: dq_t = sum_j dlogit_tj k_j.


def _row_grad_kernel(rows_ref, keys_ref, flags_ref, q_ref, k_ref, s_ref,
                     w_ref, delta_ref, lse_ref, dq_ref, dq_sc, *, scale):
  del rows_ref, keys_ref
  first, last, visible = _step_flags(flags_ref)

  @pl.when(first)
  def _():
    dq_sc[...] = jnp.zeros(dq_sc.shape, dq_sc.dtype)

  @pl.when(visible)
  def _():
    p = jnp.exp(_logits(q_ref, k_ref, scale) - lse_ref[...])
    dp = tile_dot(w_ref[...], s_ref[...], trans_b=True)
    ds = p * (dp - delta_ref[...])
    dq_sc[...] += tile_dot(ds.astype(k_ref.dtype), k_ref[...])

  @pl.when(last)
  def _():
    dq_ref[...] = dq_sc[...]


def row_grad(q_btk, k_btk, s_btd, w_btd, delta_bt, lse_bt, *, block, group,
             scale, interpret):
  """Per row t: sum_j dlogit_tj k_j over keys of earlier groups (unscaled)."""
  acc = acc_dtype(q_btk)
  kd = q_btk.shape[-1]
  return _causal_call(
      functools.partial(_row_grad_kernel, scale=scale),
      (q_btk, k_btk, s_btd, w_btd, delta_bt[..., None], lse_bt[..., None]),
      (True, False, False, True, True, True), kd, acc,
      [pltpu.VMEM((block, kd), acc)], block, group, interpret)


# The diagonal blocks: one chunk solved per call, the whole chunk per step.


def _leaf_kernel(index_ref, inv_ref, rhs_ref, gamma_ref, ctx_ref, *refs,
                 transpose):
  del index_ref
  outs = refs[len(refs) // 2:]
  gamma = gamma_ref[...]
  if not transpose:
    x = tile_dot(inv_ref[...], rhs_ref[...] + gamma * ctx_ref[...])
    for out in outs:
      out[...] = x.astype(out.dtype)
    return
  u_ref, delta_ref, *w_refs = outs
  u = tile_dot(inv_ref[...], rhs_ref[...], trans_a=True)
  u_ref[...] = u
  delta_ref[...] = gamma * jnp.sum(u * ctx_ref[...], axis=1, keepdims=True)
  for w_ref in w_refs:
    w_ref[...] = (gamma * u).astype(w_ref.dtype)


def _leaf(index, inv_bncc, rhs_btd, gamma_bt, ctx_btd, outs, *, transpose,
          interpret):
  b, _, c, _ = inv_bncc.shape
  names = (backend.LEAF_ADJOINT_OUTS if transpose
           else backend.LEAF_SOLVE_OUTS)[:len(outs)]
  chunk = lambda x: pl.BlockSpec((None, c, x.shape[-1]),
                                 lambda b, i: (b, i[0], 0))
  flat, outs = outs, [x[..., None] if x.ndim == 2 else x for x in outs]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b,),
      in_specs=[pl.BlockSpec((None, None, c, c), lambda b, i: (b, i[0], 0, 0)),
                chunk(rhs_btd), chunk(gamma_bt[..., None]), chunk(ctx_btd),
                *[chunk(x) for x in outs]],
      out_specs=[chunk(x) for x in outs])
  new = targets.traced(
      "leaf_adjoint (tpu)" if transpose else "leaf_solve (tpu)",
      pl.pallas_call(
          functools.partial(_leaf_kernel, transpose=transpose),
          grid_spec=grid_spec,
          out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outs],
          input_output_aliases=backend.aliases(backend.LEAF + names, names),
          compiler_params=pltpu.CompilerParams(
              dimension_semantics=("parallel",)),
          interpret=_interpret(interpret)))(
              index, inv_bncc, rhs_btd, gamma_bt[..., None], ctx_btd, *outs)
  return [y[..., 0] if x.ndim == 2 else y for x, y in zip(flat, new)]


def leaf_solve(index, inv_bncc, f_btd, gamma_bt, ctx_btd, s_outs, *,
               interpret):
  """Solves chunk `index` in place (see `pallas_gpu.leaf_solve`).

  One grid step per batch row holds the whole chunk: the (C, C) inverse and
  (C, D) tiles, so there is no tile height.
  """
  return _leaf(index, inv_bncc, f_btd, gamma_bt, ctx_btd, s_outs,
               transpose=False, interpret=interpret)


def leaf_adjoint(index, inv_bncc, rhs_btd, gamma_bt, ctx_btd, outs, *,
                 interpret):
  """Solves chunk `index` of the adjoint in place (see
  `pallas_gpu.leaf_adjoint`)."""
  return _leaf(index, inv_bncc, rhs_btd, gamma_bt, ctx_btd, outs,
               transpose=True, interpret=interpret)


def bind(plan: backend.Plan) -> backend.Kernels:
  """These kernels bound to one solve: tiles, causal groups and scale.

  The rectangles' grids are sized by their schedules at run time, and the
  leaves hold whole chunks; dq is `row_grad`'s pass (no atomics on TPU).
  """
  def tiled(kernel, **static):
    return functools.partial(kernel, block=plan.tilings[kernel.__name__].tile,
                             scale=plan.scale, interpret=plan.interpret,
                             **static)

  causal = lambda kernel: tiled(kernel, group=plan.group(kernel.__name__))
  return backend.Kernels(
      row_stats=causal(row_stats), rect_apply=tiled(rect_apply),
      rect_col=tiled(rect_col), row_grad=causal(row_grad),
      leaf_solve=functools.partial(leaf_solve, interpret=plan.interpret),
      leaf_adjoint=functools.partial(leaf_adjoint, interpret=plan.interpret))


BACKEND = backend.Backend(kernels=KERNELS, feature_width=feature_width,
                          bind=bind)
