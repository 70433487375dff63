"""ModelConfig: the one description of a model that every module builds from."""

from __future__ import annotations

import dataclasses
from typing import Any

from sessa_jax import checks
from sessa_jax.kernels.feedback import IMPLS as FEEDBACK_IMPLS
from sessa_jax.models import mixers

BLOCKS = ("gated", "prenorm_mlp")
GAMMA_FORMS = ("tanh_bias", "tanh")
DTYPES = ("float32", "bfloat16", "float64")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "chunked")
REMATS = ("none", "block", "save_dots", "save_dots_no_batch")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of a language model and of each of its blocks.

  Attributes:
    mixer: sequence mixer of the blocks: a registered one
      (`sessa_jax.models.mixers.names()`), or a hybrid stack written as a
      comma-separated pattern of them (e.g. `sessa,attention`) that is
      cycled over the depth: block i runs `layer_mixers[i]`.
    block: `gated` (the Sessa paper's macro-block,
      docs/design.md#the-gated-block) or `prenorm_mlp` (pre-norm mixer
      sublayer followed by a pre-norm MLP sublayer).
    vocab_size: number of token ids; None until it is known (the trainer
      takes the task's), which no model can be built with.
    d_model: residual width D.
    n_layers: number of blocks.
    n_heads: query heads H of the attention branch.
    n_kv_heads: key/value heads (GQA); None means `n_heads`.
    mlp_ratio: hidden width of the MLP sublayer as a multiple of D
      (prenorm_mlp).
    tie_embeddings: share the token embedding with the output head.
    rope_base: RoPE base frequency.
    gamma_max: upper bound of Sessa's feedback gain, in (0, 1).
    gamma_form: `tanh_bias` (gamma_max * tanh(bias + a.w), the official code)
      or `tanh` (plain tanh(a.w), the paper's text).
    feedback: False drops Sessa's feedback branch (the paper's ablation).
    feedback_dim: width K of the feedback query/key; None means D (official).
      Feedback logits are scaled by K^-1/2, which is the official D^-1/2 when
      K = D.
    feedback_impl: implementation of the feedback solve (see
      `sessa_jax.kernels.feedback_solve`).
    feedback_chunk: rows per chunk of the blocked feedback solves
      (`chunked` and `pallas`; `dense` keeps its own 64-row blocks); None
      takes the solve's default, 256 rows, for both. The Pallas kernels then
      tile each chunk by what the target chip fits (per backend, width and
      dtype).
    attention_impl: `xla` or `cudnn` for `jax.nn.dot_product_attention`,
      `chunked` for the blocked kernel (`sessa_jax.kernels.attention_chunked`)
      or `auto`: cuDNN on GPU for bfloat16, `chunked` on CPU for sequences
      longer than 128, XLA otherwise. float64 always takes the plain einsum
      path.
    ssm_expand: Mamba-2 inner width as a multiple of D.
    ssm_head_dim: Mamba-2 head size P.
    ssm_state: Mamba-2 state size N.
    ssm_conv: Mamba-2 causal depthwise convolution width.
    ssm_chunk: Mamba-2 chunk length of the SSD scan.
    remat: what each block of the full forward keeps for the backward pass
      (the rest is recomputed there; prefill and decoding are not
      rematerialised): `none` keeps every intermediate, `block` only the
      block's input, `save_dots` every matmul output (batched ones such as
      the attention scores included) and `save_dots_no_batch` only matmuls
      without batch dimensions (the projections).
    dtype: compute dtype of activations.
    param_dtype: dtype parameters are stored in.
  """

  mixer: str = "sessa"
  block: str = "gated"
  vocab_size: int | None = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int | None = None
  mlp_ratio: int = 4
  tie_embeddings: bool = True
  rope_base: float = 10000.0
  gamma_max: float = 0.999
  gamma_form: str = "tanh_bias"
  feedback: bool = True
  feedback_dim: int | None = None
  feedback_impl: str = "auto"
  feedback_chunk: int | None = None
  attention_impl: str = "auto"
  ssm_expand: int = 2
  ssm_head_dim: int = 64
  ssm_state: int = 64
  ssm_conv: int = 4
  ssm_chunk: int = 64
  remat: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def layer_mixers(self) -> tuple[str, ...]:
    """The mixer of each block: `mixer`'s pattern cycled over `n_layers`."""
    pattern = self.mixer.split(",")
    return tuple(pattern[i % len(pattern)] for i in range(self.n_layers))

  def layer(self, index: int) -> "ModelConfig":
    """The single-mixer config of block `index` (itself when not hybrid)."""
    mixer = self.layer_mixers[index]
    return self if mixer == self.mixer else self.replace(mixer=mixer)

  @property
  def kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def fb_dim(self) -> int:
    return self.d_model if self.feedback_dim is None else self.feedback_dim

  @property
  def ssm_inner(self) -> int:
    return self.ssm_expand * self.d_model

  def __post_init__(self):
    """Validates every field; raises ValueError naming `model.<key>`.

    Each mixer of the pattern checks the fields it reads (`MixerSpec.validate`),
    in registration order.
    """
    pattern = self.mixer.split(",")
    registered = mixers.names()
    for mixer in pattern:
      if mixer not in registered:
        where = "" if len(pattern) == 1 else f" (in pattern {self.mixer!r})"
        raise ValueError(f"model.mixer={mixer!r}{where} is not one of: "
                         f"{', '.join(registered)}")
    for key, choices in (("block", BLOCKS), ("gamma_form", GAMMA_FORMS),
                         ("dtype", DTYPES), ("param_dtype", DTYPES),
                         ("attention_impl", ATTENTION_IMPLS),
                         ("feedback_impl", FEEDBACK_IMPLS), ("remat", REMATS)):
      checks.one_of("model", key, getattr(self, key), choices)
    checks.at_least("model", self, (
        "vocab_size", "d_model", "n_layers", "n_heads", "mlp_ratio",
        "feedback_chunk", "ssm_expand", "ssm_head_dim", "ssm_state", "ssm_conv",
        "ssm_chunk"))
    if self.n_layers is not None and len(pattern) > self.n_layers:
      raise ValueError(
          f"model.mixer={self.mixer!r} names {len(pattern)} layers but "
          f"model.n_layers={self.n_layers}")
    for mixer in registered:
      if mixer in pattern:
        mixers.get(mixer).validate(self)

  def replace(self, **changes: Any) -> "ModelConfig":
    """A copy with `changes` applied, validated like any new config."""
    return dataclasses.replace(self, **changes)
