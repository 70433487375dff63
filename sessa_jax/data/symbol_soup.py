"""SymbolSoup: the Sessa paper's long-range 20-class style classification task.

An example hides two stylized letter blocks (a "left" style and a "right"
style, which together name one of 20 classes) among three uniform-noise
blocks. This module generates examples with the published generator's
distribution, reads that generator's TSV files, and writes files in the same
layout.

The distribution: each class is a pair of styles (4 left styles, 5 right
styles, each a shuffle of the 16 letters drawn from a fixed seed); a style
weights its first 4 letters 3, the next 4 2 and the rest 1, boosts preferred
letter pairs 4x, and inserts runs of 3-5 consecutive letters (motifs) with
probability 0.3; then 3% of a stylized block's letters are replaced by another
letter at random.
The total letter count M, the two stylized blocks' lengths and the three noise
blocks' lengths are drawn as `sample_lengths` says; which style comes first is
a coin flip. The file layout: a TSV with header `Text<TAB>Answer`, one example
per row, Text the five blocks as space-separated letters on their own lines
between the markers `<bos>`, `<sep1>`, `<sep2>`, `<sep1>`, `<sep2>` and a
closing line `<sep> <label>` (`blocks_to_text`), Answer a class name
`CLASS_0..CLASS_19`. `tests/assets/symbol_soup_official_train40.tsv` holds 40
examples of the published files; the tests read it. To write files:

  python -m sessa_jax.data.symbol_soup --output_dir /tmp/soup

Tokens: each special token (`<bos>`, `<sep1>`, ...) is one token and every
other character (the letters a..p, space, newline) is one token, so an example
with M letters has 2M + 13 tokens. The model reads the example and predicts the
class at the final `<label>` token, over 20 class tokens `CLASS_0..CLASS_19`.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import functools
import glob
import itertools
import math
import os
import random
import types
from typing import Mapping, Sequence

from absl import flags
import numpy as np

from sessa_jax import checks
from sessa_jax import cli
from sessa_jax.data import base

ALPHABET = "abcdefghijklmnop"
NUM_CLASSES = 20
NUM_LEFT_STYLES = 4
NUM_RIGHT_STYLES = 5
LEFT_STYLE_SEED = 123
RIGHT_STYLE_SEED = 456
CLASS_NAMES = tuple(f"CLASS_{k}" for k in range(NUM_CLASSES))
SPECIAL_TOKENS = ("<bos>", "<sep1>", "<sep2>", "<sep>", "<label>", "<eos>",
                  "[MASK]")
# id -> token name. Padding is 0; the class tokens come last.
VOCAB = (("<pad>",) + SPECIAL_TOKENS + (" ", "\n") + tuple(ALPHABET)
         + CLASS_NAMES)
TOKEN_IDS = types.MappingProxyType({t: i for i, t in enumerate(VOCAB)})
FIRST_LETTER_ID = TOKEN_IDS["a"]
FIRST_CLASS_ID = TOKEN_IDS[CLASS_NAMES[0]]
SPLIT_SIZES = {"train": 20_000, "val": 2_000, "test": 2_000}

MOTIF_PROB = 0.3
FLIP_PROB = 0.03
BIGRAM_BOOST = 4.0  # 1 + 3.0
PRIMARY_WEIGHT, SECONDARY_WEIGHT, OTHER_WEIGHT = 3.0, 2.0, 1.0
MOTIF_PRIMARY_BONUS, MOTIF_SECONDARY_BONUS = 0.9, 0.5
# Every contiguous run of 3, 4 or 5 letters of the alphabet, as letter indices.
MOTIFS = tuple(tuple(range(start, start + n)) for n in (3, 4, 5)
               for start in range(len(ALPHABET) - n + 1))


@dataclasses.dataclass(frozen=True)
class Style:
  """One style: unigram, bigram and motif weights over the 16 letters.

  Attributes:
    order: the style's shuffle of the alphabet (letter indices); the first 4
      are primaries, the next 4 secondaries.
    unigram_cdf: (16,) cumulative unigram weights.
    bigram_cdf: (16, 16) cumulative next-letter weights given the previous one.
    motif_cdf: {longest motif that fits: cumulative weights of motifs up to
      that length, in `MOTIFS` order}.
  """

  order: tuple[int, ...]
  unigram_cdf: tuple[float, ...]
  bigram_cdf: tuple[tuple[float, ...], ...]
  motif_cdf: Mapping[int, tuple[float, ...]]

  @property
  def primaries(self) -> tuple[int, ...]:
    return self.order[:4]

  @property
  def secondaries(self) -> tuple[int, ...]:
    return self.order[4:8]

  @classmethod
  def from_order(cls, order: Sequence[int]) -> Style:
    """Builds the style's weights from its shuffled alphabet."""
    prim, sec = order[:4], order[4:8]
    unigram = np.full(len(ALPHABET), OTHER_WEIGHT)
    unigram[list(prim)] = PRIMARY_WEIGHT
    unigram[list(sec)] = SECONDARY_WEIGHT
    preferred = set()
    for i in range(4):
      preferred |= {(prim[i], prim[(i + 1) % 4]), (prim[i], prim[i]),
                    (sec[i], sec[i]), (prim[i], sec[i]), (sec[i], prim[i])}
    bigram = np.tile(unigram, (len(ALPHABET), 1))
    for prev, nxt in preferred:
      bigram[prev, nxt] *= BIGRAM_BOOST
    motif_w = [1.0 + MOTIF_PRIMARY_BONUS * len(set(m) & set(prim))
               + MOTIF_SECONDARY_BONUS * len(set(m) & set(sec))
               for m in MOTIFS]
    motif_cdf = {
        longest: tuple(itertools.accumulate(
            w if len(m) <= longest else 0.0 for m, w in zip(MOTIFS, motif_w)))
        for longest in (3, 4, 5)
    }
    return cls(
        order=tuple(int(x) for x in order),
        unigram_cdf=tuple(itertools.accumulate(unigram.tolist())),
        bigram_cdf=tuple(tuple(itertools.accumulate(row))
                         for row in bigram.tolist()),
        motif_cdf=types.MappingProxyType(motif_cdf))


