"""Mamba2Mixer: float64 NumPy reference, causality, decode, init, gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import test_util as jtu

from helpers import forward
from sessa_jax.models import build_model
from sessa_jax.models.config import ModelConfig
from sessa_jax.models.mamba2 import Mamba2Mixer

TINY = dict(mixer="mamba2", d_model=8, ssm_expand=2, ssm_head_dim=4,
            ssm_state=3, ssm_conv=4, ssm_chunk=4, vocab_size=11, n_layers=2)


def _mixer(use_gate, seed=0, **overrides):
  cfg = ModelConfig(**{**TINY, **overrides})
  return Mamba2Mixer(cfg, rngs=nnx.Rngs(seed), use_gate=use_gate)


def _x(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


@functools.partial(nnx.jit, static_argnums=2)
def _prefill(m, x, max_len):
  return m.prefill(x, max_len)


@nnx.jit
def _decode(m, x, cache):
  return m.decode_step(x, cache)


def _numpy_mixer(m: Mamba2Mixer, x_btd: np.ndarray) -> np.ndarray:
  """Float64 loop over time of the Mamba-2 equations (module docstring)."""
  f64 = lambda v: np.asarray(v[...], np.float64)
  cfg = m.cfg
  n, p, k = cfg.ssm_state, cfg.ssm_head_dim, cfg.ssm_conv
  b, t, _ = x_btd.shape
  silu = lambda v: v / (1 + np.exp(-v))

  def conv(u, w, bias):
    u = np.concatenate([np.zeros((b, k - 1, u.shape[-1])), u], axis=1)
    return silu(sum(u[:, i:i + t] * w[i] for i in range(k)) + bias)

  xc = conv(x_btd @ f64(m.x_proj.kernel), f64(m.conv_x), f64(m.conv_x_bias))
  bc = conv(x_btd @ f64(m.bc_proj.kernel), f64(m.conv_bc),
            f64(m.conv_bc_bias))
  dt = np.log1p(np.exp(x_btd @ f64(m.dt_proj.kernel) + f64(m.dt_bias)))
  a = np.exp(-dt * np.exp(f64(m.a_log)))
  xh = xc.reshape(b, t, -1, p)
  s = np.zeros((b, xh.shape[2], p, n))
  y = np.zeros_like(xh)
  for i in range(t):
    s = (a[:, i, :, None, None] * s + (dt[:, i, :, None] * xh[:, i])[..., None]
         * bc[:, i, None, None, :n])
    y[:, i] = (np.einsum("bhpn,bn->bhp", s, bc[:, i, n:])
               + f64(m.d_skip)[:, None] * xh[:, i])
  y = y.reshape(b, t, -1)
  if m.use_gate:
    y = y * silu(x_btd @ f64(m.z_proj.kernel))
  y = y / np.sqrt(np.mean(y**2, axis=-1, keepdims=True) + 1e-5)
  return (y * f64(m.norm_scale)) @ f64(m.out_proj.kernel)


@pytest.mark.parametrize("use_gate", [True, False])
def test_matches_float64_numpy_reference(use_gate):
  # float32 parameters, float64 compute: the reference sees the same values.
  m = _mixer(use_gate, dtype="float64")
  with jax.enable_x64(True):
    for t in (3, 10):  # T < chunk and T not a multiple of the chunk
      x = np.random.default_rng(t).normal(size=(2, t, 8))
      y = forward(m, jnp.asarray(x))
      assert y.dtype == jnp.float64
      np.testing.assert_allclose(y, _numpy_mixer(m, x), rtol=1e-10,
                                 atol=1e-10)


def test_chunk_size_does_not_change_outputs():
  m4 = _mixer(True, ssm_chunk=4)
  m64 = _mixer(True, ssm_chunk=64)
  x = _x((2, 13, 8))
  np.testing.assert_allclose(forward(m4, x), forward(m64, x), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("use_gate", [True, False])
def test_causal(use_gate):
  m = _mixer(use_gate)
  x = _x((2, 11, 8))
  y = forward(m, x)
  for t0 in (0, 5, 10):
    y2 = forward(m, x.at[:, t0].add(1.0))
    np.testing.assert_allclose(y2[:, :t0], y[:, :t0], rtol=0, atol=1e-6)
    assert np.max(np.abs(y2[:, t0:] - y[:, t0:])) > 1e-3


@pytest.mark.parametrize("use_gate", [True, False])
def test_prefill_then_decode_matches_forward(use_gate):
  m = _mixer(use_gate)
  t = 11
  x = _x((2, t, 8), seed=1)
  y = forward(m, x)
  for prompt in (1, 6):
    y_p, cache = _prefill(m, x[:, :prompt], t)
    outs = [y_p]
    for i in range(prompt, t):
      y_i, cache = _decode(m, x[:, i], cache)
      outs.append(y_i[:, None])
    assert int(cache["pos"]) == t
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y, rtol=1e-5,
                               atol=1e-5)


def test_decode_from_empty_cache_matches_forward():
  m = _mixer(True, ssm_conv=1)  # also covers a conv of width 1
  x = _x((1, 5, 8), seed=2)
  cache = m.init_cache(1, 5)
  outs = []
  for i in range(5):
    y_i, cache = _decode(m, x[:, i], cache)
    outs.append(y_i)
  np.testing.assert_allclose(jnp.stack(outs, 1), forward(m, x), rtol=1e-5,
                             atol=1e-5)


def test_init_ranges():
  m = _mixer(True, d_model=256, ssm_head_dim=2)  # 256 heads
  a = np.exp(np.asarray(m.a_log[...]))
  dt = np.asarray(jax.nn.softplus(m.dt_bias[...]))
  assert 1.0 <= a.min() and a.max() <= 16.0 and a.max() - a.min() > 10
  assert 1e-3 * (1 - 1e-5) <= dt.min() and dt.max() <= 1e-1 * (1 + 1e-5)
  log_dt = np.log(dt)  # log-uniform: log dt spreads over the whole range
  assert log_dt.min() < np.log(2e-3) and log_dt.max() > np.log(5e-2)
  decay = np.exp(-dt * a)  # per-step decay at zero input
  assert np.exp(-1.6) <= decay.min() and decay.max() <= np.exp(-1e-3)
  np.testing.assert_array_equal(m.d_skip[...], 1.0)
  np.testing.assert_array_equal(m.norm_scale[...], 1.0)
  bound = 256 ** -0.5
  assert np.abs(np.asarray(m.x_proj.kernel[...])).max() <= bound


def test_parameters_carry_logical_axes():
  m = _mixer(True)
  allowed = {"embed", "hidden", "heads", "vocab", None}
  for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == var[...].ndim, path
    assert set(axes) <= allowed, path
  # Per-head vectors split over 'tensor' with the heads of the inner width.
  assert m.a_log.get_metadata()["out_sharding"] == ("heads",)
  assert m.dt_proj.kernel.get_metadata()["out_sharding"] == ("embed", "heads")


def test_gradients_match_finite_differences():
  m = _mixer(True, d_model=4, ssm_head_dim=4, ssm_state=2, ssm_conv=2,
             ssm_chunk=2, dtype="float64")
  graphdef, params = nnx.split(m)
  w = np.random.default_rng(3).normal(size=(1, 5, 4))

  @jax.jit
  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params)(x) * w)

  with jax.enable_x64(True):
    params = jax.tree.map(lambda v: v.astype(jnp.float64), params)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 5, 4)))
    jtu.check_grads(loss, (params, x), order=1, modes=["rev"], eps=1e-6,
                    atol=1e-6, rtol=1e-6)


def test_bad_head_dim_names_the_key():
  with pytest.raises(ValueError, match="model.ssm_head_dim"):
    ModelConfig(**{**TINY, "ssm_head_dim": 5})


@pytest.mark.parametrize("block", ["gated", "prenorm_mlp"])
def test_language_model_decode_matches_forward(block):
  cfg = ModelConfig(**{**TINY, "block": block})
  model = build_model(cfg, rngs=nnx.Rngs(0))
  assert model.blocks[0].mixer.use_gate == (block == "prenorm_mlp")
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 11, (2, 9)))
  logits = nnx.jit(lambda m, t: m(t))(model, tokens)
  prefill = nnx.jit(lambda m, t: m.prefill(t, 9))
  decode = nnx.jit(lambda m, t, c: m.decode_step(t, c))
  out, cache = prefill(model, tokens[:, :4])
  outs = [out]
  for i in range(4, 9):
    out_i, cache = decode(model, tokens[:, i], cache)
    outs.append(out_i[:, None])
  np.testing.assert_allclose(jnp.concatenate(outs, 1), logits, rtol=1e-5,
                             atol=1e-5)
