"""Sweeps on Ray (`--executor=ray`): a real local Ray instance of 2 CPUs.

The instance is started once for the module in this process (which is then
the driver of the sweeps run here) and stopped at the end; a `launch.py`
driver connects to it by address.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import ray

from sessa_jax.sweeps import ray_executor
from sessa_jax.sweeps import sweep
from test_train_loop import assert_trees_equal, saved_params, train_losses
from test_train_sweep import ROOT
from test_train_sweep_packed import _write_sweep


@pytest.fixture(scope="module")
def cluster():
  """The address of a local Ray instance of 2 CPUs, its workers sharing the
  tests' compilation cache."""
  env = {"RAY_USAGE_STATS_ENABLED": "0",
         "JAX_COMPILATION_CACHE_DIR": str(pathlib.Path(
             tempfile.gettempdir()) / "sessa_jax_test_xla"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2"}
  before = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  temp = tempfile.mkdtemp(prefix="ray")  # Short: it holds Unix sockets.
  context = ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp,
                     logging_level="WARNING")
  try:
    yield context.address_info["gcs_address"]
  finally:
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
    for k, v in before.items():
      if v is None:
        os.environ.pop(k)
      else:
        os.environ[k] = v


def test_points_run_as_tasks_and_a_failing_point_is_isolated(
    cluster, tmp_path, capsys):
  del cluster
  spec = _write_sweep(tmp_path, """{
      "bad_heads": {**POINT, "model.n_heads": 3}, "ok": POINT}""")
  runs = tmp_path / "runs"
  results = ray_executor.run_sweep(spec, runs)
  assert {n: r["status"] for n, r in results.items()} == {
      "bad_heads": "failed", "ok": "ok"}
  assert "model.d_model=16 is not divisible by model.n_heads=3" in (
      results["bad_heads"]["error"])
  assert [r["retries"] for r in results.values()] == [0, 0]
  assert results["ok"]["steps"] == 2
  assert json.loads((runs / "sweep_summary.json").read_text()) == results
  assert "2,769 parameters" in (runs / "ok.log").read_text()  # Its output.
  table = capsys.readouterr().out
  assert "retries" in table and "failed points:" in table

  # A rerun submits the failed point again and leaves the finished one.
  again = ray_executor.run_sweep(spec, runs)
  assert again["ok"]["wall_time_s"] == results["ok"]["wall_time_s"]
  assert again["bad_heads"]["status"] == "failed"


def test_resources_per_point_become_task_options():
  assert ray_executor.parse_resources("cpu=2,GPU=0.25,tpu=4,big_mem=1") == {
      "num_cpus": 2.0, "num_gpus": 0.25,
      "resources": {"TPU": 4.0, "big_mem": 1.0}}
  with pytest.raises(ValueError, match="'gpu' is not NAME=NUMBER"):
    ray_executor.parse_resources("cpu=1,gpu")


def test_executor_ray_without_ray_names_the_install_command(tmp_path):
  spec = _write_sweep(tmp_path, '{"ok": POINT}')
  hide_ray = ("import runpy, sys; sys.modules['ray'] = None; "
              "sys.argv = ['launch.py'] + sys.argv[1:]; "
              "runpy.run_path('launch.py', run_name='__main__')")
  proc = subprocess.run(
      [sys.executable, "-c", hide_ray, f"--sweep={spec}", "--executor=ray",
       f"--workdir={tmp_path / 'runs'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "launch.py: error: --executor=ray needs Ray, which is not installed: "
      + ray_executor.INSTALL]


def _overlap(rows) -> int:
  """The most rows whose [start_time, end_time] hold one instant."""
  events = sorted([(r["start_time"], 1) for r in rows]
                  + [(r["end_time"], -1) for r in rows])
  running, most = 0, 0
  for _, change in events:
    running += change
    most = max(most, running)
  return most


@pytest.mark.slow
def test_four_points_on_two_cpus_run_two_at_a_time_as_in_process(
    cluster, tmp_path):
  del cluster
  spec = _write_sweep(tmp_path, """{
      f"lr{lr:g}": {**POINT, "train.lr": lr, "train.steps": 4}
      for lr in (1e-2, 5e-3, 3e-3, 1e-3)}""")
  results = ray_executor.run_sweep(spec, tmp_path / "ray")
  assert {r["status"] for r in results.values()} == {"ok"}
  assert _overlap(results.values()) == 2
  in_process = sweep.run_sweep(spec, tmp_path / "in_process")
  for name, row in results.items():
    assert row["eval/loss"] == in_process[name]["eval/loss"]
    assert train_losses(tmp_path / "ray" / name) == train_losses(
        tmp_path / "in_process" / name)
    assert_trees_equal(saved_params(tmp_path / "ray" / name, 4),
                       saved_params(tmp_path / "in_process" / name, 4))


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_resumes(cluster, tmp_path):
  del cluster
  spec = _write_sweep(tmp_path, """{"long": {
      **POINT, "train.steps": 300, "train.checkpoint_every": 20}}""")
  runs = tmp_path / "runs"
  killed = []

  def kill_once_saved():
    while not ((runs / "long" / "checkpoints" / "40").exists()
               and (runs / "long" / "run.lock").exists()):
      time.sleep(0.1)
    pid = json.loads((runs / "long" / "run.lock").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    killed.append(pid)

  threading.Thread(target=kill_once_saved, daemon=True).start()
  row = ray_executor.run_sweep(spec, runs)["long"]
  assert killed and row["status"] == "ok" and row["retries"] == 1
  alone = sweep.run_sweep(spec, tmp_path / "alone")["long"]
  assert row["eval/loss"] == alone["eval/loss"]
  assert_trees_equal(saved_params(runs / "long", 300),
                     saved_params(tmp_path / "alone" / "long", 300))


def _metrics_lines(path: pathlib.Path) -> int:
  return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.slow
def test_sigterm_to_the_driver_exits_75_and_a_relaunch_completes(
    cluster, tmp_path):
  points = """{
      name: {**POINT, "train.lr": lr, "train.steps": STEPS,
             "train.checkpoint_every": 100000}
      for name, lr in (("a", 1e-2), ("b", 3e-3), ("c", 1e-3))}"""
  spec = _write_sweep(tmp_path, points.replace("STEPS", "100000"))
  runs = tmp_path / "runs"
  command = [sys.executable, "launch.py", f"--sweep={spec}",
             f"--workdir={runs}", "--executor=ray", f"--ray_address={cluster}"]
  driver = subprocess.Popen(command, cwd=ROOT)  # pylint: disable=consider-using-with
  try:
    while not all(_metrics_lines(runs / p / "metrics.jsonl") >= 2
                  for p in "ab"):
      assert driver.poll() is None
      time.sleep(0.2)
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=120) == 75
  finally:
    driver.kill()
  summary = json.loads((runs / "sweep_summary.json").read_text())
  assert [summary[p]["status"] for p in "abc"] == [
      "preempted", "preempted", "pending"]
  steps = max(summary[p]["step"] for p in "ab")
  for p in "ab":
    saved = [int(c.name) for c in (runs / p / "checkpoints").iterdir()]
    assert saved == [summary[p]["step"]]

  # The relaunch resumes a and b and trains c (fewer steps, to end soon).
  _write_sweep(tmp_path, points.replace("STEPS", str(steps + 3)))
  assert subprocess.run(command, cwd=ROOT, timeout=300,
                        check=False).returncode == 0
  summary = json.loads((runs / "sweep_summary.json").read_text())
  assert {summary[p]["status"] for p in "abc"} == {"ok"}
  assert all(summary[p]["steps"] == steps + 3 for p in "abc")
  assert np.isfinite([summary[p]["eval/loss"] for p in "abc"]).all()
