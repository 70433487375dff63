"""Checkpoints that are wrong, going or gone: checksums, the data position, a
way back from divergence, steps deleted under an eval, half-deleted steps."""

import json
import logging
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sessa_jax.train import checkpoint as checkpoint_lib
from sessa_jax.train import trainer
from test_train_loop import (assert_trees_equal, saved_params, tiny_config,
                             train_losses)


def checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())


def largest_param_file(workdir, step):
  """The biggest array data file of a checkpoint's state."""
  files = (workdir / "checkpoints" / str(step) / "state").rglob("d/*")
  return max((p for p in files if p.is_file()), key=lambda p: p.stat().st_size)


def test_flipped_byte_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
  config = tiny_config(steps=6)
  # Arrays this wide are stored outside tensorstore's checksummed b-tree
  # nodes: without checksums of our own the flip below restores silently.
  config.model.d_model = 64
  trainer.train(config, tmp_path, stop_at=4)
  intact = saved_params(tmp_path, 4)
  damaged = largest_param_file(tmp_path, 4)
  data = bytearray(damaged.read_bytes())
  data[len(data) // 2] ^= 0x01
  damaged.write_bytes(bytes(data))
  with caplog.at_level(logging.INFO):
    summary = trainer.train(config, tmp_path)
  assert (f"checkpoints/4 cannot be restored (ChecksumError: {damaged} differs "
          "from the checksum saved with it)") in caplog.text
  assert "restored" in caplog.text and "checkpoints/2\n" in caplog.text
  assert len(list((tmp_path / "checkpoints.unreadable").iterdir())) == 1
  assert summary["steps"] == 6
  assert_trees_equal(saved_params(tmp_path, 4), intact)  # Step 4 again.


def test_data_position_other_than_the_step_is_refused(tmp_path, caplog):
  trainer.train(tiny_config(steps=4), tmp_path)
  step_dir = tmp_path / "checkpoints" / "4"
  position = step_dir / "data" / "process_0-of-1.json"
  position.write_text(json.dumps({"next_index": 13}))
  checkpoint_lib.write_checksums(step_dir)  # Only the position check is left.
  with caplog.at_level(logging.WARNING):
    summary = trainer.train(tiny_config(steps=6), tmp_path)
  assert ("checkpoints/4 cannot be restored (ValueError: its data iterator is "
          "at batch 13 (next_index), not at batch 4") in caplog.text
  assert summary["steps"] == 6
  assert [s for s, _ in train_losses(tmp_path)] == list(range(1, 7))


def test_restore_step_goes_back_past_a_divergence(tmp_path, caplog):
  with pytest.raises(FloatingPointError) as error:
    trainer.train(tiny_config(steps=12, lr=1e4, checkpoint_every=1,
                              keep_checkpoints=4), tmp_path)
  steps = checkpoint_steps(tmp_path)
  assert len(steps) > 1, steps
  assert (f"--restore_step={steps[0]} to resume from an earlier checkpoint "
          f"(saved steps: {', '.join(map(str, steps))})") in str(error.value)
  with pytest.raises(FileNotFoundError,
                     match=f"no checkpoint of step 99 .*saved steps: "
                           f"{', '.join(map(str, steps))}"):
    trainer.train(tiny_config(steps=12), tmp_path, restore_step=99)
  with caplog.at_level(logging.WARNING):
    summary = trainer.train(tiny_config(steps=12, checkpoint_every=1,
                                        keep_checkpoints=4), tmp_path,
                            restore_step=steps[0])
  assert (f"deleting the checkpoints of steps "
          f"{', '.join(map(str, steps[1:]))} in {tmp_path / 'checkpoints'}, "
          f"newer than the restored step {steps[0]}") in caplog.text
  assert summary["steps"] == 12 and np.isfinite(summary["eval/loss"])
  assert checkpoint_steps(tmp_path) == [9, 10, 11, 12]
  assert [s for s, _ in train_losses(tmp_path)] == list(range(1, 13))


def test_eval_takes_the_new_listing_when_a_step_vanishes(tmp_path, monkeypatch,
                                                         caplog):
  trainer.train(tiny_config(steps=4), tmp_path)
  directory = tmp_path / "checkpoints"
  real_restore = ocp.CheckpointManager.restore
  read = []

  def training_moves_on_before_the_read(self, step, *args, **kwargs):
    if not read:  # Listed, then the writer saves step 6 and deletes step 4.
      shutil.copytree(directory / "4", directory / "6")
      shutil.rmtree(directory / "4")
    read.append(step)
    return real_restore(self, step, *args, **kwargs)

  real_reload = ocp.CheckpointManager.reload
  listings = []

  def listing_races_a_deletion(self):
    listings.append(self.directory)
    if len(listings) == 1:  # A step's metadata vanished while being listed.
      raise FileNotFoundError(directory / "2" / "_CHECKPOINT_METADATA")
    return real_reload(self)

  monkeypatch.setattr(ocp.CheckpointManager, "restore",
                      training_moves_on_before_the_read)
  monkeypatch.setattr(ocp.CheckpointManager, "reload",
                      listing_races_a_deletion)
  with caplog.at_level(logging.INFO):
    result = trainer.evaluate_checkpoint(tiny_config(steps=4), tmp_path)
  assert read == [4, 6]
  assert result["steps"] == 6
  assert "checkpoints/4 was deleted while being read" in caplog.text
  assert "cannot be restored" not in caplog.text


def test_half_deleted_step_is_removed_on_start(tmp_path, caplog):
  trainer.train(tiny_config(steps=4), tmp_path)
  directory = tmp_path / "checkpoints"
  # What kill -9 during orbax's deletion of step 2 leaves: some files gone.
  for name in ("_CHECKPOINT_METADATA", "commit_success.txt"):
    (directory / "2" / name).unlink()
  largest_param_file(tmp_path, 2).unlink()
  shutil.copytree(directory / "4", directory / "3")  # Complete: kept.
  largest_param_file(tmp_path, 3).unlink()  # Only its manifest tells.
  with caplog.at_level(logging.INFO):
    trainer.train(tiny_config(steps=6), tmp_path)
  assert (f"removed 2 half-deleted checkpoint directories in {directory} "
          "(2, 3)") in caplog.text
  assert checkpoint_steps(tmp_path) == [4, 6]
  caplog.clear()
  with caplog.at_level(logging.INFO):
    trainer.train(tiny_config(steps=6), tmp_path)
  assert "half-deleted" not in caplog.text
