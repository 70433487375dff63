"""The chunked SSD scan against its sequential oracle."""

import functools

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.kernels import ssd


def _inputs(seed, b=2, t=11, h=3, p=4, n=5, dtype=jnp.float64):
  """Fresh random (x, log_a, B, C, initial state)."""
  rng = np.random.default_rng(seed)
  arrays = (rng.normal(size=(b, t, h, p)), -rng.uniform(0.01, 1.5, (b, t, h)),
            rng.normal(size=(b, t, n)), rng.normal(size=(b, t, n)),
            rng.normal(size=(b, h, p, n)))
  return tuple(jnp.asarray(a, dtype) for a in arrays)


def _naive(x, log_a, bm, cm, s0):
  """Float64 NumPy loop of S_t = a_t S_{t-1} + x_t B_t^T, y_t = S_t C_t."""
  x, log_a, bm, cm, s = map(np.asarray, (x, log_a, bm, cm, s0))
  y = np.zeros_like(x)
  for t in range(x.shape[1]):
    s = (np.exp(log_a[:, t])[..., None, None] * s
         + x[:, t, :, :, None] * bm[:, t, None, None, :])
    y[:, t] = np.einsum("bhpn,bn->bhp", s, cm[:, t])
  return y, s


_sequential = jax.jit(ssd.ssd_sequential)


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def test_sequential_matches_numpy():
  x, log_a, bm, cm, s0 = _inputs(0)
  y, s = _sequential(x, log_a, bm, cm, initial_state=s0)
  y_ref, s_ref = _naive(x, log_a, bm, cm, s0)
  np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(s, s_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("state_passing", ["scan", "matmul"])
@pytest.mark.parametrize("t,chunk", [(1, 4), (7, 4), (12, 4), (13, 4), (5, 8),
                                     (6, 1)])
def test_chunked_matches_sequential(t, chunk, state_passing):
  x, log_a, bm, cm, s0 = _inputs(t * 10 + chunk, t=t)
  chunked = jax.jit(functools.partial(ssd.ssd_chunked, chunk=chunk,
                                      state_passing=state_passing))
  for init in (None, s0):
    y_ref, s_ref = _sequential(x, log_a, bm, cm, initial_state=init)
    y, s = chunked(x, log_a, bm, cm, initial_state=init)
    assert y.dtype == jnp.float64 and y.shape == x.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(s, s_ref, rtol=1e-11, atol=1e-11)


def test_chunked_gradients_match_sequential():
  x, log_a, bm, cm, s0 = _inputs(3, t=10)
  rng = np.random.default_rng(4)
  w, ws = rng.normal(size=x.shape), rng.normal(size=s0.shape)

  def loss(fn, *args):
    y, s = fn(*args[:4], initial_state=args[4])
    return jnp.sum(y * w) + jnp.sum(s * ws)

  args = (x, log_a, bm, cm, s0)
  chunked = lambda *a, **k: ssd.ssd_chunked(*a, chunk=4, **k)
  g = jax.jit(jax.grad(lambda *a: loss(chunked, *a), argnums=range(5)))(*args)
  g_ref = jax.jit(jax.grad(lambda *a: loss(ssd.ssd_sequential, *a),
                           argnums=range(5)))(*args)
  for gi, gi_ref in zip(g, g_ref):
    np.testing.assert_allclose(gi, gi_ref, rtol=1e-10, atol=1e-10)


def test_chunked_gradients_match_finite_differences():
  args = _inputs(6, b=1, t=6, h=2, p=2, n=3)

  @jax.jit
  def f(*a):
    y, s = ssd.ssd_chunked(*a[:4], chunk=4, initial_state=a[4])
    return jnp.sum(jnp.sin(y)) + jnp.sum(s)

  jtu.check_grads(f, args, order=1, modes=["rev"], eps=1e-6, atol=1e-7,
                  rtol=1e-7)


def test_float32_accumulates_in_float32():
  x, log_a, bm, cm, _ = (v.astype(jnp.float32) for v in
                         _inputs(7, t=33))
  chunked = jax.jit(functools.partial(ssd.ssd_chunked, chunk=8))
  y, s = chunked(x.astype(jnp.bfloat16), log_a, bm, cm)
  assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  y32, _ = chunked(x, log_a, bm, cm)
  y_ref, _ = _sequential(x, log_a, bm, cm)
  np.testing.assert_allclose(y32, y_ref, rtol=1e-4, atol=1e-4)


def test_bad_arguments():
  x, log_a, bm, cm, _ = _inputs(8)
  with pytest.raises(ValueError, match="impl='fast' is not one of"):
    ssd.ssd(x, log_a, bm, cm, impl="fast")
  with pytest.raises(ValueError, match="state_passing"):
    ssd.ssd_chunked(x, log_a, bm, cm, state_passing="tree")
