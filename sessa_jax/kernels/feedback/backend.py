"""The interface between the Pallas host (`pallas`) and its kernel backends.

A `Backend` (`pallas_tpu.BACKEND`, `pallas_gpu.BACKEND`) names its kernels,
says which feature widths they take, and binds them: given the `Plan` of one
solve, `bind` returns `Kernels`, launches the host calls with operands
alone. Each backend binds each kernel to just the settings that kernel
reads, so no kernel takes an argument it ignores.

Kernels update their accumulators in place; `aliases` turns the operand and
output names below into a pallas_call's `input_output_aliases`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Protocol, Sequence

import jax
from jax.experimental.pallas import tpu as pltpu

# Operand names of the kernels' pallas_calls, in order (scalar-prefetched
# operands included), and the names of the outputs updated in place.
RECT_APPLY = ("sched", "q", "k", "s", "lse", "ctx")
RECT_COL = ("sched", "q", "k", "w", "s", "delta", "lse", "dv", "dk")
LEAF = ("index", "inv", "rhs", "gamma", "ctx")
# The leaf kernels' outputs, the last (a copy in the matmul dtype) optional.
LEAF_SOLVE_OUTS = ("s", "s_mm")
LEAF_ADJOINT_OUTS = ("u", "delta", "w", "w_mm")


def aliases(operands: Sequence[str], outputs: Sequence[str]
            ) -> dict[int, int]:
  """`input_output_aliases` writing each output over its namesake operand.

  Args:
    operands: the pallas_call's operand names, in order.
    outputs: its output names, in order, each an operand's name.

  Returns:
    {operand index: output index}.
  """
  return {operands.index(name): i for i, name in enumerate(outputs)}


@dataclasses.dataclass(frozen=True)
class Tiling:
  """One kernel's tile height and (Triton) pipeline stages."""
  tile: int
  stages: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static settings of one solve that a backend binds its kernels to.

  Attributes:
    chunk: rows per chunk (C).
    chunks: chunks in the padded sequence (n = T / C).
    tilings: each kernel's `Tiling`, by kernel name.
    scale: logit scale.
    interpret: run in interpret mode; the TPU kernels also take the TPU
      interpreter's settings.
  """
  chunk: int
  chunks: int
  tilings: Mapping[str, Tiling]
  scale: float
  interpret: bool | pltpu.InterpretParams

  def group(self, kernel: str) -> int:
    """Tiles of `kernel` per chunk."""
    return self.chunk // self.tilings[kernel].tile

  def side_max(self, kernel: str) -> int:
    """Tiles of `kernel` on a side of the solve's largest rectangle."""
    return (1 << max(self.chunks - 1, 1).bit_length() - 1) * self.group(kernel)


class RowStats(Protocol):
  """Row log-sum-exps over the keys of earlier chunks, -inf where none."""

  def __call__(self, q_btk: jax.Array, k_btk: jax.Array) -> jax.Array:
    ...


class RectApply(Protocol):
  """ctx_t += sum_j A_tj s_j over the rectangle `sched`; returns ctx."""

  def __call__(self, sched: jax.Array, q_btk: jax.Array, k_btk: jax.Array,
               s_btd: jax.Array, lse_bt: jax.Array,
               ctx_btd: jax.Array) -> jax.Array:
    ...


class RectCol(Protocol):
  """One backward rectangle: dv and dk of its keys, in place.

  `dq_btk` (its rows' dq accumulator, also updated and returned) is passed
  exactly when the backend has no `row_grad`.
  """

  def __call__(self, sched: jax.Array, q_btk: jax.Array, k_btk: jax.Array,
               w_btd: jax.Array, s_btd: jax.Array, delta_bt: jax.Array,
               lse_bt: jax.Array, dv_btd: jax.Array, dk_btk: jax.Array,
               *dq_btk: jax.Array) -> tuple[jax.Array, ...]:
    ...


class RowGrad(Protocol):
  """Per row: sum_j dlogit_tj k_j over the keys of earlier chunks."""

  def __call__(self, q_btk: jax.Array, k_btk: jax.Array, s_btd: jax.Array,
               w_btd: jax.Array, delta_bt: jax.Array,
               lse_bt: jax.Array) -> jax.Array:
    ...


class Leaf(Protocol):
  """Solves the diagonal block of chunk `index`, writing `outs` in place."""

  def __call__(self, index: jax.Array, inv_bncc: jax.Array,
               rhs_btd: jax.Array, gamma_bt: jax.Array, ctx_btd: jax.Array,
               outs: Sequence[jax.Array]) -> list[jax.Array]:
    ...


@dataclasses.dataclass(frozen=True)
class Kernels:
  """A backend's kernels bound to one solve (see each kernel's Protocol).

  Attributes:
    row_stats: the forward's row statistics.
    rect_apply: one rectangle of the forward substitution.
    rect_col: one rectangle of the backward (with dq when `row_grad` is
      None).
    leaf_solve: one chunk's s_i = inv_i (f_i + gamma_i ctx_i), with its
      outputs named `LEAF_SOLVE_OUTS`.
    leaf_adjoint: one chunk's u_i = inv_i^T rhs_i, with `LEAF_ADJOINT_OUTS`.
    row_grad: the causal dq pass after the backward loop; None when
      `rect_col` accumulates dq (atomic adds).
  """
  row_stats: RowStats
  rect_apply: RectApply
  rect_col: RectCol
  leaf_solve: Leaf
  leaf_adjoint: Leaf
  row_grad: RowGrad | None


@dataclasses.dataclass(frozen=True)
class Backend:
  """One set of Pallas kernels for the feedback solve.

  Attributes:
    kernels: the names of its kernels (the keys of a `Plan`'s tilings).
    feature_width: maps a feature width to the (padded) width the kernels
      take.
    bind: binds the kernels to one solve's `Plan`.
  """
  kernels: tuple[str, ...]
  feature_width: Callable[[int], int]
  bind: Callable[[Plan], Kernels]
