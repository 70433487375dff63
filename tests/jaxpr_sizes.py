"""Walkers over jaxprs for the kernel tests: array sizes, primitive counts."""

import numpy as np


def equations(jaxpr):
  """Yields every equation of a jaxpr, those of its sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr.
        if hasattr(sub, "eqns"):
          yield from equations(sub)


def array_sizes(jaxpr):
  """Yields the element count of every array in a jaxpr, sub-jaxprs included.

  Checks that a kernel never forms a T x T array.
  """
  for eqn in equations(jaxpr):
    for var in [*eqn.invars, *eqn.outvars]:
      if hasattr(var.aval, "shape"):
        yield int(np.prod(var.aval.shape))
