"""Packed sweeps: disjoint sub-meshes train points concurrently, as if alone."""

import collections
import os
import signal
import textwrap
import threading
import time

import jax
import numpy as np
import pytest

from sessa_jax.sweeps import sweep
from sessa_jax.train import trainer
from test_train_loop import train_losses
from test_train_sweep import ROOT, TINY

FakeDevice = collections.namedtuple("FakeDevice", "id process_index")


def _hosts(num_hosts, per_host, interleave=False):
  """Fake devices; with `interleave`, host h holds ids h, h + H, h + 2H..."""
  return [FakeDevice(d * num_hosts + h if interleave else h * per_host + d, h)
          for h in range(num_hosts) for d in range(per_host)]


def _ids(groups):
  return [[d.id for d in g] for g in groups]


def test_device_groups_stay_within_a_host_when_they_fit():
  assert _ids(sweep.device_groups(_hosts(1, 8), 2)) == [
      [0, 1], [2, 3], [4, 5], [6, 7]]
  assert _ids(sweep.device_groups(_hosts(2, 4, interleave=True), 2)) == [
      [0, 2], [4, 6], [1, 3], [5, 7]]
  # Three per point on hosts of four: one point per host, one device idle.
  groups = sweep.device_groups(_hosts(2, 4), 3)
  assert _ids(groups) == [[0, 1, 2], [4, 5, 6]]
  assert all(len({d.process_index for d in g}) == 1 for g in groups)
  # Larger than a host: whole hosts.
  assert _ids(sweep.device_groups(_hosts(4, 2), 4)) == [[0, 1, 2, 3],
                                                        [4, 5, 6, 7]]
  assert _ids(sweep.device_groups(_hosts(1, 8), 8)) == [list(range(8))]


@pytest.mark.parametrize("hosts,per_point,message", [
    ((2, 4), 6, "not a whole number of equal hosts"),
    ((1, 8), 9, r"must lie in \[1, 8\]"),
    ((1, 8), 0, r"must lie in \[1, 8\]"),
])
def test_device_groups_refuse_sizes_that_do_not_fit(hosts, per_point, message):
  with pytest.raises(ValueError, match=message):
    sweep.device_groups(_hosts(*hosts), per_point)


def _write_sweep(tmp_path, points: str):
  path = tmp_path / "packed.py"
  path.write_text(textwrap.dedent(f"""
      POINT = {{"config": {str(ROOT / "configs" / "mqar.py")!r}, **{TINY!r}}}

      def sweep(preset):
        return {points}
      """))
  return str(path)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_four_points_on_two_devices_each_run_at_once_and_match_alone(tmp_path):
  spec = _write_sweep(tmp_path, """{
          f"seed{s}": {**POINT, "train.seed": s, "train.steps": 4}
          for s in range(4)}""")
  results = sweep.run_sweep(spec, tmp_path / "packed", devices_per_point=2)

  assert {r["status"] for r in results.values()} == {"ok"}
  devices = [set(r["devices"]) for r in results.values()]
  assert all(len(d) == 2 for d in devices)
  assert set().union(*devices) == set(range(8))  # Disjoint, all used.
  # All four ran at the same time: each started before any finished.
  assert max(r["start_time"] for r in results.values()) < min(
      r["end_time"] for r in results.values())

  for name, packed in results.items():
    alone = trainer.train(sweep._point_config(sweep.load_sweep(spec)[name]),
                          tmp_path / "alone" / name,
                          devices=jax.devices()[:2])
    np.testing.assert_allclose(
        [l for _, l in train_losses(tmp_path / "packed" / name)],
        [l for _, l in train_losses(tmp_path / "alone" / name)], rtol=1e-6)
    assert packed["eval/loss"] == pytest.approx(alone["eval/loss"], rel=1e-6)

  # A rerun finds every point finished and trains nothing.
  again = sweep.run_sweep(spec, tmp_path / "packed", devices_per_point=2)
  assert [r["wall_time_s"] for r in again.values()] == [
      r["wall_time_s"] for r in results.values()]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sigterm_stops_every_running_point_and_starts_no_other(tmp_path):
  spec = _write_sweep(tmp_path, """{
          name: {**POINT, "train.lr": lr, "train.steps": 100000,
                 "train.checkpoint_every": 1000}
          for name, lr in (("a", 1e-2), ("b", 3e-3), ("c", 1e-3))}""")
  runs = tmp_path / "runs"

  def terminate_once_both_train():
    while not all((runs / p / "metrics.jsonl").exists() and
                  (runs / p / "metrics.jsonl").read_text().count("\n") >= 2
                  for p in "ab"):
      time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=terminate_once_both_train, daemon=True).start()
  results = sweep.run_sweep(spec, runs, devices_per_point=4)
  assert [results[p]["status"] for p in "abc"] == [
      "preempted", "preempted", "pending"]
  assert not (runs / "c").exists()
  for p in "ab":
    saved = [int(c.name) for c in (runs / p / "checkpoints").iterdir()]
    assert saved == [results[p]["step"]]
  assert set(results["a"]["devices"]).isdisjoint(results["b"]["devices"])
