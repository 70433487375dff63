"""Parameter and FLOP budgets, and width matching for equal-parameter studies.

Parameters are counted from abstract shapes (`nnx.eval_shape`), so nothing is
allocated however large the model. FLOPs follow the convention of
docs/design.md#flop-convention: a multiply-add is 2 FLOPs; every dense weight
costs one multiply-add per token (so projections add 2x their weight count,
the depthwise conv included); a causal product over T positions costs about
T*W/2 multiply-adds per token for width W; the head costs D*V multiply-adds
per token and the embedding lookup nothing.

Per-token causal terms of each mixer (multiply-adds, T = seq_len):
  attention: QK^T and AV:                             2 * T*D/2
  sessa:     QK^T, AV, feedback logits (width F) and
             the feedback solve (sum_j A_tj s_j):     (3*D + F) * T/2
             (without the feedback branch, as attention)
  mamba2:    chunked SSD with chunk L = min(ssm_chunk, T), inner width E,
             state N: intra-chunk C B^T and (C B^T * decay) x, causal within
             the chunk: (N + E) * L/2; each token's write into its chunk's
             state and its read of the state entering it: 2 * E*N; passing
             the (E x N) state across chunks: E*N / L.
"""

from __future__ import annotations

import functools
import math

import jax
from flax import nnx

from sessa_jax.models import build_model
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


def _mixer_causal_macs(cfg: ModelConfig, seq_len: int) -> float:
  """Multiply-adds per token of a mixer's sequence products (module doc)."""
  d, t = cfg.d_model, seq_len
  if cfg.mixer == "attention" or (cfg.mixer == "sessa" and not cfg.feedback):
    return 2 * t * d / 2
  if cfg.mixer == "sessa":
    return (3 * d + cfg.fb_dim) * t / 2
  if cfg.mixer == "mamba2":
    e, n, ell = cfg.ssm_inner, cfg.ssm_state, min(cfg.ssm_chunk, t)
    return (n + e) * ell / 2 + 2 * e * n + e * n / ell
  raise ValueError(f"model.mixer={cfg.mixer!r} has no FLOP count")


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
    blocks += dense + _mixer_causal_macs(layer, seq_len)
  return 2.0 * (blocks + cfg.d_model * cfg.vocab_size)


def width_step(cfg: ModelConfig) -> int:
  """The multiple d_model must be of for every mixer of `cfg` to be valid.

  Attention and Sessa need D divisible by n_heads with an even head size
  (RoPE): multiples of 2 * n_heads. Mamba-2 needs ssm_expand * D divisible by
  ssm_head_dim. A hybrid stack needs the least common multiple.
  """
  steps = {cfg.ssm_head_dim // math.gcd(cfg.ssm_head_dim, cfg.ssm_expand)
           if mixer == "mamba2" else 2 * cfg.n_heads
           for mixer in cfg.layer_mixers}
  return math.lcm(*steps)


# A second, finer knob per mixer for when no width alone lands within tol: the
# parameter count is affine in each of these (proj_fb is D x 2K; B and C are
# D x N each), so one more exact count solves for it. A hybrid stack uses the
# knob of the first of its mixers that has one.
FINE_KNOBS = {"sessa": "feedback_dim", "mamba2": "ssm_state"}


def match(cfg: ModelConfig, target_params: int, tol: float = 0.02
          ) -> ModelConfig:
  """Picks d_model so the model has `target_params` parameters within `tol`.

  d_model stays a multiple of `width_step(cfg)`. The count is a quadratic in
  d_model, so three exact counts locate the solution and the nearest valid
  widths are then counted exactly. Small models step by more than `tol` from
  one width to the next; there the mixer's fine knob (`FINE_KNOBS`: Sessa's
  feedback width, Mamba-2's state size) is solved for at the nearest widths.

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
    if tuned is not None and abs(count_params(tuned) / target_params - 1) <= tol:
      return tuned
  near = ", ".join(f"d_model={k * step} -> {count(k):,} ({err[k]:+.1%})"
                   for k in candidates)
  raise ValueError(
      f"budget.match: no model.d_model (a multiple of {step} for "
      f"mixer={cfg.mixer!r}) gives {target_params:,} params within "
      f"{tol:.1%}; nearest: {near}")


def _solve_fine_knob(cfg: ModelConfig, target_params: int
                     ) -> ModelConfig | None:
  """Sets the fine knob (`FINE_KNOBS`) so the count is nearest the target.

  Returns None when no mixer of `cfg` has a fine knob or no valid value fits.
  """
  knob = next((FINE_KNOBS[m] for m in cfg.layer_mixers if m in FINE_KNOBS),
              None)
  if knob is None:
    return None
  start = cfg.fb_dim if knob == "feedback_dim" else getattr(cfg, knob)
  c0 = count_params(cfg.replace(**{knob: start}))
  slope = count_params(cfg.replace(**{knob: start + 1})) - c0
  value = start + round((target_params - c0) / slope)
  return cfg.replace(**{knob: value}) if value >= 1 else None
