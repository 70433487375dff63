"""Normalisation layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sessa_jax.models.layers import constant, param


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with scale and bias (PyTorch's defaults).

  Statistics are computed in float32 (float64 for float64 inputs); the result
  has the input's dtype.
  """

  def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-5,
               param_dtype: jnp.dtype = jnp.float32):
    self.scale = param(rngs, constant(1.0), (dim,), ("embed",), param_dtype)
    self.bias = param(rngs, constant(0.0), (dim,), ("embed",), param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    compute = jnp.promote_types(x.dtype, jnp.float32)
    h = x.astype(compute)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + self.eps)
    h = h * self.scale[...].astype(compute) + self.bias[...].astype(compute)
    return h.astype(x.dtype)
