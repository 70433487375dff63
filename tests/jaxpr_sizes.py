"""Array sizes in a jaxpr: checks that a kernel never forms a T x T array."""

import numpy as np


def array_sizes(jaxpr):
  """Yields the element count of every array in a jaxpr, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    for var in [*eqn.invars, *eqn.outvars]:
      if hasattr(var.aval, "shape"):
        yield int(np.prod(var.aval.shape))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr.
        if hasattr(sub, "eqns"):
          yield from array_sizes(sub)
