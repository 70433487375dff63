"""Time-chunk slicing shared by the blocked kernels."""

from __future__ import annotations

import jax


def get_block(x: jax.Array, i: jax.Array | int, size: int,
              axis: int = 1) -> jax.Array:
  """Rows [i * size, (i + 1) * size) of x along `axis` (time)."""
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def put_block(x: jax.Array, value: jax.Array, i: jax.Array | int,
              size: int, axis: int = 1) -> jax.Array:
  """x with rows [i * size, (i + 1) * size) along `axis` replaced by value."""
  return jax.lax.dynamic_update_slice_in_dim(x, value, i * size, axis=axis)
