"""Sessa mixer: causal attention inside a recurrent feedback path.

Given the mixer input a (B, T, D) (the GELU'd first half of the block's input
projection), the forward branch is causal multi-head attention with RoPE,
f = Attn(a) (W_o only when H > 1). The feedback branch routes earlier mixer
outputs back in:

  s_t = f_t + gamma_t * sum_{j<t} A_tj s_j,
  A_t. = softmax_{j<t}(K^-1/2 q_fb,t . k_fb,j)   (row 0 all zeros),
  gamma_t = gamma_max * tanh(gamma_bias + a_t . w_gamma),

a unit lower-triangular system solved in float32
(docs/design.md#the-sessa-layer; shape letters: docs/design.md#shape-letters).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sessa_jax import checks
from sessa_jax import kernels
from sessa_jax.kernels import cached_attention
from sessa_jax.models import attention
from sessa_jax.models import mixers
from sessa_jax.models.attention import AttentionMixer
from sessa_jax.models.config import ModelConfig
from sessa_jax.models.layers import Linear, constant, param, torch_uniform
from sessa_jax.models.partitioning import constrain


class SessaMixer(nnx.Module):
  """Selective State Space Attention mixer D -> D.

  Attributes:
    attn: forward branch (q/k/v projections, W_o when H > 1).
    proj_fb: feedback projection D -> 2K, queries first (absent when
      `cfg.feedback` is False).
    gamma_ctx: w_gamma (D,), the gain's context weights.
    gamma_bias: scalar gain bias, initialised to 1.0 (gamma_form 'tanh_bias').
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, k = cfg.d_model, cfg.fb_dim
    param_dtype = jnp.dtype(cfg.param_dtype)
    self.attn = AttentionMixer(cfg, rngs=rngs, use_out_proj=cfg.n_heads > 1)
    if cfg.feedback:
      self.proj_fb = Linear(d, 2 * k, rngs=rngs, dtype=jnp.dtype(cfg.dtype),
                            param_dtype=param_dtype)
      self.gamma_ctx = param(rngs, torch_uniform(d), (d,), ("embed",),
                             param_dtype)
      self.gamma_bias = (param(rngs, constant(1.0), (), (), param_dtype)
                         if cfg.gamma_form == "tanh_bias" else None)
    # Official scale D^-1/2 over the full width; K^-1/2 for a custom width K.
    self.fb_scale = k ** -0.5

  def gain(self, a_btd: jax.Array) -> jax.Array:
    """Per-token feedback gain gamma (B, T) in float32 (or wider)."""
    compute = jnp.promote_types(a_btd.dtype, jnp.float32)
    raw = jnp.dot(a_btd.astype(compute), self.gamma_ctx[...].astype(compute))
    if self.gamma_bias is None:
      return jnp.tanh(raw)
    raw = raw + self.gamma_bias[...].astype(compute)
    return self.cfg.gamma_max * jnp.tanh(raw)

  def feedback_inputs(self, a_btd: jax.Array):
    """The feedback routing's inputs for mixer input a (B, T, D).

    Returns:
      (q_fb, k_fb, gamma): feedback queries and keys (B, T, K) and gains (B, T).
    """
    q_fb, k_fb = jnp.split(self.proj_fb(a_btd), 2, axis=-1)
    return q_fb, k_fb, self.gain(a_btd)

  def _solve(self, a_btd: jax.Array, f_btd: jax.Array):
    """Returns (s in float32 or wider, feedback keys)."""
    q_fb, k_fb, gamma = self.feedback_inputs(a_btd)
    f = f_btd.astype(jnp.promote_types(f_btd.dtype, jnp.float32))
    s = kernels.feedback_solve(q_fb, k_fb, gamma, f,
                               impl=self.cfg.feedback_impl,
                               chunk=self.cfg.feedback_chunk,
                               scale=self.fb_scale)
    return s, k_fb

  def __call__(self, a_btd: jax.Array) -> jax.Array:
    """Full causal forward: (B, T, D) -> s (B, T, D) in the input dtype."""
    f = constrain(self.attn(a_btd), "batch", "sequence", "embed")
    if not self.cfg.feedback:
      return f
    return self._solve(a_btd, f)[0].astype(a_btd.dtype)

  def init_cache(self, batch_size: int, max_len: int) -> dict:
    """An empty cache: decode from position 0."""
    cache = self.attn.init_cache(batch_size, max_len)
    if self.cfg.feedback:
      cache["k_fb"] = jnp.zeros((batch_size, max_len, self.cfg.fb_dim),
                                jnp.dtype(self.cfg.dtype))
      cache["s"] = jnp.zeros((batch_size, max_len, self.cfg.d_model),
                             self._s_dtype)
    return cache

  @property
  def _s_dtype(self) -> jnp.dtype:
    return jnp.promote_types(jnp.dtype(self.cfg.dtype), jnp.float32)

  def prefill(self, a_btd: jax.Array, max_len: int):
    """Runs the forward and fills a decode cache of capacity `max_len`.

    Returns:
      (s_btd, cache): cache holds the forward branch's 'k' (after RoPE) and
      'v', the feedback keys 'k_fb' (B, max_len, K), all past mixer outputs
      's' (B, max_len, D) in float32, and 'pos'.
    """
    f, cache = self.attn.prefill(a_btd, max_len)
    if not self.cfg.feedback:
      return f, cache
    s, k_fb = self._solve(a_btd, f)
    pad = ((0, 0), (0, max_len - a_btd.shape[1]), (0, 0))
    cache["k_fb"] = jnp.pad(k_fb, pad)
    cache["s"] = jnp.pad(s.astype(self._s_dtype), pad)
    return s.astype(a_btd.dtype), cache

  def decode_step(self, a_bd: jax.Array, cache: dict):
    """Processes one token at position t = cache['pos'] in O(t * D).

    f_t comes from the cached forward attention; then
    s_t = f_t + gamma_t * softmax_{j<t}(q_fb,t . k_fb,j) S[<t], reading only
    the t filled rows of the cache (`cached_attention.attend`).

    Args:
      a_bd: mixer input of the new token (B, D).
      cache: from `prefill`, `init_cache` or a previous step.

    Returns:
      (s_bd, cache) with position t written and 'pos' advanced.
    """
    pos = cache["pos"]
    attn_cache = {name: cache[name] for name in ("k", "v", "pos")}
    f, attn_cache = self.attn.decode_step(a_bd, attn_cache)
    if not self.cfg.feedback:
      return f, attn_cache
    q_fb, k_fb, gamma = self.feedback_inputs(a_bd[:, None])
    keys_fb = jax.lax.dynamic_update_slice_in_dim(
        cache["k_fb"], k_fb.astype(cache["k_fb"].dtype), pos, axis=1)
    # One head: q (B, 1, K) over keys (B, S, K) and past outputs s (B, S, D).
    read = cached_attention.attend(q_fb, keys_fb, cache["s"], pos,
                                   scale=self.fb_scale)[:, 0]
    compute = self._s_dtype
    s_bd = f.astype(compute) + gamma[:, 0, None].astype(compute) * read
    s_cache = jax.lax.dynamic_update_slice_in_dim(
        cache["s"], s_bd[:, None].astype(cache["s"].dtype), pos, axis=1)
    cache = dict(attn_cache, k_fb=keys_fb, s=s_cache)
    return s_bd.astype(a_bd.dtype), cache


def validate(cfg: ModelConfig) -> None:
  """Checks the attention head layout, gamma_max and the feedback width."""
  attention.validate_heads(cfg)
  if not 0.0 < cfg.gamma_max < 1.0:
    raise ValueError(
        f"model.gamma_max must lie in (0, 1), got {cfg.gamma_max}")
  checks.at_least("model", cfg, ("feedback_dim",))


def causal_macs(cfg: ModelConfig, seq_len: int) -> float:
  """Multiply-adds per token of the products along the sequence.

  QK^T, AV, the feedback logits (width F) and the feedback solve
  (sum_j A_tj s_j): (3*D + F) * T/2; without the feedback branch, as
  attention.
  """
  if not cfg.feedback:
    return attention.causal_macs(cfg, seq_len)
  return (3 * cfg.d_model + cfg.fb_dim) * seq_len / 2


# The feedback projection is D x 2K, so the count is affine in K.
SPEC = mixers.MixerSpec(
    build=SessaMixer, causal_macs=causal_macs,
    width_step=attention.heads_width_step, validate=validate,
    fine_knob=mixers.FineKnob("feedback_dim", lambda cfg: cfg.fb_dim))
