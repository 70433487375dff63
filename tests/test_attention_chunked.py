"""The blocked causal attention kernel against the einsum reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from float64_reference import assert_matches_float64
from helpers import rel_err, value_and_grads
from jaxpr_sizes import array_sizes
from sessa_jax.kernels import attention_chunked
from sessa_jax.models import (AttentionMixer, ModelConfig, SessaMixer,
                              attention)


def _inputs(seed, b, t, heads, kv_heads, d, dtype):
  """Fresh q, k, v and an output cotangent."""
  rng = np.random.default_rng(seed)
  shapes = [(b, t, heads, d), (b, t, kv_heads, d), (b, t, kv_heads, d),
            (b, t, heads, d)]
  return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def _reference(q, k, v):
  t = q.shape[1]
  return attention.reference_attention(q, k, v,
                                       jnp.tril(jnp.ones((t, t), bool)))


def _chunked(chunk):
  return lambda q, k, v: attention_chunked.causal_attention_chunked(
      q, k, v, chunk=chunk)


@pytest.mark.parametrize("t,heads,kv_heads,chunk", [
    (1, 2, 1, 4),  # A single position: the output is v.
    (5, 4, 2, 8),  # Shorter than one chunk.
    (24, 4, 4, 8),  # A multiple of the chunk, no grouping.
    (29, 4, 2, 8),  # Ragged last chunk, GQA.
    (19, 6, 2, 5),  # Three query heads per KV head.
])
def test_matches_reference_float64(t, heads, kv_heads, chunk):
  with jax.enable_x64(True):
    args = _inputs(t, 2, t, heads, kv_heads, 4, jnp.float64)
    got = value_and_grads(_chunked(chunk), *args)
    want = value_and_grads(_reference, *args)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
      assert x.dtype == jnp.float64, name
      assert x.shape == y.shape, name
      assert rel_err(x, y, floor=1e-3) < 1e-10, name


def test_float32_matches_float64_reference():
  args = _inputs(3, 2, 45, 4, 2, 8, jnp.float32)
  got = value_and_grads(_chunked(16), *args)
  with jax.enable_x64(True):
    want = value_and_grads(_reference, *[a.astype(jnp.float64) for a in args])
  for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
    assert x.dtype == jnp.float32, name
    assert rel_err(x, y, floor=1e-3) < 1e-5, name


def test_causal_and_bfloat16_in_bfloat16_out():
  q, k, v, _ = _inputs(4, 1, 23, 2, 1, 4, jnp.float32)
  late = jnp.arange(23)[None, :, None, None] > 9
  fn = jax.jit(_chunked(4))
  base = fn(q, k, v)
  moved = fn(jnp.where(late, 5.0, q), jnp.where(late, -3.0, k),
             jnp.where(late, 7.0, v))
  np.testing.assert_array_equal(base[:, :10], moved[:, :10])
  assert np.max(np.abs(base[:, 10:] - moved[:, 10:])) > 1e-2
  half = fn(*[a.astype(jnp.bfloat16) for a in (q, k, v)])
  assert half.dtype == jnp.bfloat16
  assert rel_err(half, base, floor=1e-3) < 2e-2


def test_no_time_by_time_array():
  t = 1024
  q = jax.ShapeDtypeStruct((1, t, 2, 8), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, t, 1, 8), jnp.float32)

  def largest(fn):
    grad = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))
    return max(array_sizes(jax.make_jaxpr(grad)(q, kv, kv).jaxpr))

  assert largest(_chunked(64)) <= 16 * t  # (T, H d) arrays, never (T, T).
  assert largest(_reference) >= t * t  # The check can fail.


def test_sharded_batch_and_heads_equal_unsharded():
  args = _inputs(5, 8, 21, 4, 2, 4, jnp.float32)
  want = value_and_grads(_chunked(8), *args)
  mesh = jax.make_mesh((4, 2), ("data", "tensor"))
  spec = NamedSharding(mesh, P("data", None, "tensor"))
  got = value_and_grads(_chunked(8), *[jax.device_put(a, spec) for a in args])
  for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
    assert x.sharding.spec[:3] == ("data", None, "tensor"), name
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name)


def test_resolve_impl_and_errors():
  resolve = attention.resolve_impl
  assert resolve("auto", jnp.float32, 64, 512) == "chunked"
  assert resolve("auto", jnp.float32, 64, attention.CHUNKED_MIN_LEN) == "xla"
  assert resolve("chunked", jnp.float64, 64, 512) == "einsum"
  assert resolve("chunked", jnp.float32, 64, 8) == "chunked"
  with pytest.raises(ValueError, match="model.attention_impl.*chunked"):
    ModelConfig(attention_impl="flash")
  q, k, v, _ = _inputs(0, 1, 4, 4, 2, 4, jnp.float32)
  with pytest.raises(ValueError, match="chunk"):
    attention_chunked.causal_attention_chunked(q, k, v, chunk=0)
  with pytest.raises(ValueError, match="H_kv dividing H"):
    attention_chunked.causal_attention_chunked(q, q[:, :, :3], q[:, :, :3])


@pytest.mark.parametrize("mixer", [AttentionMixer, SessaMixer])
def test_mixer_with_chunked_matches_float64_einsum(mixer, monkeypatch):
  monkeypatch.setattr(attention_chunked, "DEFAULT_CHUNK", 8)
  cfg = ModelConfig(d_model=16, n_heads=4, n_kv_heads=2,
                    attention_impl="chunked", feedback_chunk=8)
  block = mixer(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 21, 16), jnp.float32)

  assert_matches_float64(
      block, lambda: mixer(cfg.replace(dtype="float64", param_dtype="float64"),
                           rngs=nnx.Rngs(0)), x)
