"""Sequence mixers, the shared block and the language model around them.

Shape letters in names (`x_btd`, `q_bthd`): docs/design.md#shape-letters.
The built-in mixers are registered below, in the order every list of mixers
shows them (`mixers.names()`).
"""

from sessa_jax.models import attention
from sessa_jax.models import mamba2
from sessa_jax.models import mixers
from sessa_jax.models import sessa
from sessa_jax.models.attention import AttentionMixer
from sessa_jax.models.block import MixerBlock, make_mixer
from sessa_jax.models.config import ModelConfig
from sessa_jax.models.lm import LanguageModel, build_model
from sessa_jax.models.sessa import SessaMixer

mixers.register("sessa", sessa.SPEC)
mixers.register("attention", attention.SPEC)
mixers.register("mamba2", mamba2.SPEC)

__all__ = [
    "AttentionMixer", "LanguageModel", "MixerBlock", "ModelConfig",
    "SessaMixer", "build_model", "make_mixer", "mixers",
]
