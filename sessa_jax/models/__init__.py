"""Sequence mixers, the shared block and the language model around them.

Shape letters in names (`x_btd`, `q_bthd`): docs/design.md#shape-letters.
"""

from sessa_jax.models.attention import AttentionMixer
from sessa_jax.models.block import MixerBlock, make_mixer
from sessa_jax.models.config import ModelConfig
from sessa_jax.models.lm import LanguageModel, build_model
from sessa_jax.models.sessa import SessaMixer

__all__ = [
    "AttentionMixer", "LanguageModel", "MixerBlock", "ModelConfig",
    "SessaMixer", "build_model", "make_mixer",
]
