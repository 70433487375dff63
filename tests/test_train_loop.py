"""The train loop in process: outputs, tensorboard, eval mode, equal resumes."""

import json
import pathlib
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing import event_accumulator

from sessa_jax.train import config as config_lib
from sessa_jax.train import trainer

# Runs in one session share compiled programs (each compile is seconds on CPU).
jax.config.update(
    "jax_compilation_cache_dir",
    str(pathlib.Path(tempfile.gettempdir()) / "sessa_jax_test_xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def tiny_config(**train):
  """A model and task small enough that a step takes milliseconds."""
  return config_lib.base_config(
      model=dict(mixer="sessa", d_model=16, n_layers=1, n_heads=2),
      data=dict(task="mqar", seq_len=16, vocab_size=16, num_kv_pairs=2,
                num_train=512, num_val=32, num_test=32),
      train={**dict(steps=6, batch_size=8, lr=1e-2, warmup_steps=1,
                    eval_every=0, eval_batches=2, test_batches=2,
                    checkpoint_every=2, log_every=1), **train})


def train_losses(workdir):
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [(r["step"], r["train/loss"]) for r in map(json.loads, lines)
          if "train/loss" in r]


def saved_params(workdir, step):
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
  return ocp.StandardCheckpointer().restore(path.absolute())["params"]


def assert_trees_equal(a, b):
  flat_a, flat_b = [dict(_flatten(t)) for t in (a, b)]
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


def _flatten(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", np.asarray(value)


def test_short_run_learns_and_writes_every_output(tmp_path):
  summary = trainer.train(tiny_config(steps=30, checkpoint_every=10), tmp_path)
  losses = [loss for _, loss in train_losses(tmp_path)]
  assert len(losses) == 30
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk == summary
  for key in ("eval/loss", "eval/accuracy", "test/loss", "test/accuracy",
              "test/accuracy_by_lag", "params", "flops_per_token", "steps",
              "wall_time_s"):
    assert key in summary, key
  assert summary["steps"] == 30 and summary["model"] == "sessa"
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model"]["d_model"] == 16
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                ) == [10, 20, 30]
  events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
  events.Reload()
  tags = events.Tags()["scalars"]
  for tag in ("train/loss", "train/accuracy", "train/lr", "train/grad_norm",
              "train/tokens_per_s", "train/step_time_s", "train/mfu",
              "eval/loss", "test/accuracy"):
    assert tag in tags, tag
  assert len(events.Scalars("train/loss")) == 30

  # --mode=eval reads the newest checkpoint and rewrites the same summary.
  again = trainer.evaluate_checkpoint(tiny_config(steps=30), tmp_path)
  assert again["eval/loss"] == pytest.approx(summary["eval/loss"], rel=1e-6)
  assert again["steps"] == 30


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
  config = tiny_config(steps=6, checkpoint_every=4)
  trainer.train(config, tmp_path / "whole")
  stopped = trainer.train(config, tmp_path / "split", stop_at=3)
  assert stopped == {"preempted": True, "step": 3}
  assert not (tmp_path / "split" / "summary.json").exists()
  trainer.train(config, tmp_path / "split")
  whole = train_losses(tmp_path / "whole")
  split = train_losses(tmp_path / "split")
  assert [s for s, _ in split] == list(range(1, 7))
  np.testing.assert_array_equal([l for _, l in split], [l for _, l in whole])
  assert_trees_equal(saved_params(tmp_path / "split", 6),
                     saved_params(tmp_path / "whole", 6))
