"""Hot loops, each with a plain-JAX reference beside it."""

from sessa_jax.kernels.feedback import feedback_solve

__all__ = ["feedback_solve"]
