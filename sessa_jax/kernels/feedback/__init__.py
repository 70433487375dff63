"""Sessa's feedback solve (docs/design.md#feedback-solve).

The public op is `feedback_solve` (`op`), with its implementations:

* `reference`: the dense oracle.
* `chunked`: blocked forward substitution in plain JAX.
* `pallas`: the same algorithm with its O(T²) passes as Pallas kernels,
  from a `backend.Backend`: `pallas_tpu` (Mosaic) or `pallas_gpu` (Triton).

What they share: `defaults` (chunk and logit scale), `triangular` (masks and
the unit lower-triangular inverse) and `blocked` (dtype, padding and the
custom VJP of the blocked solves).
"""

from sessa_jax.kernels.feedback.op import IMPLS, feedback_solve, resolve_impl

__all__ = ["IMPLS", "feedback_solve", "resolve_impl"]
