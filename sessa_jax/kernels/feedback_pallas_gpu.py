"""GPU (Triton) kernels for the O(T²) passes of the feedback solve.

The same four passes as `feedback_pallas_tpu`, laid out the GPU way: the
grid is (B, outer blocks), all parallel, and each program walks the
reduction blocks itself with a `fori_loop`, keeping its running state in
registers. The reduction side is passed whole (one (T, K) block per batch
row) and sliced with `pl.ds`. Triton wants power-of-two block shapes, so
the feature widths are zero-padded up to one (exact: padded channels add
nothing to any dot product) and the tile must be a power of two. Passing
`plgpu.CompilerParams` selects the Triton lowering.

Semantics, shapes and dtypes match `feedback_pallas_tpu` (see there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sessa_jax.kernels.blocks import acc_dtype, tile_dot


def _pad_features(*xs_btf):
  """Zero-pads each array's feature axis to a power of two (at least 16)."""
  padded = []
  for x in xs_btf:
    extra = max(16, 1 << (x.shape[-1] - 1).bit_length()) - x.shape[-1]
    padded.append(
        x if extra == 0 else jnp.pad(x, [(0, 0), (0, 0), (0, extra)]))
  return padded


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret, operand):
  """The pallas_call; `operand` is one input, whose dtype sets the pipeline.

  Two pipeline stages (double-buffered loads) for 16-bit operands, one for
  float32: the settings checked on an H200 (see `feedback_pallas` for the
  tile heights that fit its shared memory).
  """
  stages = 2 if operand.dtype.itemsize <= 2 else 1
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=stages),
      interpret=interpret)


def _block(width, block):
  return pl.BlockSpec((None, block, width), lambda b, i: (b, i, 0))


def _whole(length, width):
  return pl.BlockSpec((None, length, width), lambda b, i: (b, 0, 0))


def _vec_block(block):
  return pl.BlockSpec((None, block), lambda b, i: (b, i))


def _vec_whole(length):
  return pl.BlockSpec((None, length), lambda b, i: (b, 0))


def _causal_key_count(r, group):
  """Key tiles row tile r reads in a causal pass: those of earlier groups."""
  return (r // group) * group


def _stats_kernel(q_ref, k_ref, lse_ref, *, block, group, scale):
  r = pl.program_id(1)
  q = q_ref[...]

  def body(c, carry):
    m, l = carry
    keys = pl.ds(c * block, block)
    logits = tile_dot(q, k_ref[keys, :], trans_b=True) * scale
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), 1)
    return m_new, l

  init = (jnp.full((block,), -jnp.inf, lse_ref.dtype),
          jnp.zeros((block,), lse_ref.dtype))
  m, l = lax.fori_loop(0, _causal_key_count(r, group), body, init)
  lse_ref[...] = jnp.where(l > 0, m + jnp.log(l), -jnp.inf)


