"""Packed sweeps over several processes: each point once, as if alone."""

import json
import re
import signal
import time

import jax
import numpy as np
import pytest
from flax import nnx

from sessa_jax import loading
from sessa_jax.sweeps import point_queue
from sessa_jax.sweeps import sweep
from sessa_jax.train import trainer
from test_launch import finish, free_port, launch
from test_train_loop import train_losses
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


def test_a_group_of_whole_hosts_is_trained_by_their_processes():
  devices = _hosts(5, 2)  # Two groups of two hosts; the fifth host idles.
  assert _ids(sweep.local_groups(devices, 4, 0)) == [[0, 1, 2, 3]]
  assert _ids(sweep.local_groups(devices, 4, 3)) == [[4, 5, 6, 7]]
  assert not sweep.local_groups(devices, 4, 4)


def test_a_local_queue_hands_out_each_point_once_until_stopped():
  queue = point_queue.PointQueue(["a", "b", "c"], shared=False)
  assert [queue.next(), queue.next()] == ["a", "b"]
  queue.stop()
  assert queue.next() is None and queue.stopped()
  assert queue.gather({"a": {"status": "ok"}}) == {"a": {"status": "ok"}}


def _launch_processes(spec, workdir, *, processes=2, devices=2,
                      devices_per_point=1, returncode=0, signal_when=None,
                      signalled=None):
  """Runs a packed sweep as several processes; their outputs.

  Args:
    spec: the sweep.
    workdir: its directory.
    processes: how many processes ...
    devices: ... of how many devices each.
    devices_per_point: as the flag.
    returncode: the exit status expected of all.
    signal_when: if given, SIGTERM processes once it returns True ...
    signalled: ... these (default: all).
  """
  port = free_port()
  procs = [launch(f"--sweep={spec}", f"--devices_per_point={devices_per_point}",
                  f"--workdir={workdir}",
                  f"--coordinator_address=localhost:{port}",
                  f"--num_processes={processes}", f"--process_id={i}",
                  devices=devices)
           for i in range(processes)]
  if signal_when is not None:
    deadline = time.time() + 240
    while not signal_when():
      assert all(p.poll() is None for p in procs), "a process ended early"
      assert time.time() < deadline, "the points did not start training"
      time.sleep(0.5)
    for i in signalled or range(processes):
      procs[i].send_signal(signal.SIGTERM)
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


def _params(workdir):
  """The newest checkpoint's parameters, restored in this one process."""
  model = loading.load(workdir).model
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _training(runs, names, count):
  """A test that `count` of the points `names` have logged two steps."""
  def check():
    logs = [runs / name / "metrics.jsonl" for name in names]
    return sum(log.exists() and log.read_text().count("\n") >= 2
               for log in logs) >= count
  return check


def _assert_as_if_alone(tmp_path, spec, runs, summary, devices=1):
  """Each point's losses, eval loss and parameters equal a lone run's."""
  points = sweep.load_sweep(spec)
  for name, row in summary.items():
    alone = trainer.train(sweep._point_config(points[name]),
                          tmp_path / "alone" / name,
                          devices=jax.devices()[:devices])
    np.testing.assert_allclose(
        [l for _, l in train_losses(runs / name)],
        [l for _, l in train_losses(tmp_path / "alone" / name)], rtol=1e-5)
    assert row["eval/loss"] == pytest.approx(alone["eval/loss"], rel=1e-5)
    jax.tree.map(np.testing.assert_array_equal, _params(runs / name),
                 _params(tmp_path / "alone" / name))


def _assert_preempted_with_one_checkpoint(runs, summary, names):
  """Each named point was preempted and saved once, at the step it reached."""
  for name in names:
    assert summary[name]["status"] == "preempted"
    saved = [int(c.name) for c in (runs / name / "checkpoints").iterdir()]
    assert saved == [summary[name]["step"]]


def test_two_processes_pack_points_each_once_as_if_alone(tmp_path):
  spec = _seeds_sweep(tmp_path)
  runs = tmp_path / "runs"
  # Two steps, then a relaunch resumes each point to four on whichever
  # process takes it.
  first = _started(_launch_processes(f"{spec}:2", runs, returncode=1))
  started = _started(_launch_processes(f"{spec}:4", runs, returncode=1))

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
  _launch_processes(f"{spec}:4", runs, returncode=1)
  again = json.loads((runs / "sweep_summary.json").read_text())
  assert {n: again[n]["wall_time_s"] for n in summary} == {
      n: r["wall_time_s"] for n, r in summary.items()}


