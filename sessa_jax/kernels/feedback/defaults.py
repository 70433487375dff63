"""The feedback solve's defaults: chunk size and logit scale, one home each."""

from __future__ import annotations

import jax

# Rows per chunk of the blocked feedback solves (diagonal blocks solved
# directly; the chunked solve's step, the Pallas solve's loop leaves).
DEFAULT_CHUNK = 256


def resolve_chunk(chunk: int | None) -> int:
  """`chunk`, or `DEFAULT_CHUNK` for None; raises if it is below 1."""
  chunk = DEFAULT_CHUNK if chunk is None else int(chunk)
  if chunk < 1:
    raise ValueError(f"feedback_solve chunk must be >= 1, got {chunk}")
  return chunk


def resolve_scale(scale: float | None, q_btk: jax.Array) -> float:
  """`scale`, or K ** -0.5 for None (K the width of the queries q_btk)."""
  return q_btk.shape[-1] ** -0.5 if scale is None else scale
