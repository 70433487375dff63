"""Hot loops, each with a plain-JAX reference beside it.

Shape letters in names (`q_btk`, `a_bcc`): docs/design.md#shape-letters.
"""

from sessa_jax.kernels.feedback import feedback_solve

__all__ = ["feedback_solve"]