@functools.cache
def styles() -> tuple[tuple[Style, ...], tuple[Style, ...]]:
  """The 4 left and 5 right styles, from the published generator's seeds."""

  def family(seed: int, count: int) -> tuple[Style, ...]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
      order = list(range(len(ALPHABET)))
      rng.shuffle(order)
      out.append(Style.from_order(order))
    return tuple(out)

  return (family(LEFT_STYLE_SEED, NUM_LEFT_STYLES),
          family(RIGHT_STYLE_SEED, NUM_RIGHT_STYLES))


def class_styles(label: int) -> tuple[Style, Style]:
  """The (left, right) styles of class `label`."""
  left, right = styles()
  return left[label // NUM_RIGHT_STYLES], right[label % NUM_RIGHT_STYLES]


def _draw(cdf: Sequence[float], u: float) -> int:
  """Index drawn from cumulative weights with a uniform u in [0, 1)."""
  return min(bisect.bisect_right(cdf, u * cdf[-1]), len(cdf) - 1)


def stylized_block(style: Style, length: int,
                   rng: np.random.Generator) -> np.ndarray:
  """A block of `length` letter indices in the given style.

  Args:
    style: the style.
    length: number of letters L >= 1.
    rng: source of randomness.

  Returns:
    (L,) int array of letter indices in [0, 16).
  """
  uniforms = iter(rng.random(2 * length).tolist())
  letters: list[int] = []
  while len(letters) < length:
    left = length - len(letters)
    if left >= 3 and next(uniforms) < MOTIF_PROB:
      letters.extend(MOTIFS[_draw(style.motif_cdf[min(left, 5)],
                                  next(uniforms))])
    elif letters:
      letters.append(_draw(style.bigram_cdf[letters[-1]], next(uniforms)))
    else:
      letters.append(_draw(style.unigram_cdf, next(uniforms)))
  block = np.asarray(letters, np.int64)
  flip = rng.random(length) < FLIP_PROB
  shift = rng.integers(1, len(ALPHABET), length)
  return np.where(flip, (block + shift) % len(ALPHABET), block)


def letter_range(min_tokens: int, max_tokens: int) -> tuple[int, int]:
  """The range [lo, hi] of the total letter count M for the token bounds."""
  lo = max(5, math.ceil((min_tokens - 13) / 2))
  hi = max(5, (max_tokens - 13) // 2)
  if hi < lo or 2 * hi + 13 > max_tokens:
    raise ValueError(
        f"no SymbolSoup length 2M+13 (M >= 5) lies in [min_tokens, max_tokens]"
        f" = [{min_tokens}, {max_tokens}]")
  return lo, hi


def sample_lengths(rng: np.random.Generator, min_tokens: int,
                   max_tokens: int) -> tuple[int, int, int, int, int, int]:
  """Draws the block lengths of one example, as the published generator does.

  Args:
    rng: source of randomness.
    min_tokens: lower bound of the example's token count.
    max_tokens: upper bound of the example's token count.

  Returns:
    (M, L_left, L_right, N0, N1, N2): total letters, the two stylized blocks
    and the three noise blocks.
  """
  lo, hi = letter_range(min_tokens, max_tokens)
  total = int(rng.integers(lo, hi + 1))
  a = max(3, math.floor(0.3 * total))
  noise = int(rng.integers(a, max(a, math.floor(0.6 * total)) + 1))
  noise = min(max(noise, 3), total - 2)
  left = int(rng.integers(1, total - noise))
  right = total - noise - left
  n0 = int(rng.integers(1, noise - 1))
  n1 = int(rng.integers(1, noise - n0))
  return total, left, right, n0, n1, noise - n0 - n1


def class_of(seed: int, split: str, index: int) -> int:
  """Class of example `index`: each run of 20 indices holds every class once.

  Any prefix of a split is therefore balanced to within one example per class.
  """
  block, offset = divmod(index, NUM_CLASSES)
  perm = base.example_rng(seed, split, block, stream=1).permutation(NUM_CLASSES)
  return int(perm[offset])


def generate_letters(seed: int, split: str, index: int, min_tokens: int = 400,
                     max_tokens: int = 600) -> tuple[list[np.ndarray], int]:
  """The five letter blocks of one example, in text order, and its class.

  Returns:
    ([noise0, first, noise1, second, noise2], label), blocks as letter indices.
  """
  label = class_of(seed, split, index)
  rng = base.example_rng(seed, split, index)
  _, n_left, n_right, n0, n1, n2 = sample_lengths(rng, min_tokens, max_tokens)
  left_style, right_style = class_styles(label)
  left = stylized_block(left_style, n_left, rng)
  right = stylized_block(right_style, n_right, rng)
  first, second = (left, right) if rng.random() < 0.5 else (right, left)
  noise = [rng.integers(0, len(ALPHABET), n) for n in (n0, n1, n2)]
  return [noise[0], first, noise[1], second, noise[2]], label


def _spaced_ids(letters: np.ndarray) -> np.ndarray:
  out = np.full(2 * len(letters) - 1, TOKEN_IDS[" "], np.int32)
  out[0::2] = letters + FIRST_LETTER_ID
  return out


def blocks_to_ids(blocks: Sequence[np.ndarray]) -> np.ndarray:
  """Token ids of the text `blocks_to_text(blocks)`, without building it."""
  t = TOKEN_IDS
  nl = [t["\n"]]
  seps = ([t["<bos>"]] + nl, nl + [t["<sep1>"]] + nl, nl + [t["<sep2>"]] + nl,
          nl + [t["<sep1>"]] + nl, nl + [t["<sep2>"]] + nl)
  parts = []
  for sep, block in zip(seps, blocks):
    parts += [np.asarray(sep, np.int32), _spaced_ids(block)]
  parts.append(np.asarray(nl + [t["<sep>"], t[" "], t["<label>"]], np.int32))
  return np.concatenate(parts)


def blocks_to_text(blocks: Sequence[np.ndarray]) -> str:
  """The published text format of an example's five letter blocks."""
  lines = [" ".join(ALPHABET[i] for i in block) for block in blocks]
  return "\n".join(["<bos>", lines[0], "<sep1>", lines[1], "<sep2>", lines[2],
                    "<sep1>", lines[3], "<sep2>", lines[4], "<sep> <label>"])


def generate_text(seed: int, split: str, index: int, min_tokens: int = 400,
                  max_tokens: int = 600) -> tuple[str, str]:
  """One example in the published text format.

  Args:
    seed: generator seed.
    split: 'train', 'val' or 'test'.
    index: example index within the split.
    min_tokens: lower bound of the token count.
    max_tokens: upper bound of the token count.

  Returns:
    (text, class name such as 'CLASS_7').
  """
  blocks, label = generate_letters(seed, split, index, min_tokens, max_tokens)
  return blocks_to_text(blocks), CLASS_NAMES[label]


# Tokeniser: special tokens become private-use characters, then one table
# lookup per character.
_PRIVATE = 0xE000
_LOOKUP = np.full(_PRIVATE + len(SPECIAL_TOKENS), -1, np.int32)
for _k, _tok in enumerate(SPECIAL_TOKENS):
  _LOOKUP[_PRIVATE + _k] = TOKEN_IDS[_tok]
for _ch in " \n" + ALPHABET:
  _LOOKUP[ord(_ch)] = TOKEN_IDS[_ch]
# Longest first, so that `<sep1>` is not read as `<sep>` + `1>`.
_SUBSTITUTIONS = sorted(((tok, chr(_PRIVATE + k))
                         for k, tok in enumerate(SPECIAL_TOKENS)),
                        key=lambda s: -len(s[0]))


class TokenizeError(ValueError):
  """A character that is neither a special token nor in the vocabulary."""

  def __init__(self, char: str, line: int, column: int):
    super().__init__(f"line {line + 1} of the text, column {column + 1}: "
                     f"character {char!r} is not a SymbolSoup token")
    self.line = line


def tokenize(text: str) -> np.ndarray:
  """Token ids of a SymbolSoup text.

  Args:
    text: text in the published format.

  Returns:
    (L,) int32 token ids.

  Raises:
    TokenizeError: naming the line (0-based in `.line`) and column of the
      first character that is not a token.
  """
  # A private-use character already in the text is not a token.
  literal = any(ch in text for _, ch in _SUBSTITUTIONS)
  marked = text
  if not literal:
    for tok, ch in _SUBSTITUTIONS:
      marked = marked.replace(tok, ch)
  codes = np.frombuffer(marked.encode("utf-32-le"), np.uint32)
  ids = _LOOKUP[np.minimum(codes, len(_LOOKUP) - 1)]
  ids[codes >= (_PRIVATE if literal else len(_LOOKUP))] = -1
  bad = np.flatnonzero(ids < 0)
  if bad.size:
    pos = int(bad[0])
    line = marked.count("\n", 0, pos)
    column = pos - (marked.rfind("\n", 0, pos) + 1)
    raise TokenizeError(marked[pos], line, column)
  return ids


def detokenize(ids: Sequence[int]) -> str:
  """The text of token ids (inverse of `tokenize`)."""
  return "".join(VOCAB[int(i)] for i in ids)


def read_tsv(path: str) -> tuple[list[np.ndarray], np.ndarray]:
  """Reads and tokenises a TSV file of the published generator.

  Args:
    path: file with header `Text<TAB>Answer`, written by Python's csv module.

  Returns:
    (token ids per example, (N,) int32 class labels).

  Raises:
    ValueError: naming the file and line of bytes that are not UTF-8, a
      missing column, a wrong field count, a field over the csv module's
      limit, an unknown class name or an empty or untokenisable text.
  """
  try:
    return _read_tsv(path)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}, line {_undecodable_line(path)}: not UTF-8 "
                     f"({e.reason})") from None


