"""Attention mixer, RoPE and the attention implementations."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from helpers import forward, normal, rel
from sessa_jax.models import AttentionMixer, ModelConfig, attention, rope


def _cfg(**kw):
  base = dict(mixer="attention", d_model=16, n_heads=4, n_kv_heads=2)
  base.update(kw)
  return ModelConfig(**base)


def test_rope_rotates_interleaved_pairs():
  x = normal(0, (1, 5, 2, 8))
  ang = rope.angles(jnp.arange(5), 8)
  got = np.asarray(rope.apply(x, ang))
  z = np.asarray(x[..., 0::2]) + 1j * np.asarray(x[..., 1::2])
  want = z * np.exp(1j * np.asarray(ang))[None, :, None, :]
  np.testing.assert_allclose(got[..., 0::2], want.real, atol=1e-5)
  np.testing.assert_allclose(got[..., 1::2], want.imag, atol=1e-5)
  np.testing.assert_allclose(rope.inv_frequencies(8),
                             10000.0 ** (-np.arange(4) / 4), rtol=1e-6)


def test_rope_scores_depend_on_relative_position():
  q, k = normal(1, (2, 1, 1, 1, 8))
  score = lambda m, n: float(jnp.sum(
      rope.apply(q, rope.angles(jnp.array([m]), 8))
      * rope.apply(k, rope.angles(jnp.array([n]), 8))))
  np.testing.assert_allclose(score(7, 3), score(4, 0), rtol=1e-5)
  assert abs(score(7, 3) - score(7, 2)) > 1e-4


@pytest.mark.parametrize("heads, kv_heads, t",
                         [(4, 4, 6), (4, 2, 7), (4, 1, 1)])
def test_xla_attention_matches_einsum(heads, kv_heads, t):
  q = normal(t, (2, t, heads, 8))
  k = normal(t + 1, (2, t, kv_heads, 8))
  v = normal(t + 2, (2, t, kv_heads, 8))

  @jax.jit
  def run(q, k, v):
    # GQA: query head h reads KV head h // (H / H_kv), i.e. KV heads repeated.
    g = heads // kv_heads
    k_rep, v_rep = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    return (attention.causal_attention(q, k, v, impl="einsum"),
            attention.causal_attention(q, k, v, impl="xla"),
            attention.causal_attention(q, k_rep, v_rep, impl="einsum"))

  want, got, repeated = run(q, k, v)
  assert rel(got, want) < 1e-6
  assert rel(repeated, want) < 1e-6


def test_resolve_impl():
  assert attention.resolve_impl("auto", jnp.float64, 8) == "einsum"
  assert attention.resolve_impl("xla", jnp.float64, 8) == "einsum"
  if jax.default_backend() == "cpu":
    assert attention.resolve_impl("auto", jnp.bfloat16, 64) == "xla"
  assert attention.resolve_impl("auto", jnp.float32, 64) == "xla"
  assert attention.resolve_impl("cudnn", jnp.bfloat16, 64) == "cudnn"


@pytest.mark.parametrize("options", [{}, {"n_heads": 1, "n_kv_heads": None}])
def test_causal_and_decode_matches_forward(options):
  mixer = AttentionMixer(_cfg(**options), rngs=nnx.Rngs(0))
  assert mixer.out_proj is not None  # W_o even with one head
  x = normal(1, (2, 9, 16))
  y = forward(mixer, x)
  y_pert = forward(mixer, x.at[:, 5].add(1.0))
  np.testing.assert_array_equal(y[:, :5], y_pert[:, :5])
  assert np.all(np.abs(np.asarray(y_pert - y)[:, 5]).max(-1) > 1e-3)

  @nnx.jit
  def prefill_decode(mixer, x):
    y, cache = mixer.prefill(x[:, :4], 9)
    outs = [y]
    for t in range(4, 9):
      y_t, cache = mixer.decode_step(x[:, t], cache)
      outs.append(y_t[:, None])
    return jnp.concatenate(outs, axis=1), cache["pos"]

  y_dec, pos = prefill_decode(mixer, x)
  assert int(pos) == 9
  assert rel(y_dec, y) < 1e-5


def test_gradients_match_finite_differences():
  eps = 1e-6
  with jax.enable_x64(True):
    cfg = _cfg(d_model=8, n_heads=2, n_kv_heads=1, dtype="float64",
               param_dtype="float64")
    graphdef, params = nnx.split(AttentionMixer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 8))
    w = rng.standard_normal((2, 5, 8))

    @jax.jit
    def loss(params, x):
      return jnp.sum(nnx.merge(graphdef, params)(x) * w)

    leaves, treedef = jax.tree.flatten((params, jnp.asarray(x)))
    leaves = [np.asarray(leaf) for leaf in leaves]
    direction = [rng.standard_normal(leaf.shape) for leaf in leaves]
    shifted = lambda sign: jax.tree.unflatten(
        treedef, [p + sign * eps * v for p, v in zip(leaves, direction)])
    fd = (loss(*shifted(1.0)) - loss(*shifted(-1.0))) / (2 * eps)
    grads = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    analytic = sum(np.vdot(np.asarray(g), v) for g, v in zip(
        jax.tree.leaves(grads), direction))
  np.testing.assert_allclose(analytic, fd, rtol=1e-7)
