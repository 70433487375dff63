"""The Sessa block against the official layer and an independent NumPy model.

`_reference_layer` below is a float64 NumPy transcription of
docs/design.md#the-sessa-layer written from the spec alone (it does not use
package code): LayerNorm -> W_in -> GELU(a) -> [RoPE multi-head causal
attention (+W_o when H > 1) -> f;
strictly causal single-head feedback softmax, gain, forward substitution ->
s] -> (s * g) W_out + b_out + x.
"""

import numpy as np
import pytest
from scipy import special

import jax
import jax.numpy as jnp
from flax import nnx

from helpers import forward, rel
from sessa_jax.models import interop


def _golden_cases(assets_dir):
  data = np.load(assets_dir / "sessa_official_layer.npz")
  for case in range(3):
    prefix = f"case{case}/"
    state = {key[len(prefix) + len("state/"):]: data[key] for key in data.files
             if key.startswith(prefix + "state/")}
    d, heads, kv_heads, t, b = (int(v) for v in data[prefix + "config"])
    yield case, state, heads, kv_heads, {
        name: data[prefix + name] for name in ("x", "y", "y_decode")}


@nnx.jit
def _decode_all(block, x_btd):
  """Token-by-token decode from an empty cache, (B, T, D) -> (B, T, D)."""

  def step(cache, x_bd):
    y_bd, cache = block.decode_step(x_bd, cache)
    return cache, y_bd

  cache = block.init_cache(x_btd.shape[0], x_btd.shape[1])
  _, y_tbd = jax.lax.scan(step, cache, jnp.swapaxes(x_btd, 0, 1))
  return jnp.swapaxes(y_tbd, 0, 1)


def test_golden_official_layer(assets_dir):
  for case, state, heads, kv_heads, arrays in _golden_cases(assets_dir):
    block = interop.sessa_block_from_torch(state, n_heads=heads,
                                           n_kv_heads=kv_heads)
    assert all(isinstance(v, jax.Array)
               for v in jax.tree.leaves(nnx.state(block, nnx.Param)))
    y = forward(block, jnp.asarray(arrays["x"]))
    assert rel(y, arrays["y"]) < 1e-5, case
    y_decode = _decode_all(block, jnp.asarray(arrays["x"]))
    assert rel(y_decode, arrays["y_decode"]) < 1e-5, case


# --- independent float64 reference -------------------------------------------