def _undecodable_line(path: str) -> int:
  """The 1-based number of the first line of `path` that is not UTF-8."""
  with open(path, "rb") as f:
    for number, line in enumerate(f, start=1):
      try:
        line.decode("utf-8")
      except UnicodeDecodeError:
        return number
  return number


def _read_tsv(path: str) -> tuple[list[np.ndarray], np.ndarray]:
  """`read_tsv` but for undecodable bytes."""
  examples, labels = [], []
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.reader(f, delimiter="\t")
    header = next(reader, None)
    if header is None:
      raise ValueError(f"{path}: empty file, expected header Text<TAB>Answer")
    for column in ("Text", "Answer"):
      if column not in header:
        raise ValueError(
            f"{path}, line 1: missing column {column!r}; header is {header}")
    text_col, answer_col = header.index("Text"), header.index("Answer")
    start = reader.line_num + 1
    for row in _rows(reader, path):
      where = f"{path}, line {start}"
      if len(row) != len(header):
        raise ValueError(
            f"{where}: {len(row)} fields, expected {len(header)} ({header})")
      answer = row[answer_col]
      if answer not in CLASS_NAMES:
        raise ValueError(
            f"{where}: unknown class {answer!r}; choices: CLASS_0 .. "
            f"CLASS_{NUM_CLASSES - 1}")
      if not row[text_col]:
        raise ValueError(f"{where}: empty Text field")
      try:
        examples.append(tokenize(row[text_col]))
      except TokenizeError as e:
        raise ValueError(
            f"{path}, line {start + e.line}: {e}") from None
      labels.append(CLASS_NAMES.index(answer))
      start = reader.line_num + 1
  return examples, np.asarray(labels, np.int32)


