"""Memory influence against lag: Jacobian norms, impulse responses, slopes.

For a causal sequence map `x_btd -> y_btd` the influence of input position tau
on output position tau + l is the Frobenius norm of the Jacobian block
`||d y_{tau+l} / d x_tau||_F`. A fixed set of early source positions tau is
perturbed and every later output watched, so a curve against the lag l is a
curve against absolute position as well (the geometry of the Sessa paper's
memory-tail statements: influence of an old token on ever later outputs).

The curve is averaged over sources and over the batch; batch rows must not
interact (true for every mixer in this package), so one tangent or cotangent
placed in every row at once serves the whole batch.

Two ways to get the Jacobian blocks, picked per cost:
  * forward mode: one JVP per (source, input channel); each sees all outputs,
    so all lags come at once. Cost: |sources| * D_in passes.
  * reverse mode: one VJP per (output position, output channel); each sees all
    sources. Cost: |{tau + l}| * D_out passes. Needed when the function holds
    a `jax.custom_vjp` kernel (e.g. a blocked feedback solve), which has no
    forward-mode rule.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sessa_jax.kernels import feedback_solve
from sessa_jax.kernels.feedback import defaults
from sessa_jax.kernels.feedback import reference
from sessa_jax.kernels.feedback.triangular import strict_lower

MODES = ("auto", "forward", "reverse")


@dataclasses.dataclass(frozen=True)
class InfluenceCurve:
  """Influence against lag with its fitted log-log slope.

  Attributes:
    lags: integer lags, increasing.
    influence: mean influence at each lag (same length as `lags`).
    slope: least-squares slope of log(influence) on log(lag) inside `window`.
    intercept: intercept of that fit (natural logs).
    window: (lo, hi) lag range of the fit, inclusive.
  """

  lags: np.ndarray
  influence: np.ndarray
  slope: float
  intercept: float
  window: tuple[int, int]

  def to_dict(self) -> dict:
    return {"lags": [int(v) for v in self.lags],
            "influence": [float(v) for v in self.influence],
            "slope": self.slope, "intercept": self.intercept,
            "window": list(self.window)}


@dataclasses.dataclass(frozen=True)
class BoundCheck:
  """A Sessa feedback impulse response set beside the paper's tail exponent.

  The paper's regime: diffuse routing A_tj >= c2 / t for every j < t (row t,
  counted from 0, has t earlier positions, so uniform routing is c2 = 1) and
  gains up to gamma_max give a memory tail of order l^-beta with
  beta = 1 - gamma_max * c2, tight (Theta) for uniform routing with constant
  gamma. With nonnegative A and gamma the impulse response also obeys
  s_t >= gamma_min * c2 / t * sum_{tau <= j < t} s_j, hence it decays no
  faster than about t^-(1 - gamma_min * c2). Both statements assume gains in
  [0, gamma_max]; the `tanh_bias` gain ranges over (-gamma_max, gamma_max)
  and trained models do use negative gains, which void the floor (reported
  as NaN then) and can make the response alternate in sign.

  Attributes:
    fitted_exponent: minus the fitted log-log slope of the impulse response.
    c2: largest constant with t * A_tj >= c2 for all j < t over the rows of
      the fit window, from the recorded routing (minimum over the batch).
    gamma_max: the model's gain ceiling.
    gamma_min: smallest recorded gain over the same rows.
    negative_gain_fraction: share of recorded gains below zero on those rows.
    paper_exponent: 1 - gamma_max * c2.
    floor_exponent: 1 - gamma_min * c2 (the response's guaranteed tail), NaN
      when some gain is negative.
  """

  fitted_exponent: float
  c2: float
  gamma_max: float
  gamma_min: float
  negative_gain_fraction: float
  paper_exponent: float
  floor_exponent: float

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def log_lags(max_lag: int, num: int = 32, min_lag: int = 1) -> np.ndarray:
  """Distinct integer lags spaced evenly in log between min_lag and max_lag."""
  if not 1 <= min_lag <= max_lag:
    raise ValueError(f"need 1 <= min_lag <= max_lag, got {min_lag}, {max_lag}")
  grid = np.geomspace(min_lag, max_lag, num=num)
  return np.unique(np.round(grid).astype(np.int64))


def fit_loglog_slope(lags: np.ndarray, values: np.ndarray,
                     window: tuple[int, int]) -> tuple[float, float]:
  """Least-squares line through (log lag, log value) for lags in window.

  Args:
    lags: positive lags.
    values: positive values at those lags (non-positive ones are skipped).
    window: inclusive (lo, hi) lag range.

  Returns:
    (slope, intercept); NaNs when fewer than two usable points.
  """
  lags = np.asarray(lags, np.float64)
  values = np.asarray(values, np.float64)
  keep = ((lags >= window[0]) & (lags <= window[1]) & np.isfinite(values)
          & (values > 0))
  if keep.sum() < 2:
    return float("nan"), float("nan")
  slope, intercept = np.polyfit(np.log(lags[keep]), np.log(values[keep]), 1)
  return float(slope), float(intercept)


def influence_vs_lag(fn: Callable[[jax.Array], jax.Array], x_btd: jax.Array,
                     *, sources: Sequence[int] | None = None,
                     lags: Sequence[int] | None = None,
                     window: tuple[int, int] | None = None,
                     mode: str = "auto", probes: int | None = None,
                     seed: int = 0, chunk: int = 16) -> InfluenceCurve:
  """Mean ||d y_{tau+l} / d x_tau||_F against lag l, with its log-log slope.

  Args:
    fn: causal map (B, T, D_in) -> (B, T, D_out) whose batch rows do not
      interact, e.g. `LanguageModel.hidden` or one block.
    x_btd: the inputs the Jacobian is taken at.
    sources: source positions tau; defaults to the first four.
    lags: lags to report; defaults to a log grid up to the longest lag every
      source can reach.
    window: inclusive lag range of the slope fit; defaults to the top decade.
    mode: `forward` (JVPs per source), `reverse` (VJPs per output position)
      or `auto` (the cheaper one that `fn` supports).
    probes: None takes the norm exactly (one tangent per input channel, or
      cotangent per output channel); an integer estimates its square with
      that many Gaussian probes instead (E||J v||^2 = ||J||_F^2 for
      v ~ N(0, I)), unbiased and cheaper when D is large.
    seed: seed of the probes.
    chunk: tangents pushed through `fn` at once.

  Returns:
    The influence curve.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not one of: {', '.join(MODES)}")
  _, t, d_in = x_btd.shape
  sources, lags, window = _grid(t, sources, lags, window)
  outputs = np.unique((sources[:, None] + lags[None, :]).ravel())
  if mode == "auto":
    d_out = jax.eval_shape(fn, x_btd).shape[-1]
    forward_ok = not _has_custom_vjp(jax.make_jaxpr(fn)(x_btd).jaxpr)
    per_source, per_output = probes or d_in, probes or d_out
    cheaper = len(sources) * per_source <= len(outputs) * per_output
    mode = "forward" if forward_ok and cheaper else "reverse"
  key = jax.random.key(seed)
  if mode == "forward":
    sq_sbt = _forward_sq_norms(fn, x_btd, jnp.asarray(sources), chunk, probes,
                               key)
  else:
    sq_sbo = _reverse_sq_norms(fn, x_btd, jnp.asarray(sources),
                               jnp.asarray(outputs), chunk, probes, key)
    sq_sbt = np.full(sq_sbo.shape[:2] + (t,), np.nan)
    sq_sbt[:, :, outputs] = np.asarray(sq_sbo)
  return _curve(np.sqrt(np.asarray(sq_sbt, np.float64)), sources, lags, window)


def feedback_impulse_response(q_btk: jax.Array, k_btk: jax.Array,
                              gamma_bt: jax.Array, *,
                              sources: Sequence[int] | None = None,
                              lags: Sequence[int] | None = None,
                              window: tuple[int, int] | None = None,
                              scale: float | None = None,
                              impl: str | None = None) -> InfluenceCurve:
  """|s_{tau+l}| for a unit impulse f = e_tau through the feedback solve alone.

  The routing (q_fb, k_fb) and gains are held at recorded values, so this is a
  column of (I - diag(gamma) A)^-1: one solve carries every source at once, one
  channel per source.

  Args:
    q_btk: recorded feedback queries (B, T, K).
    k_btk: recorded feedback keys (B, T, K).
    gamma_bt: recorded gains (B, T).
    sources: source positions; defaults to the first four.
    lags: lags to report; defaults to a log grid.
    window: inclusive lag range of the slope fit; defaults to the top decade.
    scale: logit scale; defaults to K ** -0.5 (the op's default).
    impl: `feedback_solve` implementation; None keeps the op's default.

  Returns:
    The impulse-response curve (mean over batch and sources).
  """
  b, t, _ = q_btk.shape
  sources, lags, window = _grid(t, sources, lags, window)
  f_bts = jnp.zeros((b, t, len(sources)), jnp.float32)
  f_bts = f_bts.at[:, sources, np.arange(len(sources))].set(1.0)
  kwargs = {} if impl is None else {"impl": impl}
  s_bts = feedback_solve(q_btk, k_btk, gamma_bt, f_bts, scale=scale, **kwargs)
  response_sbt = np.abs(np.asarray(s_bts, np.float64)).transpose(2, 0, 1)
  return _curve(response_sbt, sources, lags, window)


def routing_floor(q_btk: jax.Array, k_btk: jax.Array, rows: Sequence[int], *,
                  scale: float | None = None) -> float:
  """Largest c2 with t * A_tj >= c2 for all j < t over the given rows t.

  Builds A one sequence at a time (T x T memory per sequence).

  Args:
    q_btk: feedback queries (B, T, K).
    k_btk: feedback keys (B, T, K).
    rows: row indices t (>= 1) the floor is taken over.
    scale: logit scale; defaults to K ** -0.5.

  Returns:
    c2, the minimum over the batch and rows.
  """
  scale = defaults.resolve_scale(scale, q_btk)
  rows = jnp.asarray(rows)
  earlier = strict_lower(q_btk.shape[1])[rows]

  def one(qk):
    a_tt = reference.feedback_matrix(qk[0][None], qk[1][None], scale)[0]
    scaled = a_tt[rows] * rows[:, None].astype(a_tt.dtype)
    return jnp.min(jnp.where(earlier, scaled, jnp.inf))

  floors = jax.lax.map(one, (q_btk.astype(jnp.float32),
                             k_btk.astype(jnp.float32)))
  return float(jnp.min(floors))


def bound_check(q_btk: jax.Array, k_btk: jax.Array, gamma_bt: jax.Array,
                gamma_max: float, *, sources: Sequence[int] | None = None,
                lags: Sequence[int] | None = None,
                window: tuple[int, int] | None = None,
                scale: float | None = None,
                impl: str | None = None) -> tuple[InfluenceCurve, BoundCheck]:
  """Impulse response of the recorded feedback solve and the paper's exponent.

  Args:
    q_btk, k_btk, gamma_bt: recorded routing and gains (see
      `feedback_impulse_response`).
    gamma_max: the model's gain ceiling (`ModelConfig.gamma_max`).
    sources, lags, window, scale, impl: as in `feedback_impulse_response`.

  Returns:
    (impulse-response curve, BoundCheck) with c2 and gamma_min taken over the
    output rows of the fit window.
  """
  t = q_btk.shape[1]
  sources, lags, window = _grid(t, sources, lags, window)
  curve = feedback_impulse_response(q_btk, k_btk, gamma_bt, sources=sources,
                                    lags=lags, window=window, scale=scale,
                                    impl=impl)
  rows = np.arange(max(1, sources.min() + window[0]),
                   min(t, sources.max() + window[1] + 1))
  c2 = routing_floor(q_btk, k_btk, rows, scale=scale)
  gains = np.asarray(gamma_bt[:, rows], np.float64)
  gamma_min = float(gains.min())
  check = BoundCheck(
      fitted_exponent=-curve.slope, c2=c2, gamma_max=gamma_max,
      gamma_min=gamma_min,
      negative_gain_fraction=float(np.mean(gains < 0)),
      paper_exponent=1.0 - gamma_max * c2,
      floor_exponent=1.0 - gamma_min * c2 if gamma_min >= 0 else float("nan"))
  return curve, check


def _grid(t: int, sources, lags, window):
  """Validated sources, lags and fit window as numpy ints."""
  sources = np.arange(min(4, t - 1)) if sources is None else np.asarray(sources)
  if sources.ndim != 1 or sources.size == 0 or sources.min() < 0:
    raise ValueError(
        f"sources must be a non-empty list of positions, got {sources}")
  max_lag = t - 1 - int(sources.max())
  if max_lag < 1:
    raise ValueError(f"sources {sources.tolist()} leave no lag inside T={t}")
  lags = log_lags(max_lag) if lags is None else np.asarray(lags)
  if lags.min() < 1 or lags.max() > max_lag:
    raise ValueError(
        f"lags must lie in [1, {max_lag}] (T={t}, last source "
        f"{int(sources.max())}), got [{lags.min()}, {lags.max()}]")
  if window is None:
    window = (max(1, int(lags.max()) // 10), int(lags.max()))
  return sources.astype(np.int64), lags.astype(np.int64), tuple(window)


def _curve(values_sbt: np.ndarray, sources: np.ndarray, lags: np.ndarray,
           window: tuple[int, int]) -> InfluenceCurve:
  """Averages values[s, b, tau_s + l] over sources and batch per lag."""
  picked = values_sbt[np.arange(len(sources))[:, None],
                      :, (sources[:, None] + lags[None, :])]  # (S, L, B)
  influence = np.nanmean(picked, axis=(0, 2))
  slope, intercept = fit_loglog_slope(lags, influence, window)
  return InfluenceCurve(lags=lags, influence=influence, slope=slope,
                        intercept=intercept, window=window)


def _directions(n: int, b: int, d: int, probes: int | None, key):
  """Unit-channel (exact) or Gaussian (estimate) directions, (n, m, B, d).

  Summing ||J v||^2 over the m directions times the returned weight gives
  ||J||_F^2 exactly (one-hots) or in expectation (Gaussian probes).
  """
  if probes is None:
    eye = jnp.broadcast_to(jnp.eye(d)[:, None, :], (d, b, d))
    return jnp.broadcast_to(eye, (n, d, b, d)), 1.0
  return jax.random.normal(key, (n, probes, b, d)), 1.0 / probes


def _chunked(run, x_btd, index, dirs, chunk):
  """Applies jitted `run(x, index_chunk, dirs_chunk)` over equal-size chunks.

  Every chunk has the same shape, so `run` compiles once. The last chunk is
  padded with zero directions, which contribute nothing.
  """
  n = dirs.shape[0]
  pad = -n % chunk
  index = jnp.concatenate([index, jnp.zeros((pad,), index.dtype)])
  dirs = jnp.concatenate([dirs, jnp.zeros((pad,) + dirs.shape[1:], dirs.dtype)])
  parts = [run(x_btd, index[i:i + chunk], dirs[i:i + chunk])
           for i in range(0, n + pad, chunk)]
  return jnp.concatenate(parts)[:n]


def _over_directions(probe, x_btd, positions, d, chunk, probes, key):
  """Sums `probe`'s squared norms over the directions at each position.

  Args:
    probe: x_btd -> (position, direction (B, d)) -> squared norms; called
      once per chunk under jit, so what it derives from x (a linearization)
      serves the whole chunk.
    x_btd: the inputs the Jacobian is taken at.
    positions: (P,) positions the directions are placed at.
    d: width of a direction.
    chunk, probes, key: as in `influence_vs_lag`.

  Returns:
    The weighted sum over directions, (P, ...).
  """
  b = x_btd.shape[0]
  dirs, weight = _directions(len(positions), b, d, probes, key)
  m = dirs.shape[1]

  @jax.jit
  def run(x_btd, index_c, dirs_cbd):
    return jax.vmap(probe(x_btd))(index_c, dirs_cbd)

  sq = _chunked(run, x_btd, jnp.repeat(positions, m),
                dirs.reshape(-1, b, d), chunk)
  return weight * sq.reshape(len(positions), m, *sq.shape[1:]).sum(axis=1)


def _forward_sq_norms(fn, x_btd, sources, chunk, probes, key):
  """sum_{i,j} (d y_{b,t,i} / d x_{b,tau_s,j})^2 as (S, B, T), by JVPs."""

  def probe(x_btd):
    _, push = jax.linearize(fn, x_btd)

    def per_tangent(src, direction_bd):
      tangent = jnp.zeros_like(x_btd).at[:, src].set(
          direction_bd.astype(x_btd.dtype))
      return jnp.sum(jnp.square(push(tangent).astype(jnp.float32)), axis=-1)

    return per_tangent  # (B, T) per tangent.

  return _over_directions(probe, x_btd, sources, x_btd.shape[-1], chunk,
                          probes, key)


def _reverse_sq_norms(fn, x_btd, sources, outputs, chunk, probes, key):
  """sum_{i,j} (d y_{b,o,i} / d x_{b,tau_s,j})^2 as (S, B, O), by VJPs."""

  def probe(x_btd):
    y_btd, pull = jax.vjp(fn, x_btd)

    def per_cotangent(out, direction_bd):
      cotangent = jnp.zeros_like(y_btd).at[:, out].set(
          direction_bd.astype(y_btd.dtype))
      (grad_btd,) = pull(cotangent)
      grad_bsd = grad_btd[:, sources].astype(jnp.float32)
      return jnp.sum(jnp.square(grad_bsd), axis=-1).T  # (S, B)

    return per_cotangent

  d_out = jax.eval_shape(fn, x_btd).shape[-1]
  sq = _over_directions(probe, x_btd, outputs, d_out, chunk, probes, key)
  return sq.transpose(1, 2, 0)


def _has_custom_vjp(jaxpr) -> bool:
  """Whether a jaxpr (or any nested one) calls a custom_vjp function."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name.startswith("custom_vjp"):
      return True
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns") and _has_custom_vjp(inner):
          return True
  return False