def _random_state(rng, d, heads, kv_heads):
  kv = kv_heads * (d // heads)
  shapes = {
      "ln.weight": (d,), "ln.bias": (d,),
      "W_in.weight": (2 * d, d), "W_in.bias": (2 * d,),
      "mixer.q_proj.weight": (d, d), "mixer.q_proj.bias": (d,),
      "mixer.k_proj.weight": (kv, d), "mixer.k_proj.bias": (kv,),
      "mixer.v_proj.weight": (kv, d), "mixer.v_proj.bias": (kv,),
      "mixer.proj_fb.weight": (2 * d, d), "mixer.proj_fb.bias": (2 * d,),
      "mixer.gamma_ctx.weight": (1, d),
      "W_out.weight": (d, d), "W_out.bias": (d,),
  }
  if heads > 1:
    shapes["mixer.out_proj.weight"] = (d, d)
  state = {
      k: (rng.standard_normal(s) * (2.0 / np.sqrt(s[-1]))).astype(np.float32)
      for k, s in shapes.items()}
  state["ln.weight"] += 1.0
  state["mixer.gamma_bias"] = np.float32(rng.uniform(-1.0, 1.5))
  return state


def _reference_layer(state, x, heads, kv_heads, gamma_max=0.999):
  p = {k: np.asarray(v, np.float64) for k, v in state.items()}
  x = np.asarray(x, np.float64)
  b, t, d = x.shape
  hd = d // heads
  lin = lambda u, name: u @ p[name + ".weight"].T + p.get(name + ".bias", 0.0)

  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  h = (x - mu) / np.sqrt(var + 1e-5) * p["ln.weight"] + p["ln.bias"]
  ag = lin(h, "W_in")
  a, g = ag[..., :d], ag[..., d:]
  a = 0.5 * a * (1.0 + special.erf(a / np.sqrt(2.0)))

  def rope(u):  # (B, T, heads, hd), pairs (2i, 2i+1) rotated by pos * freq_i
    freq = 10000.0 ** (-2.0 * np.arange(hd // 2) / hd)
    ang = np.arange(t)[:, None] * freq[None, :]
    c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    out = np.empty_like(u)
    out[..., 0::2] = u[..., 0::2] * c - u[..., 1::2] * s
    out[..., 1::2] = u[..., 0::2] * s + u[..., 1::2] * c
    return out

  q = rope(lin(a, "mixer.q_proj").reshape(b, t, heads, hd))
  k = rope(lin(a, "mixer.k_proj").reshape(b, t, kv_heads, hd))
  v = lin(a, "mixer.v_proj").reshape(b, t, kv_heads, hd)
  f = np.zeros((b, t, heads, hd))
  for head in range(heads):
    kvh = head // (heads // kv_heads)
    for i in range(t):
      logits = np.einsum("bd,bsd->bs", q[:, i, head],
                         k[:, : i + 1, kvh]) / np.sqrt(hd)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      f[:, i, head] = np.einsum("bs,bsd->bd", w, v[:, : i + 1, kvh])
  f = f.reshape(b, t, d)
  if heads > 1:
    f = f @ p["mixer.out_proj.weight"].T

  fb = lin(a, "mixer.proj_fb")
  qb, kb = fb[..., :d], fb[..., d:]
  gamma = gamma_max * np.tanh(p["mixer.gamma_bias"]
                              + a @ p["mixer.gamma_ctx.weight"][0])
  s = np.zeros_like(f)
  for i in range(t):
    s[:, i] = f[:, i]
    if i > 0:
      logits = np.einsum("bd,bsd->bs", qb[:, i], kb[:, :i]) / np.sqrt(d)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      s[:, i] += gamma[:, i, None] * np.einsum("bs,bsd->bd", w, s[:, :i])
  return x + lin(s * g, "W_out")


@pytest.mark.parametrize("d, heads, kv_heads, t", [
    (16, 1, 1, 1), (16, 1, 1, 2), (16, 1, 1, 11),
    (24, 4, 2, 1), (24, 4, 2, 2), (24, 4, 2, 13), (32, 4, 1, 7),
])
def test_matches_independent_numpy_reference(d, heads, kv_heads, t):
  rng = np.random.default_rng(d * 100 + heads * 10 + t)
  state = _random_state(rng, d, heads, kv_heads)
  x = rng.standard_normal((2, t, d)).astype(np.float32)
  want = _reference_layer(state, x, heads, kv_heads)
  block = interop.sessa_block_from_torch(state, n_heads=heads,
                                         n_kv_heads=kv_heads)
  assert rel(forward(block, jnp.asarray(x)), want) < 1e-5
  assert rel(_decode_all(block, jnp.asarray(x)), want) < 1e-5


def test_reference_comparison_detects_layout_errors():
  """Swapping the a/g halves of W_in (a classic porting bug) is caught."""
  rng = np.random.default_rng(1)
  state = _random_state(rng, 16, 2, 2)
  x = rng.standard_normal((2, 6, 16)).astype(np.float32)
  want = _reference_layer(state, x, 2, 2)
  for name in ("W_in.weight", "W_in.bias"):
    state[name] = np.concatenate([state[name][16:], state[name][:16]])
  block = interop.sessa_block_from_torch(state, n_heads=2)
  assert rel(forward(block, jnp.asarray(x)), want) > 1e-2


def test_gamma_max_is_used():
  rng = np.random.default_rng(0)
  state = _random_state(rng, 16, 2, 2)
  x = rng.standard_normal((1, 6, 16)).astype(np.float32)
  want = _reference_layer(state, x, 2, 2, gamma_max=0.5)
  block = interop.sessa_block_from_torch(state, n_heads=2, gamma_max=0.5)
  assert rel(forward(block, jnp.asarray(x)), want) < 1e-5


# --- errors -------------------------------------------------------------


@pytest.fixture
def state():
  """A random two-head state dict of width 16 with two KV heads."""
  return _random_state(np.random.default_rng(0), 16, 2, 2)


def _assert_load_names(state, error, match, **kwargs):
  """Loading `state` with `kwargs` raises `error` whose message has `match`."""
  with pytest.raises(error, match=match):
    interop.sessa_block_from_torch(state, **kwargs)


def test_missing_key_is_named(state):
  del state["mixer.proj_fb.bias"]
  _assert_load_names(state, KeyError, "mixer.proj_fb.bias", n_heads=2)


def test_shape_mismatch_is_named(state):
  # Built for two KV heads but loaded as one: k_proj has the wrong width.
  _assert_load_names(state, ValueError, "mixer.k_proj.weight", n_heads=2,
                     n_kv_heads=1)
  state["W_in.weight"] = state["W_in.weight"].T
  _assert_load_names(state, ValueError, "W_in.weight", n_heads=2)


def test_unexpected_key_is_named(state):
  # A multi-head state dict (it has out_proj) loaded as single-head.
  _assert_load_names(state, ValueError, "mixer.out_proj.weight", n_heads=1)


def test_buffers_are_ignored_but_rope_frequencies_checked(state):
  state["mixer.causal_mask_f_full"] = np.triu(np.ones((4, 4), bool), 1)
  state["mixer.rope_inv_freq"] = 10000.0 ** (-2 * np.arange(4) / 8.0)
  interop.sessa_block_from_torch(state, n_heads=2)
  state["mixer.rope_inv_freq"] = 500.0 ** (-2 * np.arange(4) / 8.0)
  _assert_load_names(state, ValueError, "rope_inv_freq", n_heads=2)


def test_bad_heads_named(state):
  _assert_load_names(state, ValueError, "model.n_heads", n_heads=3)
