"""Attention of one new token over a decode cache, reading only filled rows.

A decode cache has a fixed capacity S (so a step compiles once), but only
its first `length` rows hold past tokens. `attend` walks those rows in blocks
of `DECODE_BLOCK` with a `lax.while_loop` and an online softmax, so a step
costs O(length * width), not O(S * width).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sessa_jax.kernels import blocks

# Cache rows per block of a decode step's read.
DECODE_BLOCK = 256


def attend(q_bkgd: jax.Array, k_bskd: jax.Array, v_bske: jax.Array,
           length: jax.Array, *, scale: float,
           block: int | None = None) -> jax.Array:
  """softmax(scale * q . k_j) v_j over the cache rows j < length.

  The KV-head axis is optional: single-head caches (B, S, d) with queries
  (B, G, d) are read as they are (a reshape to add a unit head axis would
  make XLA copy the whole cache).

  Args:
    q_bkgd: one query per (batch, KV head, group member): (B, Hkv, G, d),
      or (B, G, d) for a single-head cache.
    k_bskd: cached keys (B, S, Hkv, d) or (B, S, d).
    v_bske: cached values (B, S, Hkv, e) or (B, S, e).
    length: int32 scalar, rows [0, length) are read; 0 gives zeros.
    scale: logit scale.
    block: rows per block (default `DECODE_BLOCK`, capped at S).

  Returns:
    (B, Hkv, G, e) (or (B, G, e)) in float32 (float64 for float64 inputs).
  """
  capacity = k_bskd.shape[1]
  size = min(block or DECODE_BLOCK, capacity)
  compute = jnp.promote_types(jnp.promote_types(q_bkgd.dtype, k_bskd.dtype),
                              jnp.float32)
  q = q_bkgd.astype(compute) * scale
  h = "k" if k_bskd.ndim == 4 else ""
  scores = f"b{h}gd,bs{h}d->b{h}gs"
  mix = f"b{h}gs,bs{h}e->b{h}ge"

  def body(i, state):
    # The last block may overhang the capacity; dynamic_slice then starts it
    # earlier, and rows before i * size (already read) are masked out.
    start = jnp.minimum(i * size, capacity - size)
    k = jax.lax.dynamic_slice_in_dim(k_bskd, start, size, axis=1)
    v = jax.lax.dynamic_slice_in_dim(v_bske, start, size, axis=1)
    rows = start + jnp.arange(size)
    valid = (rows >= i * size) & (rows < length)
    logits = jnp.einsum(scores, q, k.astype(compute))
    logits = jnp.where(valid, logits, -jnp.inf)
    weigh = lambda p: jnp.einsum(mix, p, v.astype(compute))
    return blocks.online_softmax_step(state, logits, weigh)

  rows_shape = q.shape[:-1]
  init = (jnp.full(rows_shape, -jnp.inf, compute),
          jnp.zeros(rows_shape, compute),
          jnp.zeros((*rows_shape, v_bske.shape[-1]), compute))
  num_blocks = (length + size - 1) // size
  _, total, acc = jax.lax.fori_loop(0, num_blocks, body, init)
  return jnp.where(total[..., None] > 0, acc / jnp.maximum(
      total[..., None], jnp.finfo(compute).tiny), 0.0)
