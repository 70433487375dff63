"""Small helpers the tests share: test data, jitted calls, error measures."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def normal(seed, shape, dtype=np.float32):
  """Fresh standard-normal test data (NumPy: no per-shape compilation)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def rel(a, b):
  """Relative error ||a - b|| / ||b|| in float64 (Frobenius norms)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def rel_err(x, ref, floor=1e-30):
  """Largest absolute error over the largest |ref| (at least `floor`)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), floor)


@nnx.jit
def forward(module, x):
  """module(x), jitted."""
  return module(x)


def value_and_grads(fn, *args):
  """fn(*args[:-1]) and the gradients of sum(out * args[-1]) (jitted).

  Args:
    fn: the function under test.
    *args: its inputs, then the cotangent of its output.

  Returns:
    A list: the output, then one gradient per input.
  """

  def run(*args):
    out, vjp = jax.vjp(fn, *args[:-1])
    return [out, *vjp(args[-1])]

  return jax.jit(run)(*args)


def prefill_then_decode(module, x, prompt_len, *, step_shape=None,
                        max_len=None):
  """Prefills `prompt_len` steps of x (B, T, ...), decodes the rest.

  The cache holds `max_len` positions (default T); `step_shape` reshapes each
  decoded step's input.
  """

  @nnx.jit
  def run(module, x):
    y, cache = module.prefill(x[:, :prompt_len], max_len or x.shape[1])

    def step(cache, x_t):
      if step_shape is not None:
        x_t = x_t.reshape(step_shape)
      y_t, cache = module.decode_step(x_t, cache)
      return cache, y_t.reshape(y.shape[:1] + y.shape[2:])

    _, y_rest = jax.lax.scan(step, cache,
                             jnp.swapaxes(x[:, prompt_len:], 0, 1))
    return jnp.concatenate([y, jnp.swapaxes(y_rest, 0, 1)], axis=1)

  return run(module, x)
