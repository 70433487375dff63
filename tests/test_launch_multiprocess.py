"""Two local processes (jax.distributed on CPU) train one model together."""

import json

import numpy as np
import pytest

from sessa_jax.train import trainer
from test_launch import TINY, finish, free_port, launch
from test_train_loop import tiny_config, train_losses


@pytest.mark.slow
def test_two_processes_train_together_and_write_one_checkpoint(tmp_path):
  port = free_port()
  args = [*TINY, "--config.train.steps=4", "--config.train.checkpoint_every=2",
          f"--workdir={tmp_path / 'two'}",
          f"--coordinator_address=localhost:{port}",
          "--num_processes=2"]
  procs = [launch(*args, f"--process_id={i}", devices=2) for i in range(2)]
  for proc in procs:
    finish(proc)
  step_dir = tmp_path / "two" / "checkpoints" / "4"
  assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()
                ) == ["2", "4"]
  assert sorted(p.name for p in (step_dir / "data").glob("*.json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  summary = json.loads((tmp_path / "two" / "summary.json").read_text())
  assert summary["steps"] == 4
  # Together they see the same global batches as one process alone does.
  trainer.train(tiny_config(steps=4), tmp_path / "one")
  np.testing.assert_allclose([l for _, l in train_losses(tmp_path / "two")],
                             [l for _, l in train_losses(tmp_path / "one")],
                             rtol=1e-5)
