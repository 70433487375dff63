"""Known-answer tests for the memory-influence tools."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.analysis import influence
from sessa_jax.kernels import feedback_solve

T_LONG = 1040
WINDOW = (100, 1000)


def _uniform_feedback(gamma: float):
  """x -> s with s_t = x_t + gamma * mean_{j<t} s_j (zero q/k: uniform A)."""

  def fn(x_btd):
    b, t, _ = x_btd.shape
    zeros = jnp.zeros((b, t, 4), x_btd.dtype)
    # The dense solve has a forward-mode rule: one JVP per source channel.
    return feedback_solve(zeros, zeros, jnp.full((b, t), gamma), x_btd,
                          impl="dense")

  return fn


def _uniform_attention(w_dd: jax.Array):
  """Causal attention with zero logits: y_t = mean_{j<=t} x_j W."""

  def fn(x_btd):
    t = x_btd.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal, 0.0, -jnp.inf), axis=-1)
    return jnp.einsum("ts,bsd,de->bte", weights, x_btd, w_dd)

  return fn


@pytest.mark.parametrize("gamma", [0.4, 0.8])
def test_uniform_feedback_slope_is_gamma_minus_one(gamma):
  x = jax.random.normal(jax.random.key(0), (1, T_LONG, 2))
  curve = influence.influence_vs_lag(_uniform_feedback(gamma), x,
                                     window=WINDOW)
  assert curve.slope == pytest.approx(-(1.0 - gamma), abs=0.05)


def test_uniform_attention_slope_is_minus_one():
  x = jax.random.normal(jax.random.key(1), (2, T_LONG, 3))
  w = jax.random.normal(jax.random.key(2), (3, 3))
  curve = influence.influence_vs_lag(_uniform_attention(w), x, window=WINDOW)
  assert curve.slope == pytest.approx(-1.0, abs=0.05)
  # Exact value: ||W||_F / (tau + l + 1), averaged over the four sources.
  expected = np.mean([np.linalg.norm(w) / (tau + curve.lags + 1)
                      for tau in range(4)], axis=0)
  np.testing.assert_allclose(curve.influence, expected, rtol=1e-4)


def test_impulse_response_and_bound_on_uniform_routing():
  gamma = 0.7
  zeros = jnp.zeros((2, T_LONG, 8))
  gammas = jnp.full((2, T_LONG), gamma)
  curve, check = influence.bound_check(zeros, zeros, gammas, gamma_max=gamma,
                                       window=WINDOW)
  assert curve.slope == pytest.approx(-(1.0 - gamma), abs=0.05)
  assert check.c2 == pytest.approx(1.0, abs=1e-4)
  assert check.paper_exponent == pytest.approx(1.0 - gamma, abs=1e-4)
  assert check.fitted_exponent == pytest.approx(check.paper_exponent, abs=0.05)
  # The impulse response is the Jacobian of the solve (up to the channel norm).
  jac = influence.influence_vs_lag(_uniform_feedback(gamma), zeros[:1, :, :1],
                                   window=WINDOW)
  np.testing.assert_allclose(curve.influence, jac.influence, rtol=1e-4)


def test_exponential_recurrence_is_exact():
  decay = 0.9

  def fn(x_btd):
    def step(h, x):
      h = decay * h + x
      return h, h
    _, ys = jax.lax.scan(step, jnp.zeros_like(x_btd[:, 0]),
                         x_btd.transpose(1, 0, 2))
    return ys.transpose(1, 0, 2)

  x = jnp.ones((1, 64, 3))
  curve = influence.influence_vs_lag(fn, x, lags=[1, 5, 20, 50])
  np.testing.assert_allclose(curve.influence,
                             np.sqrt(3) * decay ** np.array([1, 5, 20, 50]),
                             rtol=1e-5)


def _random_causal_fn(key):
  """A small nonlinear causal map with mixing across positions and channels."""
  k1, k2 = jax.random.split(key)
  w1 = jax.random.normal(k1, (3, 4))
  w2 = jax.random.normal(k2, (4, 2))

  def fn(x_btd):
    t = x_btd.shape[1]
    h = jnp.tanh(x_btd @ w1)
    logits = jnp.einsum("bsh,bth->bts", h, h)
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
    return jnp.einsum("bts,bsh->bth", jax.nn.softmax(logits, -1), h) @ w2

  return fn


def _brute_force(fn, x, sources, lags):
  jac = jax.jacfwd(fn)(x)  # (B, T, Dout, B, T, Din)
  out = []
  for lag in lags:
    norms = [np.linalg.norm(jac[b, tau + lag, :, b, tau, :])
             for b in range(x.shape[0]) for tau in sources]
    out.append(np.mean(norms))
  return np.array(out)


@pytest.mark.parametrize("mode", ["forward", "reverse", "auto"])
def test_modes_match_full_jacobian(mode):
  fn = _random_causal_fn(jax.random.key(3))
  x = jax.random.normal(jax.random.key(4), (2, 12, 3))
  sources, lags = [0, 2, 3], [1, 2, 4, 8]
  curve = influence.influence_vs_lag(fn, x, sources=sources, lags=lags,
                                     mode=mode, chunk=5)
  np.testing.assert_allclose(curve.influence,
                             _brute_force(fn, x, sources, lags), rtol=1e-4)


def test_auto_mode_falls_back_to_reverse_for_custom_vjp():
  base = _random_causal_fn(jax.random.key(5))
  fn = jax.custom_vjp(base)
  fn.defvjp(lambda x: jax.vjp(base, x), lambda pull, g: pull(g))
  x = jax.random.normal(jax.random.key(6), (1, 10, 3))
  with pytest.raises(TypeError):
    influence.influence_vs_lag(fn, x, lags=[1, 3], mode="forward")
  curve = influence.influence_vs_lag(fn, x, lags=[1, 3])
  np.testing.assert_allclose(curve.influence,
                             _brute_force(base, x, range(4), [1, 3]),
                             rtol=1e-4)


def test_fit_and_grid_validation():
  lags = influence.log_lags(1000, num=20)
  assert lags[0] == 1 and lags[-1] == 1000 and np.all(np.diff(lags) > 0)
  slope, _ = influence.fit_loglog_slope(lags, 3.0 * lags ** -0.25, (1, 1000))
  assert slope == pytest.approx(-0.25)
  with pytest.raises(ValueError, match="lags must lie in"):
    influence.influence_vs_lag(lambda x: x, jnp.ones((1, 8, 2)), lags=[10])
  with pytest.raises(ValueError, match="mode="):
    influence.influence_vs_lag(lambda x: x, jnp.ones((1, 8, 2)), mode="jvp")


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_gaussian_probes_estimate_the_norm(mode):
  fn = _random_causal_fn(jax.random.key(7))
  x = jax.random.normal(jax.random.key(8), (4, 12, 3))
  sources, lags = [0, 1, 2, 3], [1, 4, 8]
  curve = influence.influence_vs_lag(fn, x, sources=sources, lags=lags,
                                     mode=mode, probes=64, chunk=64)
  np.testing.assert_allclose(curve.influence,
                             _brute_force(fn, x, sources, lags), rtol=0.15)


def test_bound_check_reports_negative_gains():
  zeros = jnp.zeros((1, 64, 4))
  gammas = jnp.where(jnp.arange(64) % 2 == 0, 0.5, -0.5)[None]
  _, check = influence.bound_check(zeros, zeros, gammas, gamma_max=0.9,
                                   window=(4, 40))
  assert check.gamma_min == pytest.approx(-0.5)
  assert 0.4 < check.negative_gain_fraction < 0.6
  assert np.isnan(check.floor_exponent)
