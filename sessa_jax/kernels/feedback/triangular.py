"""Lower-triangular building blocks of the feedback solves."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def strict_lower(n: int) -> jax.Array:
  """The (n, n) boolean mask of j < t: the pairs causal feedback reads."""
  return jnp.tril(jnp.ones((n, n), dtype=bool), k=-1)


_LEAF = 16  # Blocks this small are inverted by repeated squaring.


def unit_lower_inverse(n_bcc: jax.Array) -> jax.Array:
  """(I - N)^{-1} for strictly lower-triangular N, batched, all matmuls.

  Blocks of up to `_LEAF` rows use (I - N)^{-1} = (I + N)(I + N^2)(I + N^4)...
  Larger ones are padded to a power of two and split in halves, whose
  inverses are found together in one batched recursive call:
  [[X11, 0], [X22 N21 X11, X22]].

  Args:
    n_bcc: strictly lower-triangular matrices (..., C, C).

  Returns:
    The inverses (..., C, C).
  """
  c = n_bcc.shape[-1]
  if c <= _LEAF:
    x = jnp.eye(c, dtype=n_bcc.dtype) + n_bcc
    power, reach = n_bcc, 2
    while reach < c:
      power = power @ power
      x = x + x @ power
      reach *= 2
    return x
  padded = 1 << (c - 1).bit_length()
  if padded != c:
    pad = [(0, 0)] * (n_bcc.ndim - 2) + [(0, padded - c)] * 2
    return unit_lower_inverse(jnp.pad(n_bcc, pad))[..., :c, :c]
  h = c // 2
  x_both = unit_lower_inverse(
      jnp.stack([n_bcc[..., :h, :h], n_bcc[..., h:, h:]]))
  x11, x22 = x_both[0], x_both[1]
  x21 = x22 @ n_bcc[..., h:, :h] @ x11
  top = jnp.concatenate([x11, jnp.zeros_like(x11)], axis=-1)
  return jnp.concatenate([top, jnp.concatenate([x21, x22], axis=-1)], axis=-2)
