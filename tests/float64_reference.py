"""Checks a module's loss and gradients against a float64 copy of itself."""

import jax
import jax.numpy as jnp
from flax import nnx

from helpers import rel_err


def _value_and_grad(module, x):
  loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
  return nnx.value_and_grad(loss, argnums=(0, 1))(module, x)


def assert_matches_float64(module, make_reference, x, *, rtol=1e-5):
  """Jitted loss sum(sin(module(x))) and its gradients equal a float64 run.

  Args:
    module: the float32 module under test.
    make_reference: builds the float64 module (same structure) when called
      with x64 enabled; its parameters are overwritten by `module`'s.
    x: float32 input.
    rtol: bound on the relative error of the loss, dx and every parameter
      gradient.
  """
  got_loss, (got_params, got_x) = nnx.jit(_value_and_grad)(module, x)
  with jax.enable_x64(True):
    ref = make_reference()
    nnx.update(ref, jax.tree.map(lambda a: a.astype(jnp.float64),
                                 nnx.state(module)))
    want_loss, (want_params, want_x) = nnx.jit(_value_and_grad)(
        ref, x.astype(jnp.float64))
    assert abs(float(got_loss) - float(want_loss)) < rtol * abs(
        float(want_loss))
    assert rel_err(got_x, want_x) < rtol
    for g, w in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
      assert rel_err(g, w) < rtol