def row_stats(q_btk, k_btk, *, block, group, scale, interpret):
  """Row log-sum-exps over keys of earlier groups, -inf where none: (B, T)."""
  acc = acc_dtype(q_btk)
  q_btk, k_btk = _pad_features(q_btk, k_btk)
  b, t, kd = q_btk.shape
  t_keys = k_btk.shape[1]
  return _call(
      functools.partial(_stats_kernel, block=block, group=group,
                        scale=scale),
      (b, t // block), [_block(kd, block), _whole(t_keys, kd)],
      _vec_block(block), jax.ShapeDtypeStruct((b, t), acc),
      interpret, q_btk)(q_btk, k_btk)


def _apply_kernel(q_ref, k_ref, v_ref, lse_ref, out_ref, *, block, scale):
  q, lse = q_ref[...], lse_ref[...]

  def body(c, acc):
    keys = pl.ds(c * block, block)
    logits = tile_dot(q, k_ref[keys, :], trans_b=True) * scale
    p = jnp.exp(logits - lse[:, None])
    v = v_ref[keys, :]
    return acc + tile_dot(p.astype(v.dtype), v)

  n_keys = k_ref.shape[0] // block
  out_ref[...] = lax.fori_loop(0, n_keys, body,
                               jnp.zeros(out_ref.shape, out_ref.dtype))


def row_apply(q_btk, k_btk, v_btd, lse_bt, *, block, scale, interpret):
  """sum_j exp(q_t.k_j * scale - lse_t) v_j over all keys: (B, T, D)."""
  acc = acc_dtype(q_btk)
  d_in = v_btd.shape[-1]
  q_btk, k_btk, v_btd = _pad_features(q_btk, k_btk, v_btd)
  b, t, kd = q_btk.shape
  d = v_btd.shape[-1]
  t_keys = k_btk.shape[1]
  out = _call(
      functools.partial(_apply_kernel, block=block, scale=scale),
      (b, t // block),
      [_block(kd, block), _whole(t_keys, kd), _whole(t_keys, d),
       _vec_block(block)],
      _block(d, block), jax.ShapeDtypeStruct((b, t, d), acc),
      interpret, q_btk)(q_btk, k_btk, v_btd, lse_bt)
  return out[..., :d_in]


def _col_kernel(q_ref, k_ref, w_ref, s_ref, delta_ref, lse_ref, dv_ref,
                dk_ref, *, block, scale):
  k, s = k_ref[...], s_ref[...]

  def body(r, carry):
    dv, dk = carry
    rows = pl.ds(r * block, block)
    q, w = q_ref[rows, :], w_ref[rows, :]
    p = jnp.exp(tile_dot(q, k, trans_b=True) * scale - lse_ref[rows][:, None])
    dv = dv + tile_dot(p.astype(w.dtype), w, trans_a=True)
    ds = p * (tile_dot(w, s, trans_b=True) - delta_ref[rows][:, None])
    dk = dk + tile_dot(ds.astype(q.dtype), q, trans_a=True)
    return dv, dk

  n_rows = q_ref.shape[0] // block
  init = (jnp.zeros(dv_ref.shape, dv_ref.dtype),
          jnp.zeros(dk_ref.shape, dk_ref.dtype))
  dv, dk = lax.fori_loop(0, n_rows, body, init)
  dv_ref[...] = dv
  dk_ref[...] = dk


def col_apply(q_btk, k_btk, w_btd, s_btd, delta_bt, lse_bt, *, block, scale,
              interpret):
  """Per key j: (sum_t A_tj w_t, sum_t dlogit_tj q_t) over all rows.

  dlogit is unscaled.
  """
  acc = acc_dtype(q_btk)
  kd_in, d_in = q_btk.shape[-1], w_btd.shape[-1]
  q_btk, k_btk, w_btd, s_btd = _pad_features(q_btk, k_btk, w_btd, s_btd)
  b, t_rows, kd = q_btk.shape
  d = w_btd.shape[-1]
  t_keys = k_btk.shape[1]
  dv, dk = _call(
      functools.partial(_col_kernel, block=block, scale=scale),
      (b, t_keys // block),
      [_whole(t_rows, kd), _block(kd, block), _whole(t_rows, d),
       _block(d, block), _vec_whole(t_rows), _vec_whole(t_rows)],
      [_block(d, block), _block(kd, block)],
      [jax.ShapeDtypeStruct((b, t_keys, d), acc),
       jax.ShapeDtypeStruct((b, t_keys, kd), acc)],
      interpret, q_btk)(q_btk, k_btk, w_btd, s_btd, delta_bt, lse_bt)
  return dv[..., :d_in], dk[..., :kd_in]


def _grad_kernel(q_ref, k_ref, s_ref, w_ref, delta_ref, lse_ref, dq_ref, *,
                 block, group, scale):
  r = pl.program_id(1)
  q, w = q_ref[...], w_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def body(c, dq):
    keys = pl.ds(c * block, block)
    k = k_ref[keys, :]
    p = jnp.exp(tile_dot(q, k, trans_b=True) * scale - lse[:, None])
    ds = p * (tile_dot(w, s_ref[keys, :], trans_b=True) - delta[:, None])
    return dq + tile_dot(ds.astype(k.dtype), k)

  dq_ref[...] = lax.fori_loop(0, _causal_key_count(r, group), body,
                              jnp.zeros(dq_ref.shape, dq_ref.dtype))


def row_grad(q_btk, k_btk, s_btd, w_btd, delta_bt, lse_bt, *, block, group,
             scale, interpret):
  """Per row t: sum_j dlogit_tj k_j over keys of earlier groups (unscaled)."""
  acc = acc_dtype(q_btk)
  kd_in, d_in = q_btk.shape[-1], w_btd.shape[-1]
  q_btk, k_btk, w_btd, s_btd = _pad_features(q_btk, k_btk, w_btd, s_btd)
  b, t, kd = q_btk.shape
  d = w_btd.shape[-1]
  t_keys = k_btk.shape[1]
  dq = _call(
      functools.partial(_grad_kernel, block=block, group=group,
                        scale=scale),
      (b, t // block),
      [_block(kd, block), _whole(t_keys, kd), _whole(t_keys, d),
       _block(d, block), _vec_block(block), _vec_block(block)],
      _block(kd, block), jax.ShapeDtypeStruct((b, t, kd), acc),
      interpret, q_btk)(q_btk, k_btk, s_btd, w_btd, delta_bt, lse_bt)
  return dq[..., :kd_in]
