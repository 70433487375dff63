"""One look per model across every figure of a study.

Each mixer keeps its colour in every plot (learning curves, accuracy against
lag, memory tails); Sessa without its feedback branch is drawn dashed with
hollow markers, so it stays visible where it coincides with attention; a
hybrid stack or any other label gets a colour of its own from the rest of the
palette, the same one in every figure.
"""

from __future__ import annotations

import zlib
from typing import Any

from sessa_jax.models import mixers

# Colours of the registered mixers, in registration order (sessa blue,
# attention orange, mamba2 green); a mixer past these takes a spare colour.
MIXER_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")
# Colours no mixer above uses, for hybrids and other labels.
SPARE_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive",
                "tab:cyan", "tab:gray")
ABLATION_SUFFIX = " (no feedback)"
# Line styles of successive layers of one model (memory-tail impulses).
LAYER_STYLES = ((0, (1, 1.5)), (0, (4, 1.5, 1, 1.5)), (0, (6, 2)),
                (0, (2, 1, 2, 3)))
LAYER_MARKERS = ("v", "^", "s", "D")


def color(label: str) -> str:
  """The colour of a row label such as 'sessa', 'sessa (no feedback)'."""
  base = label.split(" ")[0]
  order = mixers.names()
  if base in order and order.index(base) < len(MIXER_COLORS):
    return MIXER_COLORS[order.index(base)]
  return SPARE_COLORS[zlib.crc32(base.encode()) % len(SPARE_COLORS)]


def line_style(label: str) -> dict[str, Any]:
  """Matplotlib keyword arguments for the line of one model."""
  if ABLATION_SUFFIX in label:
    return dict(color=color(label), ls="--", marker="o", mfc="none", lw=1.6)
  return dict(color=color(label), ls="-")


def layer_style(layer: int) -> dict[str, Any]:
  """Line style and marker of layer `layer` (cycled past the table)."""
  return dict(ls=LAYER_STYLES[layer % len(LAYER_STYLES)],
              marker=LAYER_MARKERS[layer % len(LAYER_MARKERS)], ms=3)
