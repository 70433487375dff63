"""LanguageModel: token embedding -> N MixerBlocks -> LayerNorm -> head."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sessa_jax.models.block import MixerBlock
from sessa_jax.models.config import ModelConfig
from sessa_jax.models.layers import Linear, param
from sessa_jax.models.norms import LayerNorm
from sessa_jax.models.partitioning import constrain

# What a rematerialised block saves for the backward pass, per `cfg.remat`.
_REMAT_POLICIES = {
    "block": None,  # Only the block's input.
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LanguageModel(nnx.Module):
  """Causal language model over any mixer, or a hybrid stack of them.

  Parameters are stored in `cfg.param_dtype`, activations run in `cfg.dtype`,
  logits are float32 (float64 for float64 models). The embedding is
  N(0, 1/D) so tied logits start with unit scale; an untied head is a Linear
  D -> V without bias.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.vocab_size is None:
      raise ValueError("model.vocab_size is None: a model needs its vocabulary "
                       "size (the trainer takes the task's)")
    self.cfg = cfg
    d, v = cfg.d_model, cfg.vocab_size
    param_dtype = jnp.dtype(cfg.param_dtype)
    self.embedding = param(rngs, jax.nn.initializers.normal(d ** -0.5),
                           (v, d), ("vocab", "embed"), param_dtype)
    self.blocks = nnx.List([MixerBlock(cfg.layer(i), rngs=rngs)
                            for i in range(cfg.n_layers)])
    self.final_norm = LayerNorm(d, rngs=rngs, param_dtype=param_dtype)
    self.head = (None if cfg.tie_embeddings else
                 Linear(d, v, rngs=rngs, use_bias=False,
                        axes=("embed", "vocab"), dtype=jnp.dtype(cfg.dtype),
                        param_dtype=param_dtype))

  @property
  def _dtype(self) -> jnp.dtype:
    return jnp.dtype(self.cfg.dtype)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """Token ids (...) -> embeddings (..., D) in `cfg.dtype`."""
    # The lookup reads whole rows: gather the table's embed dim (FSDP) first.
    table_vd = constrain(self.embedding[...], "vocab", None)
    return jnp.take(table_vd, tokens, axis=0).astype(self._dtype)

  def hidden(self, x_btd: jax.Array) -> jax.Array:
    """All blocks and the final norm: (B, T, D) -> (B, T, D).

    Each block is rematerialised as `cfg.remat` says.
    """
    forward = MixerBlock.__call__
    if self.cfg.remat != "none":
      forward = nnx.remat(forward, policy=_REMAT_POLICIES[self.cfg.remat])
    for block in self.blocks:
      x_btd = forward(block, x_btd)
    return self.final_norm(x_btd)

  def logits(self, h: jax.Array) -> jax.Array:
    """Final hidden states (..., D) -> logits (..., V) in float32 or wider."""
    out = jnp.promote_types(self._dtype, jnp.float32)
    w_dv = (self.embedding[...].T if self.head is None
            else self.head.kernel[...])
    return jnp.dot(h.astype(self._dtype), w_dv.astype(self._dtype),
                   preferred_element_type=out)

  def __call__(self, tokens_bt: jax.Array) -> jax.Array:
    """Token ids (B, T) -> next-token logits (B, T, V)."""
    x_btd = constrain(self.embed(tokens_bt), "batch", "sequence", "embed")
    return constrain(self.logits(self.hidden(x_btd)),
                     "batch", "sequence", "vocab")

  def prefill(self, tokens_bt: jax.Array, max_len: int):
    """Runs a prompt; returns logits_btv and a cache with room for max_len."""
    x = self.embed(tokens_bt)
    caches = []
    for block in self.blocks:
      x, cache = block.prefill(x, max_len)
      caches.append(cache)
    return self.logits(self.final_norm(x)), caches

  def decode_step(self, tokens_b: jax.Array, cache: list):
    """One token per sequence (B,) -> (logits_bv, cache)."""
    x = self.embed(tokens_b)
    new_caches = []
    for block, block_cache in zip(self.blocks, cache):
      x, block_cache = block.decode_step(x, block_cache)
      new_caches.append(block_cache)
    return self.logits(self.final_norm(x)), new_caches

  def generate(self, prompt_bt: jax.Array, num_steps: int, *,
               rng: jax.Array | None = None, temperature: float = 0.0,
               top_k: int | None = None) -> jax.Array:
    """Extends a prompt by `num_steps` tokens (compiled prefill + lax.scan).

    Args:
      prompt_bt: prompt token ids (B, P), P >= 1.
      num_steps: number of tokens to generate.
      rng: PRNG key; required when sampling (temperature > 0).
      temperature: 0 decodes greedily; otherwise samples softmax(logits / T).
      top_k: sample only among the k most likely tokens.

    Returns:
      Token ids (B, P + num_steps): the prompt followed by the new tokens.
    """
    if temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
      raise ValueError("sampling (temperature > 0) needs an rng key")
    if top_k is not None and not 1 <= top_k <= self.cfg.vocab_size:
      raise ValueError(
          f"top_k must lie in [1, {self.cfg.vocab_size}], got {top_k}")
    if num_steps < 1:
      return jnp.asarray(prompt_bt)
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(self)
    k = self.cfg.vocab_size if top_k is None else top_k
    return _generate(graphdef, state, jnp.asarray(prompt_bt), rng,
                     jnp.asarray(temperature, jnp.float32),
                     jnp.asarray(k, jnp.int32), num_steps=num_steps,
                     greedy=temperature == 0)


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> LanguageModel:
  """The model described by `cfg` (a LanguageModel over `cfg.layer_mixers`)."""
  return LanguageModel(cfg, rngs=rngs)


def _pick(logits_bv: jax.Array, key: jax.Array, temperature: jax.Array,
          top_k: jax.Array, greedy: bool) -> jax.Array:
  """Next tokens: argmax, or a sample from the top_k logits / temperature."""
  if greedy:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = logits_bv / temperature
  kth = jnp.take(jnp.sort(logits_bv, axis=-1), logits_bv.shape[-1] - top_k,
                 axis=-1)
  logits_bv = jnp.where(logits_bv < kth[:, None], -jnp.inf, logits_bv)
  return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("num_steps", "greedy"))
def _generate(graphdef, state, prompt_bt, rng, temperature, top_k, *,
              num_steps, greedy):
  """Prefill, pick the first new token, then scan decode steps."""
  model = nnx.merge(graphdef, state)
  keys = jax.random.split(rng, num_steps)
  logits, cache = model.prefill(prompt_bt, prompt_bt.shape[1] + num_steps)
  first = _pick(logits[:, -1], keys[0], temperature, top_k, greedy)

  def step(carry, key):
    token, cache = carry
    logits_bv, cache = model.decode_step(token, cache)
    nxt = _pick(logits_bv, key, temperature, top_k, greedy)
    return (nxt, cache), nxt

  _, rest = jax.lax.scan(step, (first, cache), keys[1:])
  new = jnp.concatenate([first[:, None], rest.T], axis=1)
  return jnp.concatenate([prompt_bt.astype(jnp.int32), new], axis=1)
