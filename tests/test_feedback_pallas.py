"""Pallas feedback kernels (interpret mode on CPU) against the dense oracle.

Interpret mode is slow, so shapes are tiny and each case compiles once: one
jitted value-and-VJP per implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.kernels import feedback, feedback_pallas, feedback_ref


def _inputs(seed, b, t, k, d, dtype):
  """Fresh inputs; batch rows 1 and 2 hold gains near -0.999 and +0.999."""
  rng = np.random.default_rng(seed)
  gamma = rng.uniform(-0.999, 0.999, size=(b, t))
  if b >= 3:
    gamma[1] = rng.uniform(-0.999, -0.99, size=t)
    gamma[2] = rng.uniform(0.99, 0.999, size=t)
  arrays = (rng.normal(size=(b, t, k)), rng.normal(size=(b, t, k)), gamma,
            rng.normal(size=(b, t, d)), rng.normal(size=(b, t, d)))
  return [jnp.asarray(x, dtype) for x in arrays]


def _value_and_grads(solve, q, k, gamma, f, cot):
  def run(q, k, gamma, f, cot):
    s, vjp = jax.vjp(solve, q, k, gamma, f)
    return [s, *vjp(cot)]

  return jax.jit(run)(q, k, gamma, f, cot)


NAMES = ("s", "dq", "dk", "dgamma", "df")


# The TPU interpreter's host callbacks do not see `jax.enable_x64`, and TPUs
# have no float64: the TPU kernels are checked in float32 below.
@pytest.mark.parametrize("backend,t", [
    ("gpu", 29),  # Four chunks, the last one ragged.
    ("gpu", 1),  # A single row.
])
def test_pallas_matches_dense_float64(backend, t):
  with jax.enable_x64(True):
    args = _inputs(t, 3, t, 8, 4, jnp.float64)
    solve = lambda *a: feedback_pallas.feedback_solve_pallas(
        *a, chunk=8, backend=backend)
    got = _value_and_grads(solve, *args)
    want = _value_and_grads(feedback_ref.feedback_solve_dense, *args)
  for name, x, y in zip(NAMES, got, want):
    assert x.dtype == jnp.float64, name
    np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-10, err_msg=name)


def test_tpu_kernels_float32_through_the_public_op():
  assert feedback_pallas._default_backend() == "tpu"  # On CPU: TPU interpret.
  args = _inputs(5, 3, 37, 16, 8, jnp.float32)
  got = _value_and_grads(
      lambda *a: feedback.feedback_solve(*a, impl="pallas", chunk=16), *args)
  with jax.enable_x64(True):
    want = _value_and_grads(feedback_ref.feedback_solve_dense,
                            *[a.astype(jnp.float64) for a in args])
  for name, x, y in zip(NAMES, got, want):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.dtype == np.float64 and got[0].dtype == jnp.float32
    assert np.max(np.abs(x - y)) <= 1e-5 * np.max(np.abs(y)), name


def test_pallas_rejects_illegal_tiles():
  args = _inputs(0, 1, 8, 4, 4, jnp.float32)[:4]
  with pytest.raises(ValueError, match="multiple of 8"):
    feedback_pallas.feedback_solve_pallas(*args, chunk=12, backend="tpu")
  with pytest.raises(ValueError, match="power of two"):
    feedback_pallas.feedback_solve_pallas(*args, chunk=24, backend="gpu")
  with pytest.raises(ValueError, match="tpu, gpu"):
    feedback_pallas.feedback_solve_pallas(*args, backend="cuda")


@pytest.mark.parametrize("width,dtype,chunk", [
    (256, jnp.bfloat16, 64),  # Both checked on an H200 (gpu_check.json).
    (256, jnp.float32, 32),
    (200, jnp.float32, 32),  # Padded to 256 in the kernels.
    (512, jnp.float32, 16),
    (1024, jnp.float32, 16),  # Never below 16.
    (32, jnp.float32, 64),
])
def test_gpu_default_chunk_fits_the_tile_budget(width, dtype, chunk):
  assert feedback_pallas.default_chunk("gpu", width, jnp.dtype(dtype)) == chunk
  assert feedback_pallas.default_chunk("tpu", width, jnp.dtype(dtype)) == (
      feedback_pallas.TPU_CHUNK)
