"""Mamba-2 sequence mixer (SSD; Dao & Gu, 2024), D -> D.

Inner width E = expand * D split into H = E / P heads of size P, state size N,
one group of B and C shared by all heads:

  x, B, C, dt (and the gate z) = linear projections of the input
  x, B, C = SiLU(causal depthwise conv_K(x, B, C))
  dt_h = softplus(dt_h + dt_bias_h),  a_h = exp(-dt_h * exp(A_log_h))
  S_t = a_t S_{t-1} + (dt_t x_t) B_t^T,   y_t = S_t C_t + D_h x_t   (per head)
  out = W_out RMSNorm(y * SiLU(z))     (RMSNorm(y) without the gate)

The gate z exists only where no outer gate does (`use_gate=True`, inside the
`prenorm_mlp` block); the `gated` macro-block already multiplies the mixer
output by its own gate. Training runs the chunked SSD scan of
`sessa_jax.kernels.ssd`; decoding carries the last K-1 conv inputs and the
(H, P, N) state, so each new token costs O(E * N) whatever its position.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sessa_jax.kernels import ssd
from sessa_jax.models import mixers
from sessa_jax.models.config import ModelConfig
from sessa_jax.models.layers import Linear, constant, param, torch_uniform
from sessa_jax.models.partitioning import constrain

# Initial step sizes softplus(dt_bias) are log-uniform in this range.
DT_MIN, DT_MAX = 1e-3, 1e-1
# A = -exp(A_log) starts uniform in [-16, -1] (log-uniform A_log).
A_INIT_RANGE = (1.0, 16.0)
NORM_EPS = 1e-5


def _a_log_init(key, shape, dtype=jnp.float32):
  lo, hi = A_INIT_RANGE
  u = jax.random.uniform(key, shape, jnp.float32, lo, hi)
  return jnp.log(u).astype(dtype)


def _dt_bias_init(key, shape, dtype=jnp.float32):
  """Inverse softplus of a log-uniform step size in [DT_MIN, DT_MAX]."""
  log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(DT_MIN),
                              math.log(DT_MAX))
  dt = jnp.exp(log_dt)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _causal_conv(u_btc: jax.Array, w_kc: jax.Array, b_c: jax.Array,
                 history_bkc: jax.Array) -> jax.Array:
  """Depthwise causal convolution of width K continuing after `history`.

  Args:
    u_btc: inputs (B, T, C).
    w_kc: per-channel taps (K, C); tap K-1 multiplies the current input.
    b_c: bias (C,).
    history_bkc: the K-1 inputs before u (B, K-1, C), zeros at the start.

  Returns:
    (B, T, C) outputs, before the activation.
  """
  k, t = w_kc.shape[0], u_btc.shape[1]
  full = jnp.concatenate([history_bkc.astype(u_btc.dtype), u_btc], axis=1)
  w_kc = w_kc.astype(u_btc.dtype)
  out = sum(full[:, i:i + t] * w_kc[i] for i in range(k))
  return out + b_c.astype(u_btc.dtype)


def _last_inputs(history_bkc: jax.Array, u_btc: jax.Array) -> jax.Array:
  """The K-1 most recent inputs after appending u to the history."""
  k1 = history_bkc.shape[1]
  if not k1:
    return history_bkc
  return jnp.concatenate([history_bkc.astype(u_btc.dtype), u_btc],
                         axis=1)[:, -k1:]


class Mamba2Mixer(nnx.Module):
  """Mamba-2 (SSD) mixer (a `mixers.Mixer`).

  Cache (a dict of arrays): 'conv_x' (B, K-1, E) and 'conv_bc' (B, K-1, 2N),
  the last K-1 pre-convolution inputs; 'ssm' (B, H, P, N) the state in
  float32 (float64 for float64 models); 'pos' int32 tokens seen so far.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, use_gate: bool):
    # A mamba2 ModelConfig has checked that P divides E.
    e, p = cfg.ssm_inner, cfg.ssm_head_dim
    self.cfg = cfg
    self.use_gate = use_gate
    d, n, k = cfg.d_model, cfg.ssm_state, cfg.ssm_conv
    h = e // p
    self.n_heads = h
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
    self.x_proj = Linear(d, e, axes=("embed", "hidden"), **kw)
    self.z_proj = (Linear(d, e, axes=("embed", "hidden"), **kw)
                   if use_gate else None)
    self.bc_proj = Linear(d, 2 * n, axes=("embed", None), **kw)
    self.dt_proj = Linear(d, h, axes=("embed", "heads"), **kw)
    # PyTorch's Conv1d default: uniform in +-1/sqrt(K) for a depthwise conv.
    conv_init = torch_uniform(k)
    self.conv_x = param(rngs, conv_init, (k, e), (None, "hidden"), param_dtype)
    self.conv_x_bias = param(rngs, conv_init, (e,), ("hidden",), param_dtype)
    self.conv_bc = param(rngs, conv_init, (k, 2 * n), (None, None), param_dtype)
    self.conv_bc_bias = param(rngs, conv_init, (2 * n,), (None,), param_dtype)
    self.a_log = param(rngs, _a_log_init, (h,), ("heads",), param_dtype)
    self.dt_bias = param(rngs, _dt_bias_init, (h,), ("heads",), param_dtype)
    self.d_skip = param(rngs, constant(1.0), (h,), ("heads",),
                        param_dtype)
    self.norm_scale = param(rngs, constant(1.0), (e,), ("hidden",),
                            param_dtype)
    self.out_proj = Linear(e, d, axes=("hidden", "embed"), **kw)

  @property
  def _dtype(self) -> jnp.dtype:
    return jnp.dtype(self.cfg.dtype)

  @property
  def _acc(self) -> jnp.dtype:
    return jnp.promote_types(self._dtype, jnp.float32)

  def _project(self, x: jax.Array):
    """Input projections of x (..., D).

    Returns:
      Pre-conv x (..., E), pre-conv B|C (..., 2N), raw dt (..., H) and the
      gate z (..., E), or None without the gate.
    """
    x = x.astype(self._dtype)
    z = self.z_proj(x) if self.use_gate else None
    return self.x_proj(x), self.bc_proj(x), self.dt_proj(x), z

  def _decay(self, dt_raw: jax.Array):
    """Step sizes dt and log decays log a = -dt exp(A_log), in float32."""
    dt = jax.nn.softplus(dt_raw.astype(self._acc)
                         + self.dt_bias[...].astype(self._acc))
    return dt, -dt * jnp.exp(self.a_log[...].astype(self._acc))

  def _output(self, y_e: jax.Array, z_e: jax.Array | None) -> jax.Array:
    """Gate, RMSNorm and output projection: (..., E) float32 -> (..., D)."""
    if z_e is not None:
      y_e = y_e * jax.nn.silu(z_e.astype(self._acc))
    y_e = y_e * jax.lax.rsqrt(
        jnp.mean(jnp.square(y_e), axis=-1, keepdims=True) + NORM_EPS)
    y_e = y_e * self.norm_scale[...].astype(self._acc)
    return self.out_proj(y_e.astype(self._dtype))

  def _forward(self, x_btd: jax.Array, history: dict):
    """Full sequence from a conv history; returns (y_btd, new cache parts)."""
    cfg = self.cfg
    b, t, _ = x_btd.shape
    n, p = cfg.ssm_state, cfg.ssm_head_dim
    xr_bte, bcr_btc, dt_raw, z_bte = self._project(x_btd)
    xr_bte = constrain(xr_bte, "batch", "sequence", "hidden")
    if z_bte is not None:
      z_bte = constrain(z_bte, "batch", "sequence", "hidden")
    dt_raw = constrain(dt_raw, "batch", "sequence", "heads")
    xc_bte = jax.nn.silu(_causal_conv(xr_bte, self.conv_x[...],
                                      self.conv_x_bias[...], history["conv_x"]))
    bc_btc = jax.nn.silu(_causal_conv(bcr_btc, self.conv_bc[...],
                                      self.conv_bc_bias[...],
                                      history["conv_bc"]))
    b_btn, c_btn = jnp.split(bc_btc.astype(self._acc), [n], axis=-1)
    dt_bth, log_a_bth = self._decay(dt_raw)
    x_bthp = constrain(xc_bte.astype(self._acc).reshape(b, t, self.n_heads, p),
                       "batch", "sequence", "heads", "head_dim")
    y_bthp, state = ssd.ssd(x_bthp * dt_bth[..., None], log_a_bth, b_btn,
                            c_btn, chunk=cfg.ssm_chunk,
                            initial_state=history["ssm"])
    y_bthp = constrain(
        y_bthp + self.d_skip[...].astype(self._acc)[:, None] * x_bthp,
        "batch", "sequence", "heads", "head_dim")
    y_btd = self._output(y_bthp.reshape(b, t, -1), z_bte)
    return y_btd, {"conv_x": _last_inputs(history["conv_x"], xr_bte),
                   "conv_bc": _last_inputs(history["conv_bc"], bcr_btc),
                   "ssm": state}

  def init_cache(self, batch_size: int, max_len: int) -> dict:
    """An empty cache (state size does not depend on `max_len`)."""
    del max_len
    cfg, k1 = self.cfg, self.cfg.ssm_conv - 1
    return {
        "conv_x": jnp.zeros((batch_size, k1, cfg.ssm_inner), self._dtype),
        "conv_bc": jnp.zeros((batch_size, k1, 2 * cfg.ssm_state), self._dtype),
        "ssm": jnp.zeros((batch_size, self.n_heads, cfg.ssm_head_dim,
                          cfg.ssm_state), self._acc),
        "pos": jnp.zeros((), jnp.int32),
    }

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    """Causal forward (B, T, D) -> (B, T, D)."""
    return self.prefill(x_btd, x_btd.shape[1])[0]

  def prefill(self, x_btd: jax.Array, max_len: int):
    """Forward over a prompt; returns (y_btd, cache) ready to decode from.

    Args:
      x_btd: prompt (B, T, D).
      max_len: total length to be decoded; the recurrent cache has a fixed
        size, so it is only checked against T.

    Returns:
      The outputs (B, T, D) and the cache after the prompt.
    """
    b, t, _ = x_btd.shape
    if t > max_len:
      raise ValueError(f"prompt length {t} exceeds max_len={max_len}")
    y_btd, cache = self._forward(x_btd, self.init_cache(b, max_len))
    cache["pos"] = jnp.asarray(t, jnp.int32)
    return y_btd, cache

  def decode_step(self, x_bd: jax.Array, cache: dict):
    """One token per sequence: (B, D) -> ((B, D), cache advanced by one)."""
    p = self.cfg.ssm_head_dim
    n = self.cfg.ssm_state
    xr_be, bcr_bc, dt_raw, z_be = self._project(x_bd)
    xc_be = jax.nn.silu(_causal_conv(xr_be[:, None], self.conv_x[...],
                                     self.conv_x_bias[...],
                                     cache["conv_x"])[:, 0])
    bc_bc = jax.nn.silu(_causal_conv(bcr_bc[:, None], self.conv_bc[...],
                                     self.conv_bc_bias[...],
                                     cache["conv_bc"])[:, 0])
    b_bn, c_bn = jnp.split(bc_bc.astype(self._acc), [n], axis=-1)
    dt_bh, log_a_bh = self._decay(dt_raw)
    x_bhp = xc_be.astype(self._acc).reshape(x_bd.shape[0], self.n_heads, p)
    s_bhpn = (jnp.exp(log_a_bh)[..., None, None] * cache["ssm"]
              + jnp.einsum("bhp,bn->bhpn", x_bhp * dt_bh[..., None], b_bn))
    y_bhp = (jnp.einsum("bhpn,bn->bhp", s_bhpn, c_bn)
             + self.d_skip[...].astype(self._acc)[:, None] * x_bhp)
    y_bd = self._output(y_bhp.reshape(x_bd.shape[0], -1), z_be)
    return y_bd, {"conv_x": _last_inputs(cache["conv_x"], xr_be[:, None]),
                  "conv_bc": _last_inputs(cache["conv_bc"], bcr_bc[:, None]),
                  "ssm": s_bhpn, "pos": cache["pos"] + 1}


