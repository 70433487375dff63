"""The mixer registry: what a sequence mixer provides, and where it is found.

A mixer is a module D -> D over a causal sequence (the `Mixer` protocol)
together with a `MixerSpec`: how to build it from a `ModelConfig`, which
configs it accepts, the FLOPs of its sequence products and the widths budget
matching may pick. `sessa_jax/models/__init__.py` registers the built-in
mixers; adding one is a new file that defines the module and its spec, and
one `register` line there (or anywhere before the config is built):

  register("conv", MixerSpec(build=ConvMixer, causal_macs=conv_macs,
                             width_step=lambda cfg: 1))
  ModelConfig(mixer="conv")   # validated by the spec; built by MixerBlock
  names()                     # ('sessa', 'attention', 'mamba2', 'conv')

Every list of mixers (config validation, the config argument of `launch.py`,
benchmarks, reports, plot colours) is `names()`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import jax

if TYPE_CHECKING:
  from sessa_jax.models.config import ModelConfig


@runtime_checkable
class Mixer(Protocol):
  """A causal sequence mixer D -> D, as `MixerBlock` runs it.

  Inputs are the block's mixer input in `cfg.dtype`; outputs have the input's
  shape and dtype. A cache is a dict of arrays (a pytree a jitted decode step
  can carry and donate); what it holds is the mixer's own affair.
  """

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    """Full causal forward (B, T, D) -> (B, T, D)."""

  def prefill(self, x_btd: jax.Array, max_len: int
              ) -> tuple[jax.Array, dict[str, Any]]:
    """The forward over a prompt and a cache to decode up to `max_len` from."""

  def init_cache(self, batch_size: int, max_len: int) -> dict[str, Any]:
    """An empty cache: decode from position 0."""

  def decode_step(self, x_bd: jax.Array, cache: dict[str, Any]
                  ) -> tuple[jax.Array, dict[str, Any]]:
    """One token (B, D) -> (its output (B, D), the cache advanced by one)."""


@dataclasses.dataclass(frozen=True)
class FineKnob:
  """A config field the parameter count is affine in (budget matching).

  Attributes:
    field: the `ModelConfig` field `budget.match` may set.
    value: its effective value in a config (the field may be None for a
      default that depends on other fields).
  """

  field: str
  value: Callable[[ModelConfig], int]


def _accepts_any(cfg: ModelConfig) -> None:
  del cfg


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  """Everything the rest of the code needs to know about one mixer.

  Attributes:
    build: `build(cfg, rngs=rngs)` returns the mixer (a `Mixer`) of a block
      with config `cfg` (`cfg.mixer` is this mixer's name, `cfg.block` the
      block it sits in).
    causal_macs: `causal_macs(cfg, seq_len)`, the multiply-adds per token of
      the mixer's products along the sequence, averaged over T = seq_len
      positions; its dense weights are counted from their shapes
      (docs/design.md#flop-convention).
    width_step: `width_step(cfg)`, the multiple `d_model` must be of for the
      mixer to be valid with `cfg`'s other fields.
    validate: `validate(cfg)` raises ValueError naming `model.<key>` when the
      mixer cannot be built from `cfg`; called for every config using it.
    fine_knob: a second knob of the parameter count for `budget.match`, for
      when no width alone lands within tolerance; None if there is none.
  """

  build: Callable[..., Mixer]
  causal_macs: Callable[[ModelConfig, int], float]
  width_step: Callable[[ModelConfig], int]
  validate: Callable[[ModelConfig], None] = _accepts_any
  fine_knob: FineKnob | None = None


_SPECS: dict[str, MixerSpec] = {}


def register(name: str, spec: MixerSpec) -> None:
  """Makes `spec` the mixer `name` (`ModelConfig(mixer=name)`).

  Raises:
    ValueError: `name` is empty, holds a comma (the hybrid separator) or is
      already registered.
  """
  if not name or "," in name:
    raise ValueError(f"mixer name {name!r} must be non-empty without commas")
  if name in _SPECS:
    raise ValueError(f"mixer {name!r} is already registered")
  _SPECS[name] = spec


def names() -> tuple[str, ...]:
  """The registered mixers, in registration order."""
  return tuple(_SPECS)


def get(name: str) -> MixerSpec:
  """The spec of mixer `name`.

  Raises:
    ValueError: no mixer of that name, listing the registered ones.
  """
  if name not in _SPECS:
    raise ValueError(f"unknown mixer {name!r}; registered mixers: "
                     f"{', '.join(_SPECS)}")
  return _SPECS[name]
