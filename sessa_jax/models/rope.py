"""Rotary position embedding on interleaved channel pairs (2i, 2i+1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inv_frequencies(head_dim: int, base: float = 10000.0) -> jax.Array:
  """base^(-2i/d) for i < d/2, in float32."""
  i = jnp.arange(head_dim // 2, dtype=jnp.float32)
  return jnp.asarray(base, jnp.float32) ** (-2.0 * i / head_dim)


def angles(positions: jax.Array, head_dim: int,
           base: float = 10000.0) -> jax.Array:
  """Rotation angles position * frequency, in float32.

  Args:
    positions: integer positions of any shape P.
    head_dim: head size d (even).
    base: RoPE base.

  Returns:
    Angles of shape P + (d/2,).
  """
  pos = jnp.asarray(positions).astype(jnp.float32)
  return pos[..., None] * inv_frequencies(head_dim, base)


def apply(x_bthd: jax.Array, angles_th: jax.Array) -> jax.Array:
  """Rotates each interleaved pair (x[2i], x[2i+1]) by angle i.

  Args:
    x_bthd: queries or keys (B, T, H, d).
    angles_th: angles (T, d/2), broadcast over batch and heads.

  Returns:
    Rotated array, same shape and dtype as `x_bthd`. The rotation is computed
    in float32 (float64 for float64 inputs).
  """
  compute = jnp.promote_types(x_bthd.dtype, jnp.float32)
  x = x_bthd.astype(compute)
  # out[2i] = x[2i] cos - x[2i+1] sin,  out[2i+1] = x[2i+1] cos + x[2i] sin:
  # x times cos, plus x with each pair swapped times (-sin, +sin). The swap
  # reverses a trailing axis of 2, so neither direction needs strided slices.
  cos = jnp.repeat(jnp.cos(angles_th), 2, axis=-1).astype(compute)
  sin = jnp.sin(angles_th)
  signed_sin = jnp.stack([-sin, sin], axis=-1).reshape(cos.shape)
  swapped = x.reshape(x.shape[:-1] + (-1, 2))[..., ::-1].reshape(x.shape)
  out = x * cos[:, None, :] + swapped * signed_sin.astype(compute)[:, None, :]
  return out.astype(x_bthd.dtype)
