"""Diffuse MQAR: associative recall across a long block of near-miss keys.

Token layout of one example (w = key_len + 1 tokens per pair):

  <bos> | P pairs k_1..k_L v | <sep> | noise of n tokens | <sep> | Q queries

The memory holds P pairs with distinct multi-token keys. The noise mixes
filler tokens with distractor pairs whose key repeats the first L-1 tokens of a
real key but ends differently (never a whole real key) followed by a random
value. Each query repeats a real key and its value; the model must produce the
value at the query's last key token. The lag of a query is the distance from
its pair's value in memory to its own value; it grows with the noise length n,
which is drawn so that train/val lags lie in [min_lag, max_lag] and test lags
in [min_lag, test_lag_multiplier * max_lag]. `lag` records it per position.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Mapping

import numpy as np

from sessa_jax import checks
from sessa_jax.data import base

BOS_ID, SEP_ID = 1, 2
FIRST_KEY_ID = 3


@dataclasses.dataclass(frozen=True)
class DiffuseMQARConfig(base.GeneratedTaskConfig):
  """Knobs of diffuse MQAR (defaults: small enough to learn on a CPU).

  Attributes:
    num_pairs: P key-value pairs in the memory block.
    num_queries: Q queries, over distinct pairs; 0 queries every pair.
    key_len: L tokens per key (>= 2, so distractors can share a prefix).
    key_vocab: distinct key tokens (> num_pairs).
    value_vocab: distinct value tokens.
    filler_vocab: distinct filler tokens of the noise block.
    distractor_frac: fraction of noise tokens that belong to distractor pairs.
    min_lag: smallest lag of a query.
    max_lag: largest lag of a query in train and val.
    test_lag_multiplier: test lags reach test_lag_multiplier * max_lag.
  """

  seq_len: int = 256
  num_pairs: int = 4
  num_queries: int = 0
  key_len: int = 2
  key_vocab: int = 16
  value_vocab: int = 16
  filler_vocab: int = 4
  distractor_frac: float = 0.5
  min_lag: int = 8
  max_lag: int = 48
  test_lag_multiplier: int = 4


class DiffuseMQAR(base.Task):
  """Associative recall with diffuse distractors; accuracy on value tokens."""

  name = "diffuse_mqar"
  Config = DiffuseMQARConfig
  positive_keys = ("num_pairs", "value_vocab", "filler_vocab", "min_lag",
                   "test_lag_multiplier", "num_train", "num_val", "num_test")

  def __init__(self, cfg: DiffuseMQARConfig):
    super().__init__(cfg)
    checks.at_least("data", cfg, ("key_len",), minimum=2)
    checks.at_least("data", cfg, ("key_vocab",), minimum=cfg.num_pairs + 1)
    if not 0 <= cfg.num_queries <= cfg.num_pairs:
      raise ValueError(
          f"data.num_queries must be in [0, num_pairs={cfg.num_pairs}], got "
          f"{cfg.num_queries}")
    if not 0.0 <= cfg.distractor_frac <= 1.0:
      raise ValueError(
          f"data.distractor_frac must be in [0, 1], got {cfg.distractor_frac}")
    width = cfg.key_len + 1
    self._num_queries = cfg.num_queries or cfg.num_pairs
    # Lag of query j on pair i with n noise tokens: 2 + P w + n + (j - i) w.
    shortest = 2 + width
    longest = 2 + (cfg.num_pairs + self._num_queries - 1) * width
    self._noise_lo = max(0, cfg.min_lag - shortest)
    noise_hi = cfg.max_lag - longest
    if noise_hi < self._noise_lo or cfg.max_lag < cfg.min_lag:
      raise ValueError(
          f"data.max_lag={cfg.max_lag} is too small: with {cfg.num_pairs} "
          f"pairs, {self._num_queries} queries and key_len={cfg.key_len}, "
          f"lags span at least [{max(cfg.min_lag, shortest)}, {longest}] for "
          f"min_lag={cfg.min_lag}")
    self._noise_hi = {
        "train": noise_hi, "val": noise_hi,
        "test": cfg.test_lag_multiplier * cfg.max_lag - longest}
    base.pad(np.zeros(self._length(self._noise_hi["test"]) - 1), cfg.seq_len,
             "the longest test example")
    self._first_value_id = FIRST_KEY_ID + cfg.key_vocab
    self._first_filler_id = self._first_value_id + cfg.value_vocab

  def _length(self, noise: int) -> int:
    width = self.cfg.key_len + 1
    return 3 + (self.cfg.num_pairs + self._num_queries) * width + noise

  @property
  def vocab_size(self) -> int:
    return self._first_filler_id + self.cfg.filler_vocab

  @property
  def special_tokens(self) -> Mapping[str, int]:
    return types.MappingProxyType(
        {"<pad>": base.PAD_ID, "<bos>": BOS_ID, "<sep>": SEP_ID})

  def lag_range(self, split: str) -> tuple[int, int]:
    """The smallest and largest lag a query of `split` can have."""
    width = self.cfg.key_len + 1
    return (2 + width + self._noise_lo,
            2 + (self.cfg.num_pairs + self._num_queries - 1) * width
            + self._noise_hi[split])

  def num_examples(self, split: str) -> int:
    base.check_split(split)
    return getattr(self.cfg, f"num_{split}")

  def sequence(self, split: str, index: int):
    """The token sequence of one example, before shifting into inputs/targets.

    Returns:
      (tokens, answer, lag): (N,) int32 tokens; (N,) bool marking query value
      tokens; (N,) int32 lag at those tokens, 0 elsewhere.
    """
    base.check_index(split, index, self.num_examples(split))
    cfg = self.cfg
    rng = base.example_rng(cfg.seed, split, index)
    num_pairs, key_len, width = cfg.num_pairs, cfg.key_len, cfg.key_len + 1

    flat = rng.choice(cfg.key_vocab**key_len, num_pairs, replace=False)
    keys = np.stack(np.unravel_index(flat, (cfg.key_vocab,) * key_len), -1)
    values = rng.integers(0, cfg.value_vocab, num_pairs)
    noise_len = int(rng.integers(self._noise_lo, self._noise_hi[split] + 1))
    num_distractors = int(cfg.distractor_frac * noise_len) // width
    num_items = noise_len - num_distractors * (width - 1)
    is_pair = np.zeros(num_items, bool)
    is_pair[rng.choice(num_items, num_distractors, replace=False)] = True
    owners = rng.integers(0, num_pairs, num_distractors)
    lasts = rng.random(num_distractors)
    fake_values = rng.integers(0, cfg.value_vocab, num_distractors)
    fillers = rng.integers(0, cfg.filler_vocab, num_items)
    asked = rng.permutation(num_pairs)[:self._num_queries]

    memory = np.concatenate([keys + FIRST_KEY_ID,
                             values[:, None] + self._first_value_id], 1)
    # A distractor copies its owner's key prefix, ends in a token that no real
    # key with that prefix ends in, and has a random value.
    distractors = np.empty((num_distractors, width), np.int64)
    distractors[:, :key_len - 1] = keys[owners, :-1] + FIRST_KEY_ID
    for pair in range(num_pairs):
      mine = owners == pair
      is_free = np.ones(cfg.key_vocab, bool)
      is_free[keys[(keys[:, :-1] == keys[pair, :-1]).all(1), -1]] = False
      free = np.flatnonzero(is_free)
      last = free[(lasts[mine] * len(free)).astype(np.int64)]
      distractors[mine, key_len - 1] = last + FIRST_KEY_ID
    distractors[:, key_len] = fake_values + self._first_value_id
    sizes = np.where(is_pair, width, 1)
    starts = np.cumsum(sizes) - sizes
    noise = np.empty(noise_len, np.int64)
    noise[starts[~is_pair]] = fillers[~is_pair] + self._first_filler_id
    for t in range(width):
      noise[starts[is_pair] + t] = distractors[:, t]
    tokens = np.concatenate(
        [[BOS_ID], memory.reshape(-1), [SEP_ID], noise, [SEP_ID],
         memory[asked].reshape(-1)]).astype(np.int32)
    answer = np.zeros(len(tokens), bool)
    lag = np.zeros(len(tokens), np.int32)
    query_values = (len(tokens) - self._num_queries * width + key_len
                    + width * np.arange(self._num_queries))
    answer[query_values] = True
    lag[query_values] = query_values - (1 + key_len + width * asked)
    return tokens, answer, lag

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    tokens, answer, lag = self.sequence(split, index)
    return base.lm_example(tokens, self.seq_len, answer, lag)
