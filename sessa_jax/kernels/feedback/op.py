"""The public feedback-solve op: one signature, several implementations.

`feedback_solve` solves Sessa's feedback system (docs/design.md#feedback-solve)

  s_t = f_t + gamma_t * sum_{j<t} A_tj s_j,   A = strictly causal softmax(q k^T)

with one of `IMPLS`:

* `dense`: materialise A and call a triangular solve; the test oracle.
* `chunked`: blocked forward substitution in plain JAX with an O(T·D)-memory
  custom VJP; the CPU default.
* `pallas`: the same algorithm with its O(T²) parts as Pallas kernels (Mosaic
  on TPU, Triton on GPU, interpret mode on CPU).
* `auto`: `chunked` on CPU, `pallas` on TPU and GPU.

Sharding: the op is independent per sequence, so under a mesh it runs per
batch shard through `jax.shard_map` over the mesh's batch axes (argument
`batch_axes`, by default the trainer's `mesh_axes.BATCH_AXES`, whichever
exist), needing no communication. The mesh is the `mesh=`
argument when given, else the mesh set by `jax.set_mesh` (the abstract mesh
seen while tracing). Axes already manual (inside another shard_map) are left
alone; a batch that does not divide the shard count runs unsharded.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from sessa_jax import mesh_axes
from sessa_jax import targets
from sessa_jax.kernels.feedback import chunked
from sessa_jax.kernels.feedback import reference

# The implementation names; `ModelConfig.feedback_impl` takes one of these.
IMPLS = ("auto", "dense", "chunked", "pallas")


def resolve_impl(impl: str) -> str:
  """Maps `auto` to the implementation for the active target's platform."""
  if impl not in IMPLS:
    raise ValueError(
        f"feedback_solve impl={impl!r} is not one of: {', '.join(IMPLS)}")
  if impl != "auto":
    return impl
  return "chunked" if targets.platform() == "cpu" else "pallas"


def _solve_local(q_fb, k_fb, gamma, f, *, impl, chunk, scale):
  if impl == "dense":
    return reference.feedback_solve_dense(q_fb, k_fb, gamma, f, scale=scale)
  if impl == "chunked":
    return chunked.feedback_solve_chunked(
        q_fb, k_fb, gamma, f, chunk=chunk, scale=scale)
  # Imported lazily: Pallas pulls in backend-specific lowering modules.
  from sessa_jax.kernels.feedback import pallas  # pylint: disable=g-import-not-at-top
  return pallas.feedback_solve_pallas(
      q_fb, k_fb, gamma, f, chunk=chunk, scale=scale)


def _batch_axes(mesh, batch: int,
                batch_axes: tuple[str, ...]) -> tuple[str, ...]:
  """Mesh axes to shard the batch over; empty when there is nothing to do."""
  if mesh is None or mesh.empty:
    return ()
  manual = set(getattr(mesh, "manual_axes", ()))
  axes = tuple(a for a in batch_axes
               if a in mesh.axis_names and a not in manual
               and mesh.shape[a] > 1)
  shards = 1
  for a in axes:
    shards *= mesh.shape[a]
  return axes if axes and batch % shards == 0 else ()


def feedback_solve(q_fb: jax.Array, k_fb: jax.Array, gamma: jax.Array,
                   f: jax.Array, *, impl: str = "auto",
                   chunk: int | None = None,
                   scale: float | None = None,
                   mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None
                   = None,
                   batch_axes: tuple[str, ...] = mesh_axes.BATCH_AXES
                   ) -> jax.Array:
  """Solves Sessa's feedback system s_t = f_t + gamma_t sum_{j<t} A_tj s_j.

  A is the strictly causal softmax of scale * q_fb k_fb^T (row 0 all zeros).
  Computation is in float32 (float64 for float64 inputs); bfloat16 inputs
  give a bfloat16 result.

  Args:
    q_fb: feedback queries (B, T, K).
    k_fb: feedback keys (B, T, K).
    gamma: gains (B, T).
    f: right-hand side (B, T, D).
    impl: implementation name, one of `IMPLS`.
    chunk: chunk size of the blocked implementations (None: their default,
      `defaults.DEFAULT_CHUNK`).
    scale: logit scale; defaults to K ** -0.5 (`defaults.resolve_scale`).
    mesh: mesh whose `batch_axes` shard the batch; defaults to the mesh set
      with `jax.set_mesh`, if any.
    batch_axes: the mesh axes the batch is split over (those present are
      used); defaults to the trainer's, `mesh_axes.BATCH_AXES`.

  Returns:
    s (B, T, D) in the dtype of `f`.
  """
  impl = resolve_impl(impl)
  if (q_fb.ndim != 3 or k_fb.shape != q_fb.shape
      or gamma.shape != q_fb.shape[:2] or f.shape[:2] != q_fb.shape[:2]
      or f.ndim != 3):
    raise ValueError(
        "feedback_solve expects q_fb, k_fb (B, T, K), gamma (B, T), "
        f"f (B, T, D); got {q_fb.shape}, {k_fb.shape}, {gamma.shape}, "
        f"{f.shape}")

  def local(q_fb, k_fb, gamma, f):
    return _solve_local(q_fb, k_fb, gamma, f, impl=impl, chunk=chunk,
                        scale=scale)

  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  axes = _batch_axes(mesh, q_fb.shape[0], tuple(batch_axes))
  if not axes:
    return local(q_fb, k_fb, gamma, f)
  spec = P(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4,
                       out_specs=spec, check_vma=False)(q_fb, k_fb, gamma, f)
