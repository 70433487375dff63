"""SessaMixer: causality, decode, options, uniform-routing theory, gradients."""

import numpy as np
import pytest
from scipy import special

import jax
import jax.numpy as jnp
from flax import nnx

from helpers import forward, normal, prefill_then_decode, rel
from sessa_jax import kernels
from sessa_jax.models import MixerBlock, ModelConfig, SessaMixer


def _cfg(**kw):
  base = dict(mixer="sessa", d_model=16, n_heads=2, n_kv_heads=1)
  base.update(kw)
  return ModelConfig(**base)


OPTIONS = [
    {},
    {"n_heads": 1, "n_kv_heads": None},
    {"feedback": False},
    {"gamma_form": "tanh"},
    {"feedback_dim": 8},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: str(o) or "default")
def test_causal_and_decode_matches_forward(options):
  mixer = SessaMixer(_cfg(**options), rngs=nnx.Rngs(0))
  x = normal(1, (2, 9, 16))
  y = forward(mixer, x)
  assert y.shape == x.shape and y.dtype == x.dtype
  tau = 5
  y_pert = forward(mixer, x.at[:, tau].add(1.0))
  np.testing.assert_array_equal(y[:, :tau], y_pert[:, :tau])
  assert np.all(np.abs(np.asarray(y_pert - y)[:, tau]).max(-1) > 1e-3)
  assert rel(prefill_then_decode(mixer, x, 3), y) < 1e-5


def test_options_change_the_function():
  x = normal(1, (2, 9, 16))
  y = {}
  for name, options in [("default", {}), ("no_fb", {"feedback": False}),
                        ("tanh", {"gamma_form": "tanh"})]:
    y[name] = forward(SessaMixer(_cfg(**options), rngs=nnx.Rngs(0)), x)
  # Same seed: the forward branch is identical; only the feedback differs.
  assert rel(y["default"], y["no_fb"]) > 1e-3
  assert rel(y["default"], y["tanh"]) > 1e-3
  np.testing.assert_allclose(y["default"][:, 0], y["no_fb"][:, 0], atol=1e-6)


def test_gain_forms_and_initial_gain():
  mixer = SessaMixer(_cfg(), rngs=nnx.Rngs(0))
  a = normal(2, (2, 5, 16))
  mixer.gamma_ctx[...] = jnp.zeros(16)
  np.testing.assert_allclose(mixer.gain(a), 0.999 * np.tanh(1.0), rtol=1e-6)
  plain = SessaMixer(_cfg(gamma_form="tanh"), rngs=nnx.Rngs(0))
  assert plain.gamma_bias is None
  want = np.tanh(np.asarray(a) @ np.asarray(plain.gamma_ctx[...]))
  np.testing.assert_allclose(plain.gain(a), want, rtol=1e-5, atol=1e-6)


def test_feedback_ablation_has_no_feedback_parameters():
  full = nnx.state(SessaMixer(_cfg(), rngs=nnx.Rngs(0)), nnx.Param)
  ablated = nnx.state(SessaMixer(_cfg(feedback=False), rngs=nnx.Rngs(0)),
                      nnx.Param)
  count = lambda s: sum(v.size for v in jax.tree.leaves(s))
  assert count(full) - count(ablated) == 16 * 32 + 32 + 16 + 1


def _block_params(**kw):
  block = nnx.eval_shape(
      lambda: MixerBlock(ModelConfig(mixer="sessa", **kw), rngs=nnx.Rngs(0)))
  return sum(v.size for v in jax.tree.leaves(nnx.state(block, nnx.Param)))


@pytest.mark.parametrize("d, heads", [(16, 2), (24, 3), (32, 4)])
def test_block_parameter_count(d, heads):
  assert _block_params(d_model=d, n_heads=heads) == 9 * d * d + 11 * d + 1
  # No W_o when H = 1.
  assert _block_params(d_model=d, n_heads=1) == 8 * d * d + 11 * d + 1


# --- uniform-routing theory ---------------------------------------------
#
# With A uniform over the strictly earlier positions (row t, 0-based, averages
# the t entries j < t) and constant gain g, an impulse f = e * delta_{t,tau}
# gives s_t = 0 for t < tau, s_tau = e, and for t > tau, with
# S_t = sum_{j<=t} s_j: s_t = (g / t) S_{t-1}, so S_t = S_{t-1} (t + g) / t and
# S_{t-1} = prod_{u=tau+1}^{t-1} (u + g) / u
#         = Gamma(t + g) Gamma(tau + 1) / (Gamma(tau + 1 + g) Gamma(t)).
# Hence, at t = tau + l (l >= 1),
#   s_{tau+l} = g Gamma(tau+1)/Gamma(tau+1+g) * Gamma(tau+l+g)/Gamma(tau+l+1),
# the paper's formula with 0-based positions; it decays like l^-(1-g).


