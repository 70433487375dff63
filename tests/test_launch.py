"""launch.py as a user runs it: SIGTERM and resume, the workdir lock, errors.

Helpers here are shared with test_launch_multiprocess.py.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from sessa_jax.train import trainer
from test_train_loop import train_losses
from test_train_sweep import TINY as TINY_POINT

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config=configs/mqar.py:tiny", "--config.model.d_model=16",
    "--config.model.n_layers=1", "--config.model.n_heads=2",
    "--config.data.seq_len=16", "--config.data.vocab_size=16",
    "--config.data.num_kv_pairs=2", "--config.data.num_train=512",
    "--config.data.num_val=32", "--config.data.num_test=32",
    "--config.train.batch_size=8", "--config.train.lr=0.01",
    "--config.train.warmup_steps=1", "--config.train.eval_every=0",
    "--config.train.eval_batches=2", "--config.train.test_batches=2",
    "--config.train.log_every=1",
]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=str(
          pathlib.Path(tempfile.gettempdir()) / "sessa_jax_test_xla"),
      PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
  return env


def launch(*args, devices=1, extra_env=None, **kwargs) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args],
                          cwd=ROOT,
                          env={**launch_env(devices), **(extra_env or {})},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: float = 240,
           returncode: int = 0) -> str:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == returncode, out[-3000:]
  return out


def wait_for_lines(path: pathlib.Path, lines: int, proc: subprocess.Popen):
  """Waits until `path` has `lines` lines, while `proc` runs."""
  deadline = time.time() + 180
  while not (path.exists() and len(path.read_text().splitlines()) >= lines):
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() < deadline, f"{path} did not reach {lines} lines"
    time.sleep(0.5)


def test_sigterm_saves_a_checkpoint_that_training_resumes_from(tmp_path):
  args = [*TINY, "--config.train.checkpoint_every=1000",
          f"--workdir={tmp_path}"]
  proc = launch(*args, "--config.train.steps=100000")
  wait_for_lines(tmp_path / "metrics.jsonl", 3, proc)
  proc.send_signal(signal.SIGTERM)
  out = finish(proc, returncode=trainer.EXIT_PREEMPTED)
  assert '"preempted": true' in out
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()]
  assert len(saved) == 1 and saved[0] >= 3
  stopped_at = saved[0]
  finish(launch(*args, f"--config.train.steps={stopped_at + 2}"))
  assert [s for s, _ in train_losses(tmp_path)] == list(
      range(1, stopped_at + 3))
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["steps"] == stopped_at + 2


def test_restore_step_lists_the_saved_steps_or_goes_back_to_one(tmp_path):
  args = [*TINY, "--config.train.steps=4", "--config.train.checkpoint_every=1",
          "--config.train.keep_checkpoints=4", f"--workdir={tmp_path}"]
  finish(launch(*args))
  out = finish(launch(*args, "--restore_step=9"), returncode=1)
  assert "no checkpoint of step 9" in out and "saved steps: 1, 2, 3, 4" in out
  out = finish(launch(*args, "--config.train.steps=5", "--restore_step=2"))
  assert "deleting the checkpoints of steps 3, 4" in out, out[-3000:]
  assert [s for s, _ in train_losses(tmp_path)] == list(range(1, 6))


@pytest.mark.parametrize("args,message", [
    (["--config=configs/mqar.py:rwkv"],
     "neither a mixer (sessa, attention, mamba2) nor a size"),
    (["--config=configs/mqar.py", "--config.model.mixer=rwkv"],
     "model.mixer='rwkv' is not one of: sessa, attention, mamba2"),
    (["--config=configs/mqar.py", "--config.data.task=wiki"],
     "unknown data.task 'wiki'; choices:"),
    (["--config=configs/mqar.py", "--devices_per_point=2"],
     "--devices_per_point packs the points of a --sweep"),
    (["--config=configs/mqar.py", "--executor=ray"],
     "--executor=ray runs the points of a --sweep"),
    (["--config=configs/mqar.py", "--resources_per_point=gpu=1"],
     "--ray_address and --resources_per_point go with --executor=ray"),
])
def test_bad_config_fails_at_start_naming_the_choices(tmp_path, args, message):
  proc = launch(*args, f"--workdir={tmp_path}")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 1
  assert message in out, out[-3000:]
  assert "Traceback" not in out  # One line; --verbose adds the traceback.


def test_second_launch_into_a_running_workdir_is_refused(tmp_path):
  args = [*TINY, "--config.train.checkpoint_every=1000",
          f"--workdir={tmp_path}"]
  first = launch(*args, "--config.train.steps=100000")
  wait_for_lines(tmp_path / "metrics.jsonl", 2, first)
  second = launch(*args, "--config.train.steps=100000",
                  "--config.train.lr=0.003")
  out = finish(second, returncode=1)
  assert f"is in use by pid {first.pid} on host" in out, out[-3000:]
  assert "Traceback" not in out
  assert first.poll() is None
  first.send_signal(signal.SIGTERM)
  finish(first, returncode=trainer.EXIT_PREEMPTED)
  steps = [s for s, _ in train_losses(tmp_path)]
  assert steps == list(range(1, len(steps) + 1))  # One run's sequence only.


@pytest.mark.slow
def test_sigterm_stops_a_sweep_which_resumes_on_relaunch(tmp_path):
  spec = tmp_path / "two_points.py"
  spec.write_text(textwrap.dedent(f"""
      import os
      POINT = {{"config": "configs/mqar.py:tiny", **{TINY_POINT!r},
               "train.steps": int(os.environ.get("SWEEP_STEPS", "100000")),
               "train.checkpoint_every": 1000}}

      def sweep(preset):
        return {{"first": POINT, "second": {{**POINT, "train.lr": 0.003}}}}
      """))
  runs = tmp_path / "runs"
  proc = launch(f"--sweep={spec}", f"--workdir={runs}")
  wait_for_lines(runs / "first" / "metrics.jsonl", 2, proc)
  proc.send_signal(signal.SIGTERM)
  finish(proc, returncode=trainer.EXIT_PREEMPTED)
  results = json.loads((runs / "sweep_summary.json").read_text())
  assert results["first"]["status"] == "preempted"
  assert results["second"] == {"status": "pending", "signal": "SIGTERM"}
  assert not (runs / "second").exists()
  stopped_at = results["first"]["step"]
  finish(launch(f"--sweep={spec}", f"--workdir={runs}",
                extra_env={"SWEEP_STEPS": str(stopped_at + 2)}))
  results = json.loads((runs / "sweep_summary.json").read_text())
  assert {r["status"] for r in results.values()} == {"ok"}
  assert [s for s, _ in train_losses(runs / "first")] == list(
      range(1, stopped_at + 3))