@pytest.mark.slow
def test_sigterm_to_both_processes_stops_their_points_and_starts_no_other(
    tmp_path):
  spec = _write_sweep(tmp_path, """{
          f"p{i}": {**POINT, "train.seed": i, "train.steps": 100000,
                    "train.checkpoint_every": 100000}
          for i in range(6)}""")
  runs = tmp_path / "runs"
  outputs = _launch_processes(spec, runs, returncode=trainer.EXIT_PREEMPTED,
                              signal_when=_training(
                                  runs, [f"p{i}" for i in range(6)], 4))
  started = _started(outputs)
  assert len(started[0]) == len(started[1]) == 2
  summary = json.loads((runs / "sweep_summary.json").read_text())
  statuses = {n: r["status"] for n, r in summary.items()}
  assert sorted(statuses.values()) == ["pending"] * 2 + ["preempted"] * 4
  _assert_preempted_with_one_checkpoint(runs, summary,
                                        started[0] + started[1])


def _train_seeds_in_host_pairs(tmp_path, seeds, steps, processes):
  """Trains points `seed0`.. of `steps` steps, each on two one-device hosts.

  Returns:
    The sweep file, the sweep's workdir and the points each process started.
  """
  spec = _write_sweep(tmp_path, f"""{{
          f"seed{{s}}": {{**POINT, "train.seed": s, "train.steps": {steps}}}
          for s in range({seeds})}}""")
  runs = tmp_path / "runs"
  started = _started(_launch_processes(spec, runs, processes=processes,
                                       devices=1, devices_per_point=2))
  return spec, runs, started


def test_points_larger_than_a_host_train_on_their_group_of_hosts(tmp_path):
  spec, runs, started = _train_seeds_in_host_pairs(tmp_path, seeds=3, steps=3,
                                                   processes=4)
  # Processes 0, 1 and 2, 3 each train their points together.
  assert started[0] == started[1] and started[2] == started[3]
  assert sorted(started[0] + started[2]) == ["seed0", "seed1", "seed2"]
  summary = json.loads((runs / "sweep_summary.json").read_text())
  assert {r["status"] for r in summary.values()} == {"ok"}
  for name, row in summary.items():
    assert row["processes"] == ([0, 1] if name in started[0] else [2, 3])
    assert sorted(p.name for p in (runs / name / "checkpoints" / "3" / "data")
                  .glob("*.json")) == ["process_0-of-2.json",
                                       "process_1-of-2.json"]
  _assert_as_if_alone(tmp_path, spec, runs, summary, devices=2)


def test_sigterm_to_one_process_of_a_group_stops_the_whole_group(tmp_path):
  names = ["a", "b", "c"]
  spec = _write_sweep(tmp_path, f"""{{
          name: {{**POINT, "train.lr": lr, "train.steps": 100000,
                  "train.checkpoint_every": 100000}}
          for name, lr in zip({names!r}, (1e-2, 3e-3, 1e-3))}}""")
  runs = tmp_path / "runs"
  outputs = _launch_processes(spec, runs, processes=4, devices=1,
                              devices_per_point=2,
                              returncode=trainer.EXIT_PREEMPTED,
                              signal_when=_training(runs, names, 2),
                              signalled=[1, 3])
  started = _started(outputs)
  assert started[0] == started[1] and started[2] == started[3]
  summary = json.loads((runs / "sweep_summary.json").read_text())
  _assert_preempted_with_one_checkpoint(runs, summary,
                                        started[0] + started[2])
  assert sorted(r["status"] for r in summary.values()) == [
      "pending", "preempted", "preempted"]


@pytest.mark.slow
def test_a_host_left_out_of_every_group_idles_until_the_sweep_ends(tmp_path):
  _, runs, started = _train_seeds_in_host_pairs(tmp_path, seeds=2, steps=2,
                                                processes=3)
  assert started[0] == started[1] == ["seed0", "seed1"] and not started[2]
  summary = json.loads((runs / "sweep_summary.json").read_text())
  assert [r["processes"] for r in summary.values()] == [[0, 1], [0, 1]]
  assert {r["status"] for r in summary.values()} == {"ok"}