def _rows(reader, path: str):
  """The rows of a csv reader; its errors (a field over the limit) name the
  file and line."""
  while True:
    try:
      yield next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      raise ValueError(f"{path}, line {reader.line_num}: {e}") from None


def write_tsv(path: str, rows: Sequence[tuple[str, str]]) -> None:
  """Writes (text, class name) rows in the published layout."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, delimiter="\t")
    writer.writerow(["Text", "Answer"])
    writer.writerows(rows)


def split_files(path: str) -> dict[str, str]:
  """The TSV file of each split under `path` (a file serves every split)."""
  if os.path.isfile(path):
    return {split: path for split in base.SPLITS}
  if not os.path.isdir(path):
    raise ValueError(
        f"data.path {path!r} is neither a TSV file nor a directory")
  files = {}
  for split in base.SPLITS:
    pattern = os.path.join(path, f"*_{split}.tsv")
    matches = sorted(glob.glob(pattern))
    if len(matches) != 1:
      raise ValueError(
          f"data.path: expected one file matching {pattern!r}, found "
          f"{len(matches)}: {matches}")
    files[split] = matches[0]
  return files


@dataclasses.dataclass(frozen=True)
class SymbolSoupConfig(base.TaskConfig):
  """Knobs of SymbolSoup.

  Attributes:
    path: empty to generate examples; else a TSV file (serving every split) or
      a directory with one `*_train.tsv`, `*_val.tsv` and `*_test.tsv`.
    min_tokens: lower bound of a generated example's length.
    max_tokens: upper bound of a generated example's length.
    num_train: generated train examples.
    num_val: generated val examples.
    num_test: generated test examples.
  """

  seq_len: int = 600
  min_tokens: int = 400
  max_tokens: int = 600
  num_train: int = SPLIT_SIZES["train"]
  num_val: int = SPLIT_SIZES["val"]
  num_test: int = SPLIT_SIZES["test"]


class SymbolSoup(base.Task):
  """20-way style classification, predicted at the `<label>` token."""

  name = "symbol_soup"
  Config = SymbolSoupConfig
  path_use = "optional"

  def __init__(self, cfg: SymbolSoupConfig):
    super().__init__(cfg)
    self._files: dict[str, tuple[list[np.ndarray], np.ndarray]] = {}
    if cfg.path:
      for split, path in split_files(cfg.path).items():
        self._files[split] = read_tsv(path)
        longest = max((len(x) for x in self._files[split][0]), default=0)
        base.pad(np.zeros(longest), cfg.seq_len,
                 f"the longest example of {path}")
    else:
      checks.at_least("data", cfg, [f"num_{split}" for split in base.SPLITS])
      _, hi = letter_range(cfg.min_tokens, cfg.max_tokens)
      base.pad(np.zeros(2 * hi + 13), cfg.seq_len,
               f"with max_tokens={cfg.max_tokens} the longest example")

  @property
  def vocab_size(self) -> int:
    return len(VOCAB)

  @property
  def special_tokens(self) -> Mapping[str, int]:
    return types.MappingProxyType(
        {t: TOKEN_IDS[t] for t in ("<pad>",) + SPECIAL_TOKENS + CLASS_NAMES})

  def num_examples(self, split: str) -> int:
    base.check_split(split)
    if self._files:
      return len(self._files[split][1])
    return getattr(self.cfg, f"num_{split}")

  def tokens(self, split: str, index: int) -> tuple[np.ndarray, int]:
    """(token ids, class index) of one example."""
    base.check_index(split, index, self.num_examples(split))
    if self._files:
      ids, labels = self._files[split]
      return ids[index], int(labels[index])
    blocks, label = generate_letters(self.cfg.seed, split, index,
                                     self.cfg.min_tokens, self.cfg.max_tokens)
    return blocks_to_ids(blocks), label

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    ids, label = self.tokens(split, index)
    inputs = base.pad(ids, self.seq_len)
    targets = np.zeros(self.seq_len, np.int32)
    loss_mask = np.zeros(self.seq_len, np.float32)
    targets[len(ids) - 1] = FIRST_CLASS_ID + label
    loss_mask[len(ids) - 1] = 1.0
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


def _define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("output_dir", None, "where the TSV files are written",
                      flag_values=fv)
  flags.mark_flag_as_required("output_dir", flag_values=fv)
  flags.DEFINE_string("prefix", "symbol_soup", "file name prefix",
                      flag_values=fv)
  flags.DEFINE_integer("seed", 0, "generator seed", flag_values=fv)
  flags.DEFINE_integer("min_tokens", 400, "fewest tokens in an example",
                       flag_values=fv)
  flags.DEFINE_integer("max_tokens", 600, "most tokens in an example",
                       flag_values=fv)
  for split, size in SPLIT_SIZES.items():
    flags.DEFINE_integer(f"num_{split}", size, f"{split} examples",
                         flag_values=fv)


def main(argv: Sequence[str] | None = None) -> None:
  args, _ = cli.parse(argv, _define_flags,
                      "Write SymbolSoup TSV files in the published layout.")
  letter_range(args.min_tokens, args.max_tokens)
  os.makedirs(args.output_dir, exist_ok=True)
  for split in base.SPLITS:
    path = os.path.join(args.output_dir, f"{args.prefix}_{split}.tsv")
    rows = [generate_text(args.seed, split, i, args.min_tokens,
                          args.max_tokens)
            for i in range(getattr(args, f"num_{split}"))]
    write_tsv(path, rows)
    print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
  main()