def _uniform_routing_response(gamma, tau, t):
  lag = np.arange(1, t - tau)
  log = (np.log(gamma) + special.gammaln(tau + 1)
         - special.gammaln(tau + 1 + gamma)
         + special.gammaln(tau + lag + gamma) - special.gammaln(tau + lag + 1))
  return np.concatenate([np.zeros(tau), [1.0], np.exp(log)])


@pytest.mark.parametrize("gamma, tau", [(0.5, 0), (0.9, 3), (0.99, 10)])
def test_uniform_routing_solve_matches_gamma_formula(gamma, tau):
  t = 64
  with jax.enable_x64(True):
    zeros = jnp.zeros((1, t, 4), jnp.float64)
    f = jnp.zeros((1, t, 1), jnp.float64).at[0, tau, 0].set(1.0)
    s = kernels.feedback_solve(zeros, zeros, jnp.full((1, t), gamma), f,
                               impl="dense")
    np.testing.assert_allclose(np.asarray(s)[0, :, 0],
                               _uniform_routing_response(gamma, tau, t),
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("gamma, tau", [(0.8, 0), (0.95, 4)])
def test_uniform_routing_through_the_mixer(gamma, tau):
  """Zeroed forward and feedback q/k weights, constant gain, impulse in f.

  With H = 1, q = k = 0 makes the forward branch a running mean of v; with
  W_v = I and b_v = 0 the input a_tau = (tau+1) e, a_{tau+1} = -(tau+1) e
  makes that running mean exactly the impulse f = e * delta_tau.
  """
  t, d = 40, 8
  with jax.enable_x64(True):
    cfg = _cfg(d_model=d, n_heads=1, n_kv_heads=None, dtype="float64",
               param_dtype="float64")
    mixer = SessaMixer(cfg, rngs=nnx.Rngs(0))
    attn = mixer.attn
    for layer in (attn.q_proj, attn.k_proj, mixer.proj_fb):
      layer.kernel[...] = jnp.zeros_like(layer.kernel[...])
      layer.bias[...] = jnp.zeros_like(layer.bias[...])
    attn.v_proj.kernel[...] = jnp.eye(d)
    attn.v_proj.bias[...] = jnp.zeros(d)
    mixer.gamma_ctx[...] = jnp.zeros(d)
    mixer.gamma_bias[...] = jnp.arctanh(gamma / cfg.gamma_max)
    e = normal(0, (d,), np.float64)
    a = jnp.zeros((1, t, d), jnp.float64)
    a = a.at[0, tau].set((tau + 1) * e).at[0, tau + 1].set(-(tau + 1) * e)
    s = np.asarray(forward(mixer, a))[0]
  want = _uniform_routing_response(gamma, tau, t)[:, None] * np.asarray(e)
  np.testing.assert_allclose(s, want, rtol=1e-9, atol=1e-12)


# --- gradients ----------------------------------------------------------


def _check_grads_fd(module, x, seed=0, eps=1e-6):
  """Directional finite differences of a random projection of y = module(x).

  Assumes y has the shape of x (a mixer).
  """
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(x.shape)

  @jax.jit
  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x) * w)

  leaves, treedef = jax.tree.flatten((params, x))
  leaves = [np.asarray(leaf) for leaf in leaves]
  direction = [rng.standard_normal(leaf.shape) for leaf in leaves]
  shifted = lambda sign: jax.tree.unflatten(
      treedef, [p + sign * eps * v for p, v in zip(leaves, direction)])
  fd = (loss(*shifted(1.0)) - loss(*shifted(-1.0))) / (2 * eps)
  grads = jax.grad(loss, argnums=(0, 1))(params, x)
  analytic = sum(np.vdot(np.asarray(g), v) for g, v in zip(
      jax.tree.leaves(grads), direction))
  np.testing.assert_allclose(analytic, fd, rtol=1e-7)
  # Every input position receives gradient (none silently cut off).
  assert np.all(np.abs(np.asarray(grads[1])).sum(-1) > 0)


@pytest.mark.parametrize("options", [{}, {"gamma_form": "tanh"}])
def test_gradients_match_finite_differences(options):
  with jax.enable_x64(True):
    cfg = _cfg(d_model=8, n_heads=2, dtype="float64", param_dtype="float64",
               **options)
    mixer = SessaMixer(cfg, rngs=nnx.Rngs(0))
    x = normal(3, (2, 5, 8), np.float64)
    _check_grads_fd(mixer, x)


def test_bfloat16_compute():
  cfg = _cfg(dtype="bfloat16")
  mixer = SessaMixer(cfg, rngs=nnx.Rngs(0))
  ref = SessaMixer(_cfg(), rngs=nnx.Rngs(0))
  x = normal(1, (2, 9, 16))
  y = forward(mixer, x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  assert mixer.attn.q_proj.kernel[...].dtype == jnp.float32
  assert rel(y, forward(ref, x)) < 3e-2
