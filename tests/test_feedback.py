"""The blocked feedback solve and the public op against the dense oracle."""

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from float64_reference import assert_matches_float64
from helpers import rel_err
from helpers import value_and_grads
from jaxpr_sizes import array_sizes
from sessa_jax import kernels
from sessa_jax.kernels.feedback import chunked as feedback_chunked
from sessa_jax.kernels.feedback import op as feedback
from sessa_jax.kernels.feedback import reference as feedback_ref


def _inputs(seed, b, t, k, d, dtype):
  """Fresh inputs; batch rows 1 and 2 hold gains near -0.999 and +0.999."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, k))
  kk = rng.normal(size=(b, t, k))
  gamma = rng.uniform(-0.999, 0.999, size=(b, t))
  gamma[1:2] = rng.uniform(-0.999, -0.99, size=(1, t))
  gamma[2:3] = rng.uniform(0.99, 0.999, size=(1, t))
  f = rng.normal(size=(b, t, d))
  cot = rng.normal(size=(b, t, d))
  return [jnp.asarray(x, dtype) for x in (q, kk, gamma, f, cot)]


def _dense(*args):
  return feedback_ref.feedback_solve_dense(*args)


def _numpy_solve(q, k, gamma, f):
  """s of the feedback solve by numpy in float64: softmax rows, then solve."""
  q, k, gamma, f = (np.asarray(x, np.float64) for x in (q, k, gamma, f))
  t = q.shape[1]
  logits = np.einsum("btk,bsk->bts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(np.tril(np.ones((t, t), bool), -1), logits, -np.inf)
  a = np.exp(logits - logits.max(-1, keepdims=True, initial=-1e300))
  a = np.nan_to_num(a / np.maximum(a.sum(-1, keepdims=True), 1e-300))
  system = np.eye(t) - gamma[..., None] * a
  return np.linalg.solve(system, f)


@pytest.mark.parametrize("t", [1, 29, 64, 150])  # 150: three row blocks.
def test_dense_matches_numpy_float64(t):
  with jax.enable_x64(True):
    q, k, gamma, f, _ = _inputs(t, 3, t, 6, 5, jnp.float64)
    got = jax.jit(_dense)(q, k, gamma, f)
    np.testing.assert_allclose(got, _numpy_solve(q, k, gamma, f),
                               rtol=1e-10, atol=1e-10)


def test_dense_differentiates_forward_and_reverse_without_lapack():
  # LAPACK's CPU triangular solve waits on XLA's thread pool; two in one
  # program once hung memory-tail runs on a one-device, two-core machine.
  with jax.enable_x64(True):
    q, k, gamma, f, _ = _inputs(5, 2, 70, 4, 3, jnp.float64)
    jax.test_util.check_grads(_dense, (q, k, gamma, f), order=1,
                              modes=("fwd", "rev"))
    jvp_of_vjp = jax.make_jaxpr(
        lambda *a: jax.jvp(lambda *b: jax.vjp(_dense, *b)[1](f), a, a))(
            q, k, gamma, f)
  assert "triangular_solve" not in str(jvp_of_vjp)


@pytest.mark.parametrize("t,chunk", [
    (1, 4),  # A single row: nothing to attend to.
    (5, 8),  # Shorter than one chunk.
    (24, 8),  # A multiple of the chunk.
    (29, 8),  # Ragged last chunk.
])
def test_chunked_matches_dense_float64(t, chunk):
  with jax.enable_x64(True):
    args = _inputs(t, 3, t, 6, 5, jnp.float64)
    solve = lambda *a: feedback_chunked.feedback_solve_chunked(*a, chunk=chunk)
    got = value_and_grads(solve, *args)
    want = value_and_grads(_dense, *args)
    for name, x, y in zip(("s", "dq", "dk", "dgamma", "df"), got, want):
      assert x.dtype == jnp.float64, name
      np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-10, err_msg=name)


def test_chunked_matches_dense_float32():
  t, chunk = 37, 16
  args = _inputs(100, 3, t, 16, 8, jnp.float32)
  solve = lambda *a: feedback_chunked.feedback_solve_chunked(*a, chunk=chunk)
  got = value_and_grads(solve, *args)
  with jax.enable_x64(True):
    want = value_and_grads(_dense, *[a.astype(jnp.float64) for a in args])
  for name, x, y in zip(("s", "dq", "dk", "dgamma", "df"), got, want):
    assert x.dtype == jnp.float32, name
    assert rel_err(x, y) < 1e-5, name


def test_bfloat16_accumulates_in_float32():
  args = _inputs(7, 3, 33, 16, 8, jnp.bfloat16)
  solve = lambda *a: feedback.feedback_solve(*a, impl="chunked", chunk=8)
  got = value_and_grads(solve, *args)
  want = value_and_grads(_dense, *[a.astype(jnp.float32) for a in args])
  for name, x, y in zip(("s", "dq", "dk", "dgamma", "df"), got, want):
    assert x.dtype == jnp.bfloat16, name
    assert rel_err(x, y) < 2e-2, name


def test_chunked_matches_dense_with_custom_scale():
  with jax.enable_x64(True):
    args = _inputs(3, 1, 21, 4, 3, jnp.float64)
    got = kernels.feedback_solve(*args[:4], impl="chunked", chunk=4, scale=0.7)
    want = feedback_ref.feedback_solve_dense(*args[:4], scale=0.7)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_chunked_has_no_time_by_time_array():
  t, chunk = 1024, 64
  x = jax.ShapeDtypeStruct((1, t, 8), jnp.float32)
  g = jax.ShapeDtypeStruct((1, t), jnp.float32)
  solve = lambda *a: feedback_chunked.feedback_solve_chunked(*a, chunk=chunk)
  grad = jax.grad(lambda *a: jnp.sum(solve(*a)), argnums=(0, 1, 2, 3))
  jaxpr = jax.make_jaxpr(grad)(x, x, g, x)

  largest = max(array_sizes(jaxpr.jaxpr))
  assert largest <= 8 * t, largest  # (T, K) arrays, never (T, T).
  dense_jaxpr = jax.make_jaxpr(jax.grad(
      lambda *a: jnp.sum(_dense(*a)), argnums=(0, 1, 2, 3)))(x, x, g, x)
  assert max(array_sizes(dense_jaxpr.jaxpr)) >= t * t  # The check can fail.


def test_auto_is_chunked_on_cpu_and_bad_impl_names_choices():
  assert feedback.resolve_impl("auto") == "chunked"
  with pytest.raises(ValueError, match="dense, chunked"):
    feedback.resolve_impl("flash")
  with pytest.raises(ValueError, match="chunk"):
    feedback_chunked.feedback_solve_chunked(
        *_inputs(0, 1, 4, 2, 2, jnp.float32)[:4], chunk=0)


def test_sharded_over_eight_devices_equals_unsharded():
  mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"),
                       axis_types=(AxisType.Auto,) * 3)
  assert feedback._batch_axes(mesh, 8, ("data", "fsdp")) == ("data", "fsdp")
  args = _inputs(11, 8, 19, 8, 4, jnp.float32)
  want = value_and_grads(
      lambda *a: feedback_chunked.feedback_solve_chunked(*a, chunk=8), *args)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  placed = [jax.device_put(a, batch) for a in args]
  with jax.set_mesh(mesh):
    solve = lambda *b: feedback.feedback_solve(*b, impl="chunked", chunk=8)
    hlo = jax.jit(solve).lower(*placed[:4]).as_text()
    got = value_and_grads(solve, *placed)
  assert "manual_computation" in hlo  # The per-shard region of shard_map.
  for name, x, y in zip(("s", "dq", "dk", "dgamma", "df"), got, want):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=name)
  # A batch that does not divide over the shards runs unsharded.
  assert feedback._batch_axes(mesh, 6, ("data", "fsdp")) == ()


def test_jitted_sessa_block_with_auto_matches_float64_dense():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from sessa_jax.models import MixerBlock, ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(mixer="sessa", d_model=16, n_heads=2, feedback_impl="auto",
                    feedback_chunk=8)
  block = MixerBlock(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 21, 16), jnp.float32)

  assert_matches_float64(
      block, lambda: MixerBlock(cfg.replace(
          feedback_impl="dense", dtype="float64", param_dtype="float64"),
          rngs=nnx.Rngs(0)), x)
