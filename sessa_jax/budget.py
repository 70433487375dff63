"""Parameter and FLOP budgets, and width matching for equal-parameter studies.

Parameters are counted from abstract shapes (`nnx.eval_shape`), so nothing is
allocated however large the model. FLOPs follow the convention of
docs/design.md#flop-convention: a multiply-add is 2 FLOPs; every dense weight
costs one multiply-add per token (so projections add 2x their weight count,
the depthwise conv included); a causal product over T positions costs about
T*W/2 multiply-adds per token for width W; the head costs D*V multiply-adds
per token and the embedding lookup nothing.

Each mixer declares its own causal term and width step
(`sessa_jax.models.mixers.MixerSpec`: `causal_macs`, `width_step`,
`fine_knob`); this module only adds them up over the blocks.
"""

from __future__ import annotations

import functools
import math

import jax
from flax import nnx

from sessa_jax.models import build_model
from sessa_jax.models import mixers
from sessa_jax.models.block import MixerBlock
from sessa_jax.models.config import ModelConfig


def _param_shapes(make) -> list[tuple[int, ...]]:
  abstract = nnx.eval_shape(make)
  return [tuple(leaf.shape)
          for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param))]


@functools.lru_cache(maxsize=4096)
def count_params(cfg: ModelConfig) -> int:
  """Number of parameters of `build_model(cfg)`, from abstract shapes."""
  shapes = _param_shapes(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  return sum(math.prod(s) for s in shapes)


@functools.lru_cache(maxsize=4096)
def _block_shapes(cfg: ModelConfig) -> tuple[tuple[int, ...], ...]:
  return tuple(_param_shapes(lambda: MixerBlock(cfg, rngs=nnx.Rngs(0))))


def block_params(cfg: ModelConfig) -> int:
  """Number of parameters of one `MixerBlock(cfg)` (the mixer included).

  A hybrid stack has one count per block: pass `cfg.layer(i)`.
  """
  return sum(math.prod(s) for s in _block_shapes(cfg))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token at sequence length `seq_len` (module doc).

  Args:
    cfg: the model.
    seq_len: training or evaluation sequence length T.

  Returns:
    2 * (sum over blocks of (dense weights + causal terms) + D * V); a hybrid
    stack counts each block with its own mixer.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  blocks = 0.0
  for i in range(cfg.n_layers):
    layer = cfg.layer(i)
    dense = sum(math.prod(s) for s in _block_shapes(layer) if len(s) >= 2)
    blocks += dense + mixers.get(layer.mixer).causal_macs(layer, seq_len)
  return 2.0 * (blocks + cfg.d_model * cfg.vocab_size)


def width_step(cfg: ModelConfig) -> int:
  """The multiple d_model must be of for every mixer of `cfg` to be valid.

  Each mixer states its own step (`MixerSpec.width_step`, e.g. 2 * n_heads
  for attention); a hybrid stack needs the least common multiple.
  """
  return math.lcm(*{mixers.get(mixer).width_step(cfg)
                    for mixer in cfg.layer_mixers})


def match(cfg: ModelConfig, target_params: int, tol: float = 0.02
          ) -> ModelConfig:
  """Picks d_model so the model has `target_params` parameters within `tol`.

  d_model stays a multiple of `width_step(cfg)`. The count is a quadratic in
  d_model, so three exact counts locate the solution and the nearest valid
  widths are then counted exactly. Small models step by more than `tol` from
  one width to the next; there the mixer's fine knob (`MixerSpec.fine_knob`:
  Sessa's feedback width, Mamba-2's state size), in which the count is
  affine, is solved for at the nearest widths with one more exact count.

  Args:
    cfg: the model to resize.
    target_params: wanted number of parameters.
    tol: allowed relative error.

  Returns:
    `cfg` with the chosen d_model (and fine knob, where it was needed).

  Raises:
    ValueError: when no valid width lands within `tol` of the target.
  """
  if target_params < 1:
    raise ValueError(f"target_params must be >= 1, got {target_params}")
  if tol <= 0:
    raise ValueError(f"tol must be > 0, got {tol}")
  step = width_step(cfg)
  count = lambda k: count_params(cfg.replace(d_model=k * step))
  c1, c2, c3 = count(1), count(2), count(3)
  a = (c3 - 2 * c2 + c1) / 2
  b = c2 - c1 - 3 * a
  c = c1 - a - b
  # Positive root of a k^2 + b k + (c - target) = 0 (linear when a == 0).
  if a:
    disc = max(b * b - 4 * a * (c - target_params), 0.0)
    k_star = (-b + math.sqrt(disc)) / (2 * a)
  else:
    k_star = (target_params - c) / b
  base = max(int(math.floor(k_star)), 1)
  candidates = sorted({max(k, 1) for k in range(base - 1, base + 3)})
  err = {k: count(k) / target_params - 1 for k in candidates}
  by_error = sorted(candidates, key=lambda k: abs(err[k]))
  if abs(err[by_error[0]]) <= tol:
    return cfg.replace(d_model=by_error[0] * step)
  for k in by_error:
    tuned = _solve_fine_knob(cfg.replace(d_model=k * step), target_params)
    if (tuned is not None
        and abs(count_params(tuned) / target_params - 1) <= tol):
      return tuned
  near = ", ".join(f"d_model={k * step} -> {count(k):,} ({err[k]:+.1%})"
                   for k in candidates)
  raise ValueError(
      f"budget.match: no model.d_model (a multiple of {step} for "
      f"mixer={cfg.mixer!r}) gives {target_params:,} params within "
      f"{tol:.1%}; nearest: {near}")


def _solve_fine_knob(cfg: ModelConfig, target_params: int
                     ) -> ModelConfig | None:
  """Sets a fine knob so the count is nearest the target.

  A hybrid stack uses the knob of the first of its mixers that has one.
  Returns None when no mixer of `cfg` has a fine knob or no valid value fits.
  """
  knob = next((mixers.get(m).fine_knob for m in cfg.layer_mixers
               if mixers.get(m).fine_knob is not None), None)
  if knob is None:
    return None
  start = knob.value(cfg)
  c0 = count_params(cfg.replace(**{knob.field: start}))
  slope = count_params(cfg.replace(**{knob.field: start + 1})) - c0
  value = start + round((target_params - c0) / slope)
  return cfg.replace(**{knob.field: value}) if value >= 1 else None
