r"""How well SymbolSoup can be solved at a given example length, without training.

  python experiments/symbol_soup_ceiling.py --lengths=110:160,250:350,400:600

A reference classifier that is told which two letter blocks are stylized (in
the token stream they sit between `<sep1>` and `<sep2>`) scores each block
under every style's bigram table (estimated from 400 generated blocks per
style) and picks the (left style, right style) pair, in either block order,
of highest likelihood. Its test accuracy is a rough ceiling for a model that
reads bigram statistics: shorter examples hold fewer stylized letters, so
the ceiling falls with the length range, and a study whose models should
reach some accuracy needs examples long enough for it. (It ignores the
generator's motifs, so the true Bayes accuracy is somewhat higher.)
"""

from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from sessa_jax.data import symbol_soup

NUM_LETTERS = len(symbol_soup.ALPHABET)
START = NUM_LETTERS  # The "previous letter" of a block's first letter.


def bigram_counts(block: np.ndarray) -> np.ndarray:
  """(17, 16) counts of (previous letter or START, letter) in one block."""
  counts = np.zeros((NUM_LETTERS + 1, NUM_LETTERS))
  np.add.at(counts, (np.concatenate([[START], block[:-1]]), block), 1.0)
  return counts


def style_log_probs(style: symbol_soup.Style, rng: np.random.Generator,
                    blocks: int = 400, length: int = 40) -> np.ndarray:
  """(17, 16) log bigram probabilities of a style, add-one smoothed."""
  counts = np.ones((NUM_LETTERS + 1, NUM_LETTERS))
  for _ in range(blocks):
    counts += bigram_counts(symbol_soup.stylized_block(style, length, rng))
  return np.log(counts / counts.sum(1, keepdims=True))


def ceiling(min_tokens: int, max_tokens: int, num_examples: int = 1000,
            seed: int = 0) -> float:
  """Test accuracy of the reference classifier (module docstring)."""
  rng = np.random.default_rng(seed)
  left, right = symbol_soup.styles()
  left_lp = np.stack([style_log_probs(s, rng) for s in left])     # (4, 17, 16)
  right_lp = np.stack([style_log_probs(s, rng) for s in right])   # (5, 17, 16)
  correct = 0
  for index in range(num_examples):
    blocks, label = symbol_soup.generate_letters(
        seed, "test", index, min_tokens, max_tokens)
    a, b = bigram_counts(blocks[1]), bigram_counts(blocks[3])
    score = lambda lp, c: (lp * c).sum((1, 2))  # pylint: disable=g-long-lambda
    scores = np.maximum(score(left_lp, a)[:, None] + score(right_lp, b)[None],
                        score(left_lp, b)[:, None] + score(right_lp, a)[None])
    correct += int(np.argmax(scores)) == label  # class = 5 * left + right
  return correct / num_examples


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lengths", default="110:160,250:350,400:600",
                      help="comma-separated MIN:MAX token ranges")
  parser.add_argument("--num_examples", type=int, default=1000)
  args = parser.parse_args(argv)
  for spec in args.lengths.split(","):
    lo, hi = (int(x) for x in spec.split(":"))
    print(f"{lo}..{hi} tokens: reference accuracy "
          f"{ceiling(lo, hi, args.num_examples):.3f} (chance 0.05)")


if __name__ == "__main__":
  main()
