"""Logical axis names and the one table that maps them onto the device mesh.

Parameters and activations name their dimensions with logical axes; a single
table, `LOGICAL_RULES`, maps each name onto mesh axes ('data', 'fsdp',
'tensor'):

* 'batch' -> ('data', 'fsdp'): activations are data parallel over both.
* 'embed' -> 'fsdp': parameters split their d_model dimension over 'fsdp'
  (ZeRO-3 style). In an activation the batch has already taken 'fsdp', so
  the embed dimension stays whole there.
* 'hidden', 'heads', 'vocab' -> 'tensor' (Megatron style): the MLP hidden
  width, the attention and Mamba-2 heads (so the Mamba-2 inner width) and
  the vocabulary.
* 'sequence', 'head_dim' -> unsplit.

A mesh axis serves at most one dimension of an array (the first that asks
for it); a dimension the mesh axes do not divide stays whole.

`constrain` pins an activation to its logical layout inside a traced
function when an abstract mesh is set (`jax.sharding.use_abstract_mesh`, as
the trainer does around its steps) and does nothing otherwise (single
device, decoding, tests of a bare module).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from sessa_jax.mesh_axes import BATCH_AXES

LOGICAL_RULES: Mapping[str, Any] = {
    "batch": BATCH_AXES,
    "sequence": None,
    "embed": "fsdp",
    "hidden": "tensor",
    "heads": "tensor",
    "head_dim": None,
    "vocab": "tensor",
}


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int],
                    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> P:
  """PartitionSpec for an array with the given logical axis names.

  A dimension whose size the mesh axes do not divide stays replicated (e.g. an
  odd vocabulary under tensor=2), as does any axis of size 1, an axis the
  mesh lacks, and an axis an earlier dimension already took.

  Args:
    names: one logical name (or None) per dimension; None replicates all.
    shape: the array's shape.
    mesh: the device mesh (concrete or abstract).

  Returns:
    The PartitionSpec.
  """
  if not names:
    return P()
  if len(names) != len(shape):
    raise ValueError(
        f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
  sizes = dict(mesh.shape)
  spec = []
  used = set()
  for name, size in zip(names, shape):
    if name is not None and name not in LOGICAL_RULES:
      raise ValueError(f"unknown logical axis {name!r}; known: "
                       f"{', '.join(LOGICAL_RULES)}")
    axes = LOGICAL_RULES[name] if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if sizes.get(a, 1) > 1 and a not in used)
    if not axes or size % int(np.prod([sizes[a] for a in axes])):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """Constrains activation `x` to the layout of its logical axis names.

  Args:
    x: the activation.
    *names: one logical axis name (or None) per dimension of x.

  Returns:
    x, under a sharding constraint when an abstract mesh with automatic axes
    is set; x unchanged otherwise.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or getattr(mesh, "manual_axes", ()):
    return x
  return jax.lax.with_sharding_constraint(
      x, logical_to_spec(names, x.shape, mesh))
