"""Tests of the diffuse MQAR task."""

import numpy as np
import pytest

from sessa_jax import data
from sessa_jax.data import diffuse_mqar as dm


def _parse(task, tokens):
  """Splits a token sequence into memory pairs, noise and query pairs."""
  cfg = task.cfg
  width = cfg.key_len + 1
  seps = np.flatnonzero(tokens == dm.SEP_ID)
  assert tokens[0] == dm.BOS_ID and len(seps) == 2
  memory = tokens[1:seps[0]].reshape(-1, width)
  queries = tokens[seps[1] + 1:].reshape(-1, width)
  return memory, tokens[seps[0] + 1:seps[1]], queries, seps[1] + 1


@pytest.mark.parametrize("knobs", [
    {},
    {"num_pairs": 6, "num_queries": 3, "key_len": 3, "key_vocab": 8,
     "distractor_frac": 0.9, "seq_len": 400},
])
def test_queries_answer_with_their_memory_value(knobs):
  task = data.get_task({"task": "diffuse_mqar", **knobs})
  cfg = task.cfg
  width = cfg.key_len + 1
  first_value = dm.FIRST_KEY_ID + cfg.key_vocab
  for split in ("train", "test"):
    for index in range(60):
      tokens, answer, lag = task.sequence(split, index)
      memory, noise, queries, query_start = _parse(task, tokens)
      assert len(memory) == cfg.num_pairs
      keys = [tuple(m[:-1]) for m in memory]
      assert len(set(keys)) == cfg.num_pairs
      lookup = {tuple(m[:-1]): (i, m[-1]) for i, m in enumerate(memory)}
      assert len(queries) == (cfg.num_queries or cfg.num_pairs)
      for j, query in enumerate(queries):
        pair, value = lookup[tuple(query[:-1])]
        assert query[-1] == value
        pos = query_start + j * width + cfg.key_len
        assert answer[pos]
        assert lag[pos] == pos - (1 + pair * width + cfg.key_len)
      assert answer.sum() == len(queries)
      # Distractors: a real key's prefix, a different last token, a value.
      is_key = (noise >= dm.FIRST_KEY_ID) & (noise < first_value)
      starts = [i for i in range(len(noise))
                if is_key[i] and (i == 0 or not is_key[i - 1])]
      for s in starts:
        d_key = tuple(noise[s:s + cfg.key_len])
        assert is_key[s:s + cfg.key_len].all() and len(d_key) == cfg.key_len
        assert noise[s + cfg.key_len] >= first_value
        assert d_key not in lookup
        assert any(d_key[:-1] == k[:-1] for k in keys)
      if cfg.distractor_frac > 0.5 and len(noise) > 20:
        assert starts


def test_examples_shift_tokens_and_mask_answers():
  task = data.get_task({"task": "diffuse_mqar"})
  tokens, answer, lag = task.sequence("val", 3)
  ex = task.example("val", 3)
  n = len(tokens) - 1
  np.testing.assert_array_equal(ex["inputs"][:n], tokens[:-1])
  np.testing.assert_array_equal(ex["targets"][:n], tokens[1:])
  np.testing.assert_array_equal(ex["loss_mask"][:n], answer[1:])
  np.testing.assert_array_equal(ex["lag"][:n], lag[1:])
  assert not ex["loss_mask"][n:].any() and not ex["inputs"][n:].any()
  assert ex["inputs"].shape == (256,)


def test_test_lags_exceed_train_lags_up_to_4x():
  task = data.get_task({"task": "diffuse_mqar"})
  lags = {}
  for split in ("train", "test"):
    ls = [task.example(split, i)["lag"] for i in range(300)]
    lags[split] = np.concatenate([x[x > 0] for x in ls])
  cfg = task.cfg
  assert lags["train"].min() >= cfg.min_lag
  assert lags["train"].max() <= cfg.max_lag
  assert lags["train"].max() > 0.8 * cfg.max_lag
  assert lags["test"].max() <= 4 * cfg.max_lag
  assert lags["test"].max() > 3.5 * cfg.max_lag
  assert (lags["test"] > cfg.max_lag).mean() > 0.5
  assert task.lag_range("test") == (cfg.min_lag, 4 * cfg.max_lag)


def test_vocabulary_layout():
  task = data.get_task({"task": "diffuse_mqar", "key_vocab": 10,
                        "value_vocab": 7, "filler_vocab": 2})
  assert task.vocab_size == 3 + 10 + 7 + 2
  assert task.special_tokens["<bos>"] == dm.BOS_ID
  tokens = np.concatenate([task.sequence("train", i)[0] for i in range(20)])
  assert tokens.max() < task.vocab_size and tokens.min() >= 1


def test_bad_knobs_are_errors():
  with pytest.raises(ValueError, match="data.max_lag=20 is too small"):
    data.get_task({"task": "diffuse_mqar", "max_lag": 20})
  with pytest.raises(ValueError, match=r"longest test example has \d+ tokens.*"
                     r"data.seq_len=128"):
    data.get_task({"task": "diffuse_mqar", "seq_len": 128})
  with pytest.raises(ValueError, match="data.key_len must be >= 2"):
    data.get_task({"task": "diffuse_mqar", "key_len": 1})
  with pytest.raises(ValueError, match="data.key_vocab must be >= 5"):
    data.get_task({"task": "diffuse_mqar", "key_vocab": 4})
