"""Packed sweeps over two processes: each point on one host's devices, once."""

import json
import re
import signal
import time

import jax
import numpy as np
import pytest

from sessa_jax.train import sweep
from sessa_jax.train import trainer
from test_launch import finish, free_port, launch
from test_train_loop import saved_params, train_losses
from test_train_sweep_packed import _hosts, _ids, _write_sweep


def test_each_process_takes_its_own_hosts_groups():
  devices = _hosts(2, 4)
  assert _ids(sweep.local_groups(devices, 2, 0)) == [[0, 1], [2, 3]]
  assert _ids(sweep.local_groups(devices, 2, 1)) == [[4, 5], [6, 7]]
  assert _ids(sweep.local_groups(devices, 3, 1)) == [[4, 5, 6]]
  # Every device: all processes train the one group together.
  assert _ids(sweep.local_groups(devices, 8, 1)) == [list(range(8))]
  # One process: all groups are its own.
  assert _ids(sweep.local_groups(_hosts(1, 4), 2, 0)) == [[0, 1], [2, 3]]


def test_groups_over_some_hosts_but_not_all_are_refused():
  with pytest.raises(ValueError, match="spans 2 of the 4 processes; in a "
                     "multi-process run a point takes at most one host's 2 "
                     "devices, or all 8"):
    sweep.local_groups(_hosts(4, 2), 4, 0)


def test_a_local_queue_hands_out_each_point_once_until_stopped():
  queue = sweep.point_queue.PointQueue(["a", "b", "c"], shared=False)
  assert [queue.next(), queue.next()] == ["a", "b"]
  queue.stop()
  assert queue.next() is None and queue.stopped()
  assert queue.gather({"a": {"status": "ok"}}) == {"a": {"status": "ok"}}


def _launch_pair(spec, workdir, *, returncode=0, signal_when=None):
  """Runs a packed sweep as two processes of two devices each; their outputs.

  Args:
    spec: the sweep.
    workdir: its directory.
    returncode: the exit status expected of both.
    signal_when: if given, SIGTERM both processes once it returns True.
  """
  port = free_port()
  procs = [launch(f"--sweep={spec}", "--devices_per_point=1",
                  f"--workdir={workdir}",
                  f"--coordinator_address=localhost:{port}",
                  "--num_processes=2", f"--process_id={i}", devices=2)
           for i in range(2)]
  if signal_when is not None:
    deadline = time.time() + 240
    while not signal_when():
      assert all(p.poll() is None for p in procs), "a process ended early"
      assert time.time() < deadline, "the points did not start training"
      time.sleep(0.5)
    for p in procs:
      p.send_signal(signal.SIGTERM)
  return [finish(p, timeout=400, returncode=returncode) for p in procs]


def _started(outputs):
  """The points each process started, from its log."""
  return [re.findall(r"sweep point \d+/\d+: (\S+)", out) for out in outputs]


def _seeds_sweep(tmp_path):
  """Four points that differ in seed and one that fails; the preset is the
  number of steps."""
  return _write_sweep(tmp_path, """{
          "bad_heads": {**POINT, "model.n_heads": 3},
          **{f"seed{s}": {**POINT, "train.seed": s, "train.steps": int(preset),
                          "train.checkpoint_every": 2}
             for s in range(4)}}""")


def _assert_as_if_alone(tmp_path, spec, runs, summary):
  """Each point's losses, eval loss and parameters equal a lone run's."""
  points = sweep.load_sweep(spec)
  for name, row in summary.items():
    alone = trainer.train(sweep._point_config(points[name]),
                          tmp_path / "alone" / name,
                          devices=jax.devices()[:1])
    np.testing.assert_allclose(
        [l for _, l in train_losses(runs / name)],
        [l for _, l in train_losses(tmp_path / "alone" / name)], rtol=1e-5)
    assert row["eval/loss"] == pytest.approx(alone["eval/loss"], rel=1e-5)
    steps = alone["steps"]
    jax.tree.map(np.testing.assert_array_equal,
                 saved_params(runs / name, steps),
                 saved_params(tmp_path / "alone" / name, steps))


def test_two_processes_pack_points_each_once_as_if_alone(tmp_path):
  spec = _seeds_sweep(tmp_path)
  runs = tmp_path / "runs"
  # Two steps, then a relaunch resumes each point to four on whichever
  # process takes it.
  first = _started(_launch_pair(f"{spec}:2", runs, returncode=1))
  started = _started(_launch_pair(f"{spec}:4", runs, returncode=1))

  # Each point was taken by exactly one process and trained on its devices;
  # both processes took points.
  names = ["bad_heads"] + [f"seed{s}" for s in range(4)]
  assert sorted(first[0] + first[1]) == sorted(started[0] + started[1]) == names
  assert first[0] + started[0] and first[1] + started[1]
  summary = json.loads((runs / "sweep_summary.json").read_text())
  assert "n_heads=3" in summary.pop("bad_heads")["error"]
  assert {r["status"] for r in summary.values()} == {"ok"}
  for name, row in summary.items():
    assert row["processes"] == [0 if name in started[0] else 1]
    assert len(row["devices"]) == 1
    info = json.loads((runs / name / "run_info.json").read_text())
    assert info["devices"]["processes"] == 1
    assert [p.name for p in (runs / name / "checkpoints" / "4" / "data")
            .glob("*.json")] == ["process_0-of-1.json"]
  _assert_as_if_alone(tmp_path, f"{spec}:4", runs, summary)

  # A relaunch finds every point finished and trains none again.
  _launch_pair(f"{spec}:4", runs, returncode=1)
  again = json.loads((runs / "sweep_summary.json").read_text())
  assert {n: again[n]["wall_time_s"] for n in summary} == {
      n: r["wall_time_s"] for n, r in summary.items()}


def test_sigterm_to_both_processes_stops_their_points_and_starts_no_other(
    tmp_path):
  spec = _write_sweep(tmp_path, """{
          f"p{i}": {**POINT, "train.seed": i, "train.steps": 100000,
                    "train.checkpoint_every": 100000}
          for i in range(6)}""")
  runs = tmp_path / "runs"

  def four_points_train():
    logs = [runs / f"p{i}" / "metrics.jsonl" for i in range(6)]
    return sum(log.exists() and log.read_text().count("\n") >= 2
               for log in logs) >= 4

  outputs = _launch_pair(spec, runs, returncode=trainer.EXIT_PREEMPTED,
                         signal_when=four_points_train)
  started = _started(outputs)
  assert len(started[0]) == len(started[1]) == 2
  summary = json.loads((runs / "sweep_summary.json").read_text())
  statuses = {n: r["status"] for n, r in summary.items()}
  assert sorted(statuses.values()) == ["pending"] * 2 + ["preempted"] * 4
  for name in started[0] + started[1]:
    assert statuses[name] == "preempted"
    saved = [int(c.name) for c in (runs / name / "checkpoints").iterdir()]
    assert saved == [summary[name]["step"]]
