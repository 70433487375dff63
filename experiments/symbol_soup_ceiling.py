r"""What SymbolSoup rewards at a given example length: reference classifiers.

  python experiments/symbol_soup_ceiling.py --lengths=110:160,250:350,400:600

Four classifiers that are not trained but read each style's letter
statistics (estimated from 400 generated blocks per style) form a ladder of
what a model must learn to reach a given test accuracy:

  pooled_all      unigram counts of every letter of the example, stylized or
                  noise, scored under each (left, right) pair's mixture with
                  uniform noise. Needs no notion of where the blocks are.
  pooled_blocks   unigram counts of the two stylized blocks together (they
                  sit between `<sep1>` and `<sep2>`), scored under the pair's
                  mixture. Needs to tell stylized blocks from noise.
  per_block       unigram counts of each stylized block apart, the pair (in
                  either block order) of highest likelihood. Needs to keep
                  the two blocks apart as well.
  per_block_bigram  as per_block with bigram counts. A rough ceiling for a
                  model that reads letter pairs (it ignores the generator's
                  motifs, so the Bayes accuracy is somewhat higher).

Shorter examples hold fewer stylized letters, so every rung falls with the
length range; a study whose models should reach some accuracy needs examples
long enough for it, and a model's accuracy between two rungs says which
structure it has learned at least in part.
"""

from __future__ import annotations

from typing import Sequence

from absl import flags
import numpy as np

from sessa_jax import cli
from sessa_jax.data import symbol_soup

NUM_LETTERS = len(symbol_soup.ALPHABET)
START = NUM_LETTERS  # The "previous letter" of a block's first letter.
CLASSIFIERS = ("pooled_all", "pooled_blocks", "per_block", "per_block_bigram")


def bigram_counts(block: np.ndarray) -> np.ndarray:
  """(17, 16) counts of (previous letter or START, letter) in one block."""
  counts = np.zeros((NUM_LETTERS + 1, NUM_LETTERS))
  np.add.at(counts, (np.concatenate([[START], block[:-1]]), block), 1.0)
  return counts


def style_log_probs(style: symbol_soup.Style, rng: np.random.Generator,
                    blocks: int = 400, length: int = 40
                   ) -> tuple[np.ndarray, np.ndarray]:
  """A style's log unigram (16,) and bigram (17, 16) probabilities.

  Both are add-one smoothed counts over `blocks` generated blocks.
  """
  counts = np.ones((NUM_LETTERS + 1, NUM_LETTERS))
  for _ in range(blocks):
    counts += bigram_counts(symbol_soup.stylized_block(style, length, rng))
  unigram = counts[:NUM_LETTERS].sum(0)
  return (np.log(unigram / unigram.sum()),
          np.log(counts / counts.sum(1, keepdims=True)))


def _pair_scores(left: np.ndarray, right: np.ndarray, a: np.ndarray,
                 b: np.ndarray) -> np.ndarray:
  """(4, 5) log-likelihoods of blocks (a, b) under each (left, right) pair,
  in whichever block order scores higher."""

  def score(lp, c):
    return (lp * c).reshape(len(lp), -1).sum(1)

  return np.maximum(score(left, a)[:, None] + score(right, b)[None],
                    score(left, b)[:, None] + score(right, a)[None])


def _mixture_scores(left: np.ndarray, right: np.ndarray, counts: np.ndarray,
                    noise: float) -> np.ndarray:
  """(4, 5) log-likelihoods of unigram `counts` under each pair's mixture:
  the two styles in equal parts, plus a `noise` share of uniform letters."""
  p = ((1 - noise) * 0.5 * (np.exp(left)[:, None] + np.exp(right)[None])
       + noise / NUM_LETTERS)
  return (np.log(p) * counts).sum(-1)


def accuracies(min_tokens: int, max_tokens: int, num_examples: int = 1000,
               seed: int = 0) -> dict[str, float]:
  """Test accuracy of each reference classifier (module docstring)."""
  rng = np.random.default_rng(seed)
  (left_uni, left_bi), (right_uni, right_bi) = (
      tuple(np.stack(x) for x in zip(*(style_log_probs(s, rng) for s in fam)))
      for fam in symbol_soup.styles())
  correct = dict.fromkeys(CLASSIFIERS, 0)
  for index in range(num_examples):
    blocks, label = symbol_soup.generate_letters(
        seed, "test", index, min_tokens, max_tokens)
    uni = [np.bincount(b, minlength=NUM_LETTERS) for b in blocks]
    stylized = uni[1] + uni[3]
    noise_share = 1 - stylized.sum() / sum(u.sum() for u in uni)
    scores = {
        "pooled_all": _mixture_scores(left_uni, right_uni, sum(uni),
                                      noise_share),
        "pooled_blocks": _mixture_scores(left_uni, right_uni, stylized, 0.0),
        "per_block": _pair_scores(left_uni, right_uni, uni[1], uni[3]),
        "per_block_bigram": _pair_scores(left_bi, right_bi,
                                         bigram_counts(blocks[1]),
                                         bigram_counts(blocks[3])),
    }
    for name, s in scores.items():  # class = 5 * left + right
      correct[name] += int(np.argmax(s)) == label
  return {name: c / num_examples for name, c in correct.items()}


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("lengths", "110:160,250:350,400:600",
                      "comma-separated MIN:MAX token ranges", flag_values=fv)
  flags.DEFINE_integer("num_examples", 1000, "test examples per length range",
                       flag_values=fv)


def main(argv: Sequence[str] | None = None) -> None:
  args, _ = cli.parse(argv, _define_flags, __doc__.split("\n\n")[0])
  print("| tokens | " + " | ".join(CLASSIFIERS) + " |")
  print("|---" * (len(CLASSIFIERS) + 1) + "|")
  for spec in args.lengths.split(","):
    lo, hi = (int(x) for x in spec.split(":"))
    acc = accuracies(lo, hi, args.num_examples)
    print(f"| {lo}..{hi} | "
          + " | ".join(f"{acc[c]:.3f}" for c in CLASSIFIERS) + " |")
  print("(test accuracy of each reference classifier; chance 0.05)")


if __name__ == "__main__":
  main()
