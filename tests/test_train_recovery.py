"""Nothing lost: NaN stops, refused resumes of other runs, bad checkpoints."""

import json
import logging

import numpy as np
import pytest

from sessa_jax.train import evaluate as evaluate_lib
from sessa_jax.train import trainer
from test_train_loop import (assert_trees_equal, saved_params, tiny_config,
                             train_losses)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  trainer.train(tiny_config(steps=4), tmp_path)
  good = saved_params(tmp_path, 4)
  real_stats = evaluate_lib.token_stats

  def nan_stats(logits_btv, batch):
    stats = real_stats(logits_btv, batch)
    return {**stats, "loss_sum": stats["loss_sum"] * np.nan}

  monkeypatch.setattr(evaluate_lib, "token_stats", nan_stats)
  with pytest.raises(FloatingPointError,
                     match="non-finite training loss .* at step 5.* last good "
                           "checkpoint is step 4"):
    trainer.train(tiny_config(steps=8), tmp_path)
  assert sorted(int(p.name)
                for p in (tmp_path / "checkpoints").iterdir()) == [2, 4]
  assert_trees_equal(saved_params(tmp_path, 4), good)


def test_changed_model_or_data_refuses_to_resume_unless_forced(tmp_path,
                                                             caplog):
  trainer.train(tiny_config(steps=2), tmp_path)
  wider = tiny_config(steps=2)
  wider.model.d_model = 32
  with pytest.raises(ValueError, match=r"model.d_model: 16 -> 32.*--force"):
    trainer.train(wider, tmp_path)
  reseeded = tiny_config(steps=4)
  reseeded.data.seed = 7
  with pytest.raises(ValueError, match=r"data.seed: 0 -> 7"):
    trainer.train(reseeded, tmp_path)
  with caplog.at_level(logging.WARNING):
    summary = trainer.train(reseeded, tmp_path, force=True)
  assert "--force: resuming" in caplog.text
  assert "data.seed: 0 -> 7" in caplog.text  # Says what the force changed.
  assert summary["steps"] == 4
  assert json.loads((tmp_path / "config.json").read_text())["data"]["seed"] == 7


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  trainer.train(tiny_config(steps=4), tmp_path)
  for path in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"\0garbage")
  with caplog.at_level(logging.WARNING):
    summary = trainer.train(tiny_config(steps=6), tmp_path)
  assert "checkpoints/4 cannot be restored" in caplog.text
  assert summary["steps"] == 6
  assert [s for s, _ in train_losses(tmp_path)] == list(range(1, 7))
  assert sorted(int(p.name)
                for p in (tmp_path / "checkpoints").iterdir()) == [2, 4, 6]
  assert len(list((tmp_path / "checkpoints.unreadable").iterdir())) == 1


def test_half_written_checkpoint_is_ignored(tmp_path):
  trainer.train(tiny_config(steps=2), tmp_path)
  # What a save killed midway leaves: orbax's temporary directory.
  (tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-123").mkdir()
  summary = trainer.train(tiny_config(steps=4), tmp_path)
  assert summary["steps"] == 4
  assert [s for s, _ in train_losses(tmp_path)] == [1, 2, 3, 4]
