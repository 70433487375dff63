"""Tests of the Zoology-style MQAR task."""

import numpy as np
import pytest

from sessa_jax import data


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_every_query_answers_with_its_value(random_non_queries):
  task = data.get_task({"task": "mqar", "seq_len": 64, "vocab_size": 40,
                        "num_kv_pairs": 6,
                        "random_non_queries": random_non_queries})
  half = 20
  for index in range(50):
    ex = task.example("train", index)
    x, y, m = ex["inputs"], ex["targets"], ex["loss_mask"]
    keys, values = x[0:12:2], x[1:12:2]
    assert len(set(keys)) == 6 and ((keys >= 1) & (keys < half)).all()
    assert ((values >= half) & (values < 40)).all()
    memory = dict(zip(keys, values))
    (positions,) = np.nonzero(m)
    assert len(positions) == 6
    assert sorted(x[positions]) == sorted(keys)
    for pos in positions:
      assert pos >= 12 and y[pos] == memory[x[pos]]
      pair = list(keys).index(x[pos])
      assert ex["lag"][pos] == pos - 2 * pair
    assert (y[m == 0] == 0).all() and (ex["lag"][m == 0] == 0).all()
    if not random_non_queries:
      assert (np.delete(x[12:], positions - 12) == 0).all()


def test_deterministic_and_split_dependent():
  task = data.get_task({"task": "mqar"})
  a, b = task.example("val", 7), task.example("val", 7)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  c = task.example("test", 7)
  assert not np.array_equal(a["inputs"], c["inputs"])


def test_too_few_key_tokens_is_an_error():
  with pytest.raises(ValueError, match="data.vocab_size=16 gives 7 key tokens"):
    data.get_task({"task": "mqar", "vocab_size": 16, "num_kv_pairs": 8})


def test_path_is_rejected():
  with pytest.raises(ValueError, match="data.path is not used by task mqar"):
    data.get_task({"task": "mqar", "path": "x.txt"})
