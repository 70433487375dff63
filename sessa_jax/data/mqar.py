"""Multi-query associative recall (MQAR), as in Zoology (Arora et al., 2023).

An example of length T + 1 starts with P key-value pairs `k1 v1 k2 v2 ...`,
keys drawn without replacement from [1, V/2) and values from [V/2, V). The rest
holds one query per key, each key at an even offset chosen with a power law
that favours short gaps; the model must predict the key's value at the query
position. Other positions hold random tokens (or 0). Inputs are the first T
tokens; targets are the values at query positions, loss nowhere else.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sessa_jax.data import base


@dataclasses.dataclass(frozen=True)
class MQARConfig(base.GeneratedTaskConfig):
  """Knobs of MQAR (defaults: a small task that trains in minutes on CPU).

  Attributes:
    vocab_size: V; keys come from [1, V/2), values from [V/2, V).
    num_kv_pairs: P pairs per example, each queried once.
    power_a: exponent a of the power law p(gap) ~ gap^(a-1) of query gaps.
    random_non_queries: fill non-query positions with random tokens, else 0.
  """

  seq_len: int = 128
  vocab_size: int = 64
  num_kv_pairs: int = 8
  power_a: float = 0.01
  random_non_queries: bool = True


class MQAR(base.Task):
  """Zoology's multi-query associative recall."""

  name = "mqar"
  Config = MQARConfig
  positive_keys = ("num_kv_pairs", "num_train", "num_val", "num_test")

  def __init__(self, cfg: MQARConfig):
    super().__init__(cfg)
    if cfg.power_a <= 0:
      raise ValueError(f"data.power_a must be > 0, got {cfg.power_a}")
    half = cfg.vocab_size // 2
    if half - 1 < cfg.num_kv_pairs:
      raise ValueError(
          f"data.vocab_size={cfg.vocab_size} gives {half - 1} key tokens, "
          f"fewer than data.num_kv_pairs={cfg.num_kv_pairs}")
    context = 2 * cfg.num_kv_pairs
    self._num_slots = (cfg.seq_len - context) // 2
    if self._num_slots < cfg.num_kv_pairs:
      raise ValueError(
          f"an MQAR example with {cfg.num_kv_pairs} pairs and their queries "
          f"needs at least {4 * cfg.num_kv_pairs} tokens, longer than "
          f"data.seq_len={cfg.seq_len}")
    gaps = np.arange(1, self._num_slots + 1, dtype=np.float64)
    p = cfg.power_a * gaps**(cfg.power_a - 1)
    self._gap_p = p / p.sum()

  @property
  def vocab_size(self) -> int:
    return self.cfg.vocab_size

  def num_examples(self, split: str) -> int:
    return getattr(self.cfg, f"num_{split}")

  def example(self, split: str, index: int) -> dict[str, np.ndarray]:
    base.check_index(split, index, self.num_examples(split))
    cfg = self.cfg
    rng = base.example_rng(cfg.seed, split, index)
    num_pairs, seq_len = cfg.num_kv_pairs, cfg.seq_len
    half = cfg.vocab_size // 2
    context = 2 * num_pairs
    keys = rng.choice(np.arange(1, half), num_pairs, replace=False)
    values = rng.choice(np.arange(half, cfg.vocab_size), num_pairs,
                        replace=False)
    slots = rng.choice(self._num_slots, num_pairs, replace=False, p=self._gap_p)

    inputs = np.zeros(seq_len, np.int32)
    inputs[0:context:2] = keys
    inputs[1:context:2] = values
    query_pos = context + 2 * slots
    inputs[query_pos] = keys
    if cfg.random_non_queries:
      empty = inputs == 0
      inputs[empty] = rng.integers(0, cfg.vocab_size, int(empty.sum()))
    targets = np.zeros(seq_len, np.int32)
    targets[query_pos] = values
    loss_mask = np.zeros(seq_len, np.float32)
    loss_mask[query_pos] = 1.0
    lag = np.zeros(seq_len, np.int32)
    lag[query_pos] = query_pos - 2 * np.arange(num_pairs)
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
            "lag": lag}
