"""Causal multi-head attention with interleaved RoPE and grouped KV heads.

This is Sessa's forward (direct-read) branch and, with its output projection
always on, the `attention` mixer. Query head h reads KV head h // (H / H_kv).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sessa_jax import targets
from sessa_jax.kernels import attention_chunked
from sessa_jax.kernels import cached_attention
from sessa_jax.models import mixers
from sessa_jax.models import rope
from sessa_jax.models.config import ModelConfig
from sessa_jax.models.layers import Linear
from sessa_jax.models.partitioning import constrain


# On CPU, 'auto' switches from XLA's dense attention to the blocked kernel
# above this many positions (measured: about even at T = 128, 2-3x faster
# at T = 512, 6x at T = 2048, forward+backward).
CHUNKED_MIN_LEN = 128


def resolve_impl(requested: str, dtype: jnp.dtype, head_dim: int,
                 seq_len: int = 1) -> str:
  """Picks the attention implementation: 'einsum', 'xla', 'cudnn' or 'chunked'.

  float64 always runs the plain einsum path (the reference). 'auto' picks
  cuDNN flash attention on GPU for half-precision inputs with a head size it
  supports, the blocked kernel on CPU for sequences longer than
  `CHUNKED_MIN_LEN`, and XLA otherwise.
  """
  if jnp.dtype(dtype) == jnp.float64:
    return "einsum"
  if requested == "auto":
    backend = targets.platform()
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    fits = head_dim % 8 == 0 and head_dim <= 128
    if backend == "gpu" and half and fits:
      return "cudnn"
    if backend == "cpu" and seq_len > CHUNKED_MIN_LEN:
      return "chunked"
    return "xla"
  return requested


def reference_attention(q_bthd: jax.Array, k_bshd: jax.Array,
                        v_bshd: jax.Array, mask_ts: jax.Array) -> jax.Array:
  """Masked softmax attention by einsum, softmax in float32 or wider.

  Args:
    q_bthd: queries (B, T, H, d).
    k_bshd: keys (B, S, H_kv, d).
    v_bshd: values (B, S, H_kv, d).
    mask_ts: boolean (T, S), True where query t may read key s; every row
      must allow at least one key.

  Returns:
    Outputs (B, T, H, d) in the dtype of `q_bthd`.
  """
  b, t, h, d = q_bthd.shape
  kv_heads = k_bshd.shape[2]
  compute = jnp.promote_types(q_bthd.dtype, jnp.float32)
  q = q_bthd.astype(compute).reshape(b, t, kv_heads, h // kv_heads, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k_bshd.astype(compute))
  logits = jnp.where(mask_ts, logits * d ** -0.5, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, v_bshd.astype(compute))
  return out.reshape(b, t, h, d).astype(q_bthd.dtype)


def causal_attention(q_bthd: jax.Array, k_bthd: jax.Array, v_bthd: jax.Array,
                     *, impl: str) -> jax.Array:
  """Causal attention (the diagonal included) over one sequence.

  Args:
    q_bthd: queries (B, T, H, d), RoPE applied.
    k_bthd: keys (B, T, H_kv, d), RoPE applied.
    v_bthd: values (B, T, H_kv, d).
    impl: 'einsum', 'xla', 'cudnn' or 'chunked' (see `resolve_impl`).

  Returns:
    Outputs (B, T, H, d).
  """
  if impl == "einsum":
    t = q_bthd.shape[1]
    mask_ts = jnp.tril(jnp.ones((t, t), dtype=bool))
    return reference_attention(q_bthd, k_bthd, v_bthd, mask_ts)
  if impl == "chunked":
    return attention_chunked.causal_attention_chunked(q_bthd, k_bthd, v_bthd)
  return jax.nn.dot_product_attention(
      q_bthd, k_bthd, v_bthd, scale=q_bthd.shape[-1] ** -0.5, is_causal=True,
      implementation=impl)


class AttentionMixer(nnx.Module):
  """Causal multi-head attention mixer D -> D (RoPE, GQA).

  Attributes:
    q_proj, k_proj, v_proj: input projections (with bias).
    out_proj: W_o (no bias); None when `use_out_proj` is False.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
               use_out_proj: bool = True):
    """Builds the mixer.

    Args:
      cfg: model config (d_model, n_heads, n_kv_heads, rope_base, dtypes).
      rngs: random streams for initialisation.
      use_out_proj: apply W_o after concatenating heads. The `attention`
        mixer always does; Sessa's forward branch only when H > 1.
    """
    self.cfg = cfg
    d, kv_width = cfg.d_model, cfg.kv_heads * cfg.head_dim
    kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype),
              param_dtype=jnp.dtype(cfg.param_dtype))
    self.q_proj = Linear(d, d, **kw)
    self.k_proj = Linear(d, kv_width, **kw)
    self.v_proj = Linear(d, kv_width, **kw)
    self.out_proj = (Linear(d, d, use_bias=False, axes=("hidden", "embed"),
                            **kw) if use_out_proj else None)

  def _project(self, x_btd: jax.Array, positions_t: jax.Array):
    """Returns q (B,T,H,d), k and v (B,T,H_kv,d), RoPE applied to q and k."""
    cfg = self.cfg
    b, t, _ = x_btd.shape
    q = self.q_proj(x_btd).reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = self.k_proj(x_btd).reshape(b, t, cfg.kv_heads, cfg.head_dim)
    v = self.v_proj(x_btd).reshape(b, t, cfg.kv_heads, cfg.head_dim)
    angles_th = rope.angles(positions_t, cfg.head_dim, cfg.rope_base)
    q, k = rope.apply(q, angles_th), rope.apply(k, angles_th)
    return tuple(constrain(x, "batch", "sequence", "heads", "head_dim")
                 for x in (q, k, v))

  def _output(self, o_bthd: jax.Array) -> jax.Array:
    o = o_bthd.reshape(*o_bthd.shape[:2], self.cfg.d_model)
    o = constrain(o, "batch", "sequence", "hidden")
    return o if self.out_proj is None else self.out_proj(o)

  def _forward(self, x_btd: jax.Array):
    q, k, v = self._project(x_btd, jnp.arange(x_btd.shape[1]))
    impl = resolve_impl(self.cfg.attention_impl, q.dtype, self.cfg.head_dim,
                        x_btd.shape[1])
    return self._output(causal_attention(q, k, v, impl=impl)), k, v

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    """Full causal forward: (B, T, D) -> (B, T, D)."""
    return self._forward(x_btd)[0]

  def prefill(self, x_btd: jax.Array, max_len: int):
    """Runs the forward and fills a decode cache of capacity `max_len`.

    Returns:
      (y_btd, cache) with cache {'k', 'v': (B, max_len, H_kv, d) keys after
      RoPE and values, 'pos': int32 number of filled positions}.
    """
    b, t, _ = x_btd.shape
    if t > max_len:
      raise ValueError(f"prefill length {t} exceeds max_len={max_len}")
    y, k, v = self._forward(x_btd)
    pad = ((0, 0), (0, max_len - t), (0, 0), (0, 0))
    cache = {"k": jnp.pad(k, pad), "v": jnp.pad(v, pad),
             "pos": jnp.asarray(t, jnp.int32)}
    return y, cache

  def init_cache(self, batch_size: int, max_len: int) -> dict:
    """An empty cache: decode from position 0."""
    cfg = self.cfg
    shape = (batch_size, max_len, cfg.kv_heads, cfg.head_dim)
    # Separate buffers, so the cache can be donated to a jitted step.
    return {"k": jnp.zeros(shape, jnp.dtype(cfg.dtype)),
            "v": jnp.zeros(shape, jnp.dtype(cfg.dtype)),
            "pos": jnp.zeros((), jnp.int32)}

  def decode_step(self, x_bd: jax.Array, cache: dict):
    """Processes one token at position cache['pos'].

    Args:
      x_bd: the new token's input (B, D).
      cache: from `prefill`, `init_cache` or a previous step.

    Returns:
      (y_bd, cache) with the token's keys and values written and 'pos' + 1.
      Costs O(pos * D): only the filled rows of the cache are read
      (`cached_attention.attend`); donate the cache to a jitted step so the
      write happens in place.
    """
    cfg = self.cfg
    pos = cache["pos"]
    q, k, v = self._project(x_bd[:, None], pos[None])
    k_cache = jax.lax.dynamic_update_slice_in_dim(
        cache["k"], k.astype(cache["k"].dtype), pos, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(
        cache["v"], v.astype(cache["v"].dtype), pos, axis=1)
    groups = cfg.n_heads // cfg.kv_heads
    q_bkgd = q[:, 0].reshape(q.shape[0], cfg.kv_heads, groups, cfg.head_dim)
    o = cached_attention.attend(q_bkgd, k_cache, v_cache, pos + 1,
                                scale=cfg.head_dim ** -0.5)
    y = self._output(o.reshape(q.shape).astype(q.dtype))[:, 0]
    return y, {"k": k_cache, "v": v_cache, "pos": pos + 1}


def validate_heads(cfg: ModelConfig) -> None:
  """Checks the head layout attention needs (Sessa's forward branch too).

  Raises:
    ValueError: D is not divisible by n_heads, the head size is odd (RoPE
      rotates pairs) or n_heads is not divisible by n_kv_heads.
  """
  if cfg.d_model % cfg.n_heads:
    raise ValueError(
        f"model.d_model={cfg.d_model} is not divisible by "
        f"model.n_heads={cfg.n_heads}")
  if cfg.head_dim % 2:
    raise ValueError(
        f"model.n_heads={cfg.n_heads} gives an odd head dimension "
        f"{cfg.head_dim} (d_model={cfg.d_model}); RoPE needs it even")
  if cfg.kv_heads < 1 or cfg.n_heads % cfg.kv_heads:
    raise ValueError(
        f"model.n_heads={cfg.n_heads} is not divisible by "
        f"model.n_kv_heads={cfg.kv_heads}")


def heads_width_step(cfg: ModelConfig) -> int:
  """D divisible by n_heads with an even head size: multiples of 2 * n_heads."""
  return 2 * cfg.n_heads


def causal_macs(cfg: ModelConfig, seq_len: int) -> float:
  """Multiply-adds per token of QK^T and AV: 2 * T*D/2."""
  return 2 * seq_len * cfg.d_model / 2


SPEC = mixers.MixerSpec(build=AttentionMixer, causal_macs=causal_macs,
                        width_step=heads_width_step, validate=validate_heads)
