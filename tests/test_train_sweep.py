"""Sweeps: every point in its own workdir, failures reported, the rest still
run."""

import json
import os
import pathlib
import signal
import tempfile
import textwrap
import threading
import time

import jax

from sessa_jax.sweeps import sweep

jax.config.update(
    "jax_compilation_cache_dir",
    str(pathlib.Path(tempfile.gettempdir()) / "sessa_jax_test_xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = {
    "model.d_model": 16, "model.n_layers": 1, "model.n_heads": 2,
    "data.seq_len": 16, "data.vocab_size": 16, "data.num_kv_pairs": 2,
    "data.num_train": 512, "data.num_val": 32, "data.num_test": 32,
    "train.batch_size": 8, "train.steps": 2, "train.warmup_steps": 1,
    "train.eval_every": 0, "train.eval_batches": 1, "train.test_batches": 1,
    "train.log_every": 1,
}


def _sweep_file(tmp_path):
  path = tmp_path / "lr_sweep.py"
  path.write_text(textwrap.dedent(f"""
      TINY = {TINY!r}
      CONFIG = {str(ROOT / "configs" / "mqar.py")!r}

      def sweep(preset):
        lrs = {{"quick": [1e-2], None: [1e-2, 3e-3]}}[preset]
        points = {{"bad_heads": {{"config": CONFIG, **TINY,
                                  "model.n_heads": 3}}}}
        points.update({{f"lr{{lr:g}}": {{"config": CONFIG, **TINY,
                                         "train.lr": lr}}
                       for lr in lrs}})
        points["bad_key"] = {{"config": CONFIG, **TINY,
                             "train.learning_rate": 1}}
        return points
      """))
  return path


def test_failing_points_are_reported_and_the_others_run(tmp_path, capsys):
  spec = str(_sweep_file(tmp_path))
  results = sweep.run_sweep(spec, tmp_path / "runs")
  assert {n: r["status"] for n, r in results.items()} == {
      "lr0.01": "ok", "lr0.003": "ok", "bad_heads": "failed",
      "bad_key": "failed"}
  assert ("model.d_model=16 is not divisible by model.n_heads=3"
          in results["bad_heads"]["error"])
  assert ("unknown config key 'train.learning_rate'"
          in results["bad_key"]["error"])
  on_disk = json.loads((tmp_path / "runs" / "sweep_summary.json").read_text())
  assert on_disk.keys() == results.keys()
  assert on_disk["lr0.003"]["steps"] == 2
  assert (tmp_path / "runs" / "lr0.003" / "summary.json").exists()
  table = capsys.readouterr().out
  assert "lr0.003" in table and "eval/accuracy" in table
  assert "failed points:" in table

  # A rerun (e.g. after a crash) reuses finished points instead of
  # retraining.
  again = sweep.run_sweep(spec, tmp_path / "runs")
  assert again["lr0.01"]["wall_time_s"] == results["lr0.01"]["wall_time_s"]


def test_preset_picks_points(tmp_path):
  points = sweep.load_sweep(f"{_sweep_file(tmp_path)}:quick")
  assert sorted(points) == ["bad_heads", "bad_key", "lr0.01"]


def sigterm_once_logged(metrics):
  """Sends this process SIGTERM once `metrics` holds two logged steps."""

  def terminate():
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
      time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=terminate, daemon=True).start()


def test_sigterm_saves_the_running_point_and_starts_no_other(tmp_path):
  spec = tmp_path / "two_points.py"
  spec.write_text(textwrap.dedent(f"""
      POINT = {{"config": {str(ROOT / "configs" / "mqar.py")!r}, **{TINY!r},
               "train.steps": 100000, "train.checkpoint_every": 1000}}

      def sweep(preset):
        return {{"first": POINT, "second": {{**POINT, "train.lr": 0.003}}}}
      """))
  metrics = tmp_path / "runs" / "first" / "metrics.jsonl"
  sigterm_once_logged(metrics)
  results = sweep.run_sweep(str(spec), tmp_path / "runs")
  assert results["first"]["status"] == "preempted"
  assert results["second"] == {"status": "pending", "signal": "SIGTERM"}
  assert not (tmp_path / "runs" / "second").exists()
  checkpoints = tmp_path / "runs" / "first" / "checkpoints"
  assert [int(p.name) for p in checkpoints.iterdir()] == [
      results["first"]["step"]]


def test_ctrl_c_between_points_leaves_the_rest_pending_by_sigint(
    tmp_path, monkeypatch):
  # Old code: the pending rows did not say which signal stopped them, so
  # launch.py exited 75 (preempted) instead of 130 (interrupted).
  spec = tmp_path / "two_points.py"
  spec.write_text(textwrap.dedent(f"""
      POINT = {{"config": {str(ROOT / "configs" / "mqar.py")!r}, **{TINY!r}}}

      def sweep(preset):
        return {{"first": POINT, "second": {{**POINT, "train.lr": 0.003}}}}
      """))
  run_point = sweep.run_point

  def then_ctrl_c(*args, **kwargs):
    row = run_point(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)
    return row

  monkeypatch.setattr(sweep, "run_point", then_ctrl_c)
  results = sweep.run_sweep(str(spec), tmp_path / "runs")
  assert results["first"]["status"] == "ok"
  assert results["second"] == {"status": "pending", "signal": "SIGINT"}
  on_disk = json.loads((tmp_path / "runs" / "sweep_summary.json").read_text())
  assert on_disk["second"]["signal"] == "SIGINT"


def test_a_stopped_sweep_reports_points_finished_earlier_as_ok(tmp_path):
  spec = tmp_path / "two_points.py"
  spec.write_text(textwrap.dedent(f"""
      POINT = {{"config": {str(ROOT / "configs" / "mqar.py")!r}, **{TINY!r}}}
      SECOND = {{**POINT, "train.steps": 2}}

      def sweep(preset):
        if preset == "second":
          return {{"second": SECOND}}
        return {{"first": {{**POINT, "train.steps": 100000,
                            "train.checkpoint_every": 1000}},
                 "second": SECOND}}
      """))
  finished = sweep.run_sweep(f"{spec}:second", tmp_path / "runs")["second"]
  metrics = tmp_path / "runs" / "first" / "metrics.jsonl"
  sigterm_once_logged(metrics)
  results = sweep.run_sweep(str(spec), tmp_path / "runs")
  assert results["first"]["status"] == "preempted"
  assert results["second"]["status"] == "ok"
  assert results["second"]["wall_time_s"] == finished["wall_time_s"]


def test_start_report_lists_only_the_keys_a_point_changes():
  # Old code: every key the sweep sets, changed or not.
  config = str(ROOT / "configs" / "mqar.py") + ":tiny"
  base = sweep.config_lib.load_config(config)
  point = {"config": config, "model.d_model": base.model.d_model,
           "train.lr": base.train.lr * 2}
  assert sweep._changed_keys(point) == {"train.lr": base.train.lr * 2}
