"""MixerBlock: the macro-block every sequence mixer lives in.

`gated` (the Sessa paper's block, docs/design.md#the-gated-block):
  h = LN(x); (a, g) = split(h W_in + b_in); s = Mixer(GELU(a));
  y = x + (s * g) W_out + b_out
`prenorm_mlp` (a conventional Transformer / Mamba-2 layer):
  y = x + Mixer(LN(x)); y = y + MLP(LN(y))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sessa_jax.models import mixers
from sessa_jax.models.config import ModelConfig
from sessa_jax.models.layers import MLP, Linear
from sessa_jax.models.norms import LayerNorm
from sessa_jax.models.partitioning import constrain


def make_mixer(cfg: ModelConfig, *, rngs: nnx.Rngs) -> mixers.Mixer:
  """Builds the registered mixer `cfg.mixer` for a block of kind `cfg.block`.

  Raises:
    TypeError: the built module lacks a method of the `mixers.Mixer` protocol.
  """
  mixer = mixers.get(cfg.mixer).build(cfg, rngs=rngs)
  if not isinstance(mixer, mixers.Mixer):
    raise TypeError(f"mixer {cfg.mixer!r} built a {type(mixer).__name__}, "
                    f"which lacks a method of the mixers.Mixer protocol")
  return mixer


class MixerBlock(nnx.Module):
  """One residual block around a sequence mixer (see module docstring)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.d_model
    kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype),
              param_dtype=jnp.dtype(cfg.param_dtype))
    self.norm = LayerNorm(d, rngs=rngs, param_dtype=kw["param_dtype"])
    self.mixer = make_mixer(cfg, rngs=rngs)
    if cfg.block == "gated":
      self.in_proj = Linear(d, 2 * d, axes=("embed", "hidden"), **kw)
      self.out_proj = Linear(d, d, axes=("hidden", "embed"), **kw)
    else:
      self.mlp_norm = LayerNorm(d, rngs=rngs, param_dtype=kw["param_dtype"])
      self.mlp = MLP(d, cfg.mlp_ratio * d, **kw)

  def mixer_input(self, x: jax.Array):
    """Returns (mixer input, gate or None) for x (..., D)."""
    h = self.norm(x)
    if self.cfg.block != "gated":
      return h, None
    a, g = jnp.split(self.in_proj(h), 2, axis=-1)
    return jax.nn.gelu(a, approximate=False), g

  def _finish(self, x: jax.Array, s: jax.Array, g: jax.Array | None):
    """Residual output from the block input x and the mixer output s."""
    if self.cfg.block == "gated":
      return x + self.out_proj(s * g)
    y = x + s
    return y + self.mlp(self.mlp_norm(y))

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    """Full causal forward (B, T, D) -> (B, T, D) in `cfg.dtype`."""
    x_btd = constrain(x_btd.astype(jnp.dtype(self.cfg.dtype)),
                      "batch", "sequence", "embed")
    u, g = self.mixer_input(x_btd)
    u = constrain(u, "batch", "sequence", "embed")
    if g is not None:
      g = constrain(g, "batch", "sequence", "hidden")
    s = constrain(self.mixer(u), "batch", "sequence", "embed")
    return constrain(self._finish(x_btd, s, g), "batch", "sequence", "embed")

  def prefill(self, x_btd: jax.Array, max_len: int):
    """Forward over a prompt; returns y_btd and a cache of max_len positions."""
    x_btd = x_btd.astype(jnp.dtype(self.cfg.dtype))
    u, g = self.mixer_input(x_btd)
    s, cache = self.mixer.prefill(u, max_len)
    return self._finish(x_btd, s, g), cache

  def init_cache(self, batch_size: int, max_len: int) -> dict:
    """An empty cache (for mixers that provide `init_cache`)."""
    return self.mixer.init_cache(batch_size, max_len)

  def decode_step(self, x: jax.Array, cache: dict):
    """One token: x (B, D) or (B, 1, D); returns (y, cache), y shaped as x."""
    if x.ndim == 3 and x.shape[1] != 1:
      raise ValueError(
          f"decode_step expects (B, D) or (B, 1, D), got {x.shape}")
    x_bd = x.reshape(x.shape[0], -1).astype(jnp.dtype(self.cfg.dtype))
    u, g = self.mixer_input(x_bd)
    s, cache = self.mixer.decode_step(u, cache)
    return self._finish(x_bd, s, g).reshape(x.shape), cache
