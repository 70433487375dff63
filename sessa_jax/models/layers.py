"""Parameters with sharding metadata, and the Linear and MLP layers.

Every parameter carries logical axis names as flax's `out_sharding` metadata
('embed' for a d_model-sized dim, 'hidden' for other projection widths,
'heads' for per-head vectors, 'vocab' for the vocabulary, None for small
dims); `sessa_jax.models.partitioning.LOGICAL_RULES` maps them onto the mesh.
Under a mesh (`jax.set_mesh`) with eager sharding on, flax places the value at
creation (logical axis rules must then be in scope); elsewhere the names are
plain metadata that `nnx.get_partition_spec` reads.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sessa_jax.models.partitioning import constrain

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]
Axes = tuple[str | None, ...]


def torch_uniform(fan_in: int) -> Initializer:
  """PyTorch's default Linear init: uniform in +-1/sqrt(fan_in)."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def constant(value: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, value, dtype)

  return init


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
          axes: Axes, dtype: jnp.dtype) -> nnx.Param:
  """Creates an `nnx.Param` annotated with logical axis names.

  Args:
    rngs: random streams; draws from `rngs.params`.
    init: initializer `(key, shape, dtype) -> array`.
    shape: parameter shape.
    axes: one logical axis name (or None) per dim.
    dtype: storage dtype.

  Returns:
    The parameter, eagerly sharded only when a mesh is set.
  """
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
  eager = (nnx.using_eager_sharding()
           and not jax.sharding.get_abstract_mesh().empty)
  return nnx.Param(init(rngs.params(), tuple(shape), dtype),
                   out_sharding=tuple(axes), eager_sharding=eager)


class Linear(nnx.Module):
  """y = x W + b with W stored (in, out), PyTorch-default initialisation.

  Computation runs in `dtype` (the input's dtype when None); parameters are
  stored in `param_dtype`.
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               use_bias: bool = True, axes: tuple[str | None, str | None] = (
                   "embed", "hidden"),
               dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32):
    init = torch_uniform(in_features)
    self.kernel = param(rngs, init, (in_features, out_features), axes,
                        param_dtype)
    self.bias = (param(rngs, init, (out_features,), axes[1:], param_dtype)
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class MLP(nnx.Module):
  """Two-layer feed-forward sublayer D -> r*D -> D with exact GELU."""

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs,
               dtype: jnp.dtype | None = None,
               param_dtype: jnp.dtype = jnp.float32):
    self.up = Linear(d_model, hidden, rngs=rngs, axes=("embed", "hidden"),
                     dtype=dtype, param_dtype=param_dtype)
    self.down = Linear(hidden, d_model, rngs=rngs, axes=("hidden", "embed"),
                       dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    h = jax.nn.gelu(self.up(x_btd), approximate=False)
    if h.ndim == 3:  # Training and prefill; decoding (B, hidden) runs as is.
      h = constrain(h, "batch", "sequence", "hidden")
    return self.down(h)
