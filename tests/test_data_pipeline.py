"""Tests of the task registry, config validation and the grain pipeline."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from sessa_jax import data
from sessa_jax.data import base

SMALL_MQAR = {"task": "mqar", "seq_len": 32, "vocab_size": 32,
              "num_kv_pairs": 4, "num_train": 96, "num_val": 16,
              "num_test": 16}


@pytest.fixture
def task():
  return data.get_task(SMALL_MQAR)


def _draw(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_unknown_task_lists_choices():
  with pytest.raises(ValueError, match="unknown data.task 'nope'.*mqar"):
    data.get_task({"task": "nope"})


def test_unknown_key_names_key_and_known_keys():
  with pytest.raises(ValueError,
                     match=r"data.num_pears.*known keys:.*num_kv_pairs"):
    data.get_task({"task": "mqar", "num_pears": 3})


def test_wrong_type_names_key():
  with pytest.raises(ValueError, match="data.num_kv_pairs must be of type int"):
    data.get_task({"task": "mqar", "num_kv_pairs": "four"})


def test_config_dict_is_accepted():
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict(SMALL_MQAR)
  cfg.num_workers = 0
  assert data.get_task(cfg).seq_len == 32


def test_every_task_states_vocab_and_metrics():
  for name, cls in data.TASKS.items():
    assert cls.name == name
    assert cls.metrics


def test_too_long_example_names_both_lengths():
  with pytest.raises(ValueError, match=r"40 tokens.*data.seq_len=32"):
    base.pad(np.zeros(40, np.int32), 32)
  with pytest.raises(ValueError, match=r"16 tokens.*data.seq_len=12"):
    data.get_task({"task": "mqar", "seq_len": 12, "num_kv_pairs": 4})


def test_batches_have_fixed_shapes(task):
  batch = next(data.make_iterator(task, "train", batch_size=8, seed=0))
  assert batch["inputs"].shape == (8, 32)
  assert batch["inputs"].dtype == np.int32
  assert batch["targets"].dtype == np.int32
  assert batch["loss_mask"].dtype == np.float32


def test_restore_gives_identical_batches(task):
  it = data.make_iterator(task, "train", batch_size=8, seed=3)
  _draw(it, 5)  # crosses no epoch boundary yet: 96 / 8 = 12 batches
  state = it.get_state()
  after = _draw(it, 10)  # crosses into the second epoch
  it.set_state(state)
  _assert_same(after, _draw(it, 10))
  fresh = data.make_iterator(task, "train", batch_size=8, seed=3)
  fresh.set_state(state)
  _assert_same(after, _draw(fresh, 10))


def test_same_seed_same_stream_other_seed_other_order(task):
  a = _draw(data.make_iterator(task, "train", batch_size=8, seed=1), 3)
  b = _draw(data.make_iterator(task, "train", batch_size=8, seed=1), 3)
  c = _draw(data.make_iterator(task, "train", batch_size=8, seed=2), 3)
  _assert_same(a, b)
  assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_epochs_cover_every_example_once(task):
  it = data.make_iterator(task, "val", batch_size=4, seed=0, num_epochs=1)
  batches = list(it)
  assert len(batches) == 4
  seen = np.concatenate([b["inputs"] for b in batches])
  expected = np.stack([task.example("val", i)["inputs"] for i in range(16)])
  assert sorted(map(bytes, seen)) == sorted(map(bytes, expected))


def test_unshuffled_stream_is_index_order(task):
  batch = next(data.make_iterator(task, "test", batch_size=4, seed=0,
                                  shuffle=False))
  for i in range(4):
    np.testing.assert_array_equal(batch["inputs"][i],
                                  task.example("test", i)["inputs"])


def test_two_hosts_split_the_single_host_stream(task):
  single = _draw(data.make_iterator(task, "train", batch_size=8, seed=5), 15)
  hosts = [
      _draw(data.make_iterator(task, "train", batch_size=8, seed=5,
                               process_index=p, process_count=2), 15)
      for p in range(2)
  ]
  for step, batch in enumerate(single):
    h0, h1 = hosts[0][step], hosts[1][step]
    assert h0["inputs"].shape == (4, 32)
    rows0, rows1 = set(map(bytes, h0["inputs"])), set(map(bytes, h1["inputs"]))
    assert not rows0 & rows1
    for k in batch:
      np.testing.assert_array_equal(
          batch[k], np.concatenate([h0[k], h1[k]]))


def test_bad_pipeline_arguments(task):
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    data.make_iterator(task, "train", batch_size=8, seed=0, process_count=3)
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    data.make_iterator(task, "dev", batch_size=8, seed=0)
  with pytest.raises(ValueError, match="fewer than one batch"):
    data.make_iterator(task, "val", batch_size=32, seed=0)


WORKER_SCRIPT = """
import numpy as np
from sessa_jax import data

def main():
  task = data.get_task({"task": "symbol_soup", "num_train": 200})
  ref = data.make_iterator(task, "train", batch_size=8, seed=0)
  it = data.make_iterator(task, "train", batch_size=8, seed=0, num_workers=2)
  expected = [next(ref) for _ in range(6)]
  got = [next(it) for _ in range(3)]
  state = it.get_state()
  got += [next(it) for _ in range(3)]
  it.set_state(state)
  again = [next(it) for _ in range(3)]
  it.close()
  same = lambda xs, ys: all(np.array_equal(x["inputs"], y["inputs"])
                            for x, y in zip(xs, ys))
  print(same(expected, got), same(got[3:], again))

if __name__ == "__main__":
  main()
"""


@pytest.mark.slow
def test_worker_processes_give_the_same_stream(tmp_path):
  script = tmp_path / "workers.py"
  script.write_text(WORKER_SCRIPT)
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHONPATH=str(repo))
  out = subprocess.run([sys.executable, str(script)], cwd=repo, env=env,
                       check=True, capture_output=True, text=True, timeout=300)
  assert out.stdout.split() == ["True", "True"]
