"""Weights from the official PyTorch Sessa layer (`SessaLayer.state_dict()`).

Linear weights there are stored (out, in); ours are (in, out). Only names
and shapes are needed, so the state may be a mapping of names to NumPy arrays
(or anything `np.asarray` accepts); torch is not imported.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sessa_jax.models import rope
from sessa_jax.models.block import MixerBlock
from sessa_jax.models.config import ModelConfig

# Buffers of the official layer that carry no learned state.
_BUFFER_PREFIXES = ("mixer.rope_inv_freq", "mixer.causal_mask_")


def _targets(block: MixerBlock) -> dict[str, tuple[nnx.Param, Callable]]:
  """Official name -> (our parameter, conversion from the official layout)."""
  mixer, attn = block.mixer, block.mixer.attn
  linear_t = np.transpose
  same = lambda w: w
  table = {
      "ln.weight": (block.norm.scale, same),
      "ln.bias": (block.norm.bias, same),
      "W_in.weight": (block.in_proj.kernel, linear_t),
      "W_in.bias": (block.in_proj.bias, same),
      "W_out.weight": (block.out_proj.kernel, linear_t),
      "W_out.bias": (block.out_proj.bias, same),
      "mixer.proj_fb.weight": (mixer.proj_fb.kernel, linear_t),
      "mixer.proj_fb.bias": (mixer.proj_fb.bias, same),
      "mixer.gamma_bias": (mixer.gamma_bias, same),
      "mixer.gamma_ctx.weight": (mixer.gamma_ctx, lambda w: w.reshape(-1)),
  }
  for name in ("q_proj", "k_proj", "v_proj"):
    layer = getattr(attn, name)
    table[f"mixer.{name}.weight"] = (layer.kernel, linear_t)
    table[f"mixer.{name}.bias"] = (layer.bias, same)
  if attn.out_proj is not None:
    table["mixer.out_proj.weight"] = (attn.out_proj.kernel, linear_t)
  return table


def sessa_block_from_torch(state: Mapping[str, Any], *, n_heads: int,
                           n_kv_heads: int | None = None,
                           gamma_max: float = 0.999) -> MixerBlock:
  """Builds a gated Sessa `MixerBlock` computing the official layer's function.

  Args:
    state: the official `SessaLayer` state_dict (names in
      docs/design.md#official-parameter-names).
    n_heads: query heads H the layer was built with.
    n_kv_heads: key/value heads (None means H).
    gamma_max: the layer's gain bound.

  Returns:
    A float32 MixerBlock with every parameter copied from `state`.

  Raises:
    KeyError: a parameter is missing, naming it.
    ValueError: a shape does not match (naming the key and both shapes), an
      unknown key is present, or `mixer.rope_inv_freq` disagrees with RoPE
      over head size D / H.
  """
  if "ln.weight" not in state:
    raise KeyError("state_dict has no 'ln.weight' (needed to infer d_model)")
  d_model = int(np.shape(state["ln.weight"])[0])
  cfg = ModelConfig(mixer="sessa", block="gated", d_model=d_model,
                    n_heads=n_heads, n_kv_heads=n_kv_heads, gamma_max=gamma_max,
                    dtype="float32", param_dtype="float32")
  # Built abstractly: every parameter is then filled from `state`.
  block = nnx.eval_shape(lambda: MixerBlock(cfg, rngs=nnx.Rngs(0)))
  table = _targets(block)
  unknown = sorted(k for k in state if k not in table
                   and not k.startswith(_BUFFER_PREFIXES))
  if unknown:
    raise ValueError(
        f"unexpected key {unknown[0]!r} in the state_dict for n_heads={n_heads}"
        f", n_kv_heads={cfg.kv_heads}; expected: {', '.join(sorted(table))}")
  for name, (target, convert) in table.items():
    if name not in state:
      raise KeyError(f"state_dict is missing {name!r}")
    value = convert(np.asarray(state[name], dtype=np.float32))
    if value.shape != target.shape:
      raise ValueError(
          f"{name!r}: shape {np.shape(state[name])} does not fit the block "
          f"(expects {convert(np.zeros(target.shape)).shape} in the official "
          f"layout for d_model={d_model}, n_heads={n_heads}, "
          f"n_kv_heads={cfg.kv_heads})")
    target.set_value(jnp.asarray(value))
  if "mixer.rope_inv_freq" in state:
    given = np.asarray(state["mixer.rope_inv_freq"], np.float32)
    ours = np.asarray(rope.inv_frequencies(cfg.head_dim, cfg.rope_base))
    if given.shape != ours.shape or not np.allclose(given, ours, rtol=1e-5):
      raise ValueError(
          f"'mixer.rope_inv_freq' {given} disagrees with RoPE over head size "
          f"{cfg.head_dim} (d_model={d_model}, n_heads={n_heads}): {ours}")
  return block