def build(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Mamba2Mixer:
  """The mixer of a block: with its own gate only in `prenorm_mlp` blocks."""
  return Mamba2Mixer(cfg, rngs=rngs, use_gate=cfg.block == "prenorm_mlp")


def validate(cfg: ModelConfig) -> None:
  """Checks that the head size P divides the inner width E."""
  if cfg.ssm_inner % cfg.ssm_head_dim:
    raise ValueError(
        f"model.ssm_head_dim={cfg.ssm_head_dim} does not divide the inner "
        f"width ssm_expand*d_model={cfg.ssm_inner}")


def width_step(cfg: ModelConfig) -> int:
  """The least D with ssm_expand * D divisible by ssm_head_dim."""
  return cfg.ssm_head_dim // math.gcd(cfg.ssm_head_dim, cfg.ssm_expand)


def causal_macs(cfg: ModelConfig, seq_len: int) -> float:
  """Multiply-adds per token of the chunked SSD scan.

  With chunk L = min(ssm_chunk, T), inner width E and state N: intra-chunk
  C B^T and (C B^T * decay) x, causal within the chunk: (N + E) * L/2; each
  token's write into its chunk's state and its read of the state entering
  it: 2 * E*N; passing the (E x N) state across chunks: E*N / L.
  """
  e, n, ell = cfg.ssm_inner, cfg.ssm_state, min(cfg.ssm_chunk, seq_len)
  return (n + e) * ell / 2 + 2 * e * n + e * n / ell


# B and C are projected by D x N weights each, so the count is affine in N.
SPEC = mixers.MixerSpec(
    build=build, causal_macs=causal_macs, width_step=width_step,
    validate=validate,
    fine_knob=mixers.FineKnob("ssm_state", lambda cfg: cfg.ssm_state))
