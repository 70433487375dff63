"""The matched-budget sweep definition, the report, and both end to end."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from experiments import matched_budget
from experiments import report
from experiments import symbol_soup_ceiling
from sessa_jax import budget
from sessa_jax import data as data_lib
from sessa_jax.models.config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _model_cfg(point, vocab_size):
  fields = {k.split(".", 1)[1]: v for k, v in point.items()
            if k.startswith("model.")}
  return ModelConfig(**fields, vocab_size=vocab_size)


def _groups(points):
  by_task = {}
  for name, point in points.items():
    by_task.setdefault(name.split(".")[0], {})[name] = point
  return by_task


@pytest.mark.parametrize("preset, variants, seeds, settings", [
    ("cpu", {"sessa", "attention", "mamba2"}, 2, {None}),
    ("cpu_long", {"sessa", "attention", "mamba2", "sessa+attention"}, 3,
     {None}),
    ("tune", {"sessa", "attention"}, 1, {"lr3e-3", "lr1e-2"}),
    ("device", {"sessa", "attention", "mamba2"}, 3, {None}),
    ("device_tiny", {"sessa", "attention", "mamba2"}, 1, {None}),
])
def test_presets_are_matched(monkeypatch, preset, variants, seeds, settings):
  monkeypatch.setattr(matched_budget, "AUSTEN", pathlib.Path("/nonexistent"))
  points = matched_budget.sweep(preset)
  by_task = _groups(points)
  assert set(by_task) == {"symbol_soup", "diffuse_mqar"}  # No corpus: no text.
  for task, group in by_task.items():
    parts = [name.split(".") for name in group]
    ablation = ({"sessa_nofb"} if preset == "cpu" and task == "diffuse_mqar"
                else set())
    assert {p[1] for p in parts} == variants | ablation
    assert {p[-1] for p in parts} == {f"s{i}" for i in range(seeds)}
    assert {p[2] if len(p) == 4 else None for p in parts} == settings
    data = {k.split(".", 1)[1]: v for k, v in next(iter(group.values())).items()
            if k.startswith("data.")}
    vocab = data_lib.get_task({"task": task, **data}).vocab_size
    counts = {n: budget.count_params(_model_cfg(p, vocab))
              for n, p in group.items()}
    target = next(c for n, c in counts.items() if ".sessa." in n)
    assert all(abs(c / target - 1) <= 0.02 for c in counts.values()), counts
    # Every variant of a grid setting trains with the same data and schedule.
    shared = lambda p: {  # pylint: disable=g-long-lambda
        k: v for k, v in p.items()
        if k.startswith(("train.", "data.")) and k != "train.seed"}
    for setting in settings:
      same = [p for n, p in group.items()
              if setting is None or f".{setting}." in n]
      assert all(shared(p) == shared(same[0]) for p in same)
    assert all(p["model.feedback"] is (".sessa_nofb." not in n)
               for n, p in group.items())
    assert all(p["config"] == f"configs/{task}.py" for p in group.values())
    assert all(p["model.mixer"] == n.split(".")[1].replace("+", ",")
               for n, p in group.items() if "nofb" not in n)


def _one_cpu_env() -> dict[str, str]:
  """The environment of a user's run: one plain CPU device."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # No fake devices (they once hid a hang).
  return env


def _run_script(args, timeout: float) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_one_cpu_env(),
                        capture_output=True, text=True, timeout=timeout,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module", name="device_tiny_sweep")
def _device_tiny_sweep(tmp_path_factory):
  """`device_tiny` trained by experiments/device_study.py, two at a time."""
  workdir = tmp_path_factory.mktemp("device_tiny")
  proc = _run_script(["experiments/device_study.py",
                      "--sweep=experiments/matched_budget.py:device_tiny",
                      f"--workdir={workdir}", "--concurrent=2"], timeout=600)
  return workdir, proc


def test_device_study_runs_points_concurrently_on_one_cpu(device_tiny_sweep):
  """Each point in its own process, two at a time; the sweep then finds
  every point finished (its config.json the sweep's own) and summarises."""
  workdir, proc = device_tiny_sweep
  summary = json.loads((workdir / "sweep_summary.json").read_text())
  assert set(summary) == set(matched_budget.sweep("device_tiny"))
  assert all(row["status"] == "ok" and row["steps"] == 3
             for row in summary.values()), summary
  assert all((workdir / f"{name}.log").stat().st_size for name in summary)
  assert "6 points, 2 at a time" in proc.stdout


def test_report_and_memory_tail_finish_on_one_cpu(device_tiny_sweep,
                                                  tmp_path):
  """Both analysis scripts, Sessa runs included, on one plain CPU device;
  a hang fails at the time limit instead of stalling the suite. (They once
  hung there: two LAPACK solves in one program waited on each other.)"""
  workdir, _ = device_tiny_sweep
  _run_script(["experiments/report.py", str(workdir), "--study=dt",
               f"--out={tmp_path}", "--reference_examples=20"], timeout=300)
  tail = json.loads((tmp_path / "dt_memory_tail.json").read_text())
  assert {"sessa s0", "attention s0", "mamba2 s0"} <= set(tail)
  _run_script(["experiments/memory_tail.py",
               f"--workdir=sessa={workdir / 'symbol_soup.sessa.s0'}",
               f"--out={tmp_path / 'mt'}"], timeout=300)
  assert json.loads((tmp_path / "mt.json").read_text())["sessa"]["layers"]


def test_points_come_seed_by_seed():
  names = list(matched_budget.sweep("cpu_long"))
  first = names[:len(names) // 3]
  assert all(n.endswith(".s0") for n in first)
  assert {n.split(".")[1] for n in first} == {
      "sessa", "attention", "mamba2", "sessa+attention"}


def test_horizon_is_cpu_long_symbol_soup_with_more_steps():
  study = matched_budget.sweep("cpu_long")
  horizon = matched_budget.sweep("horizon")
  assert set(horizon) == {f"symbol_soup.{mixer}.s{seed}"
                          for mixer in ("sessa", "attention", "mamba2")
                          for seed in (0, 1, 2)}
  for name, point in horizon.items():
    changed = {k for k in point.keys() | study[name].keys()
               if point.get(k) != study[name].get(k)}
    assert changed == {"train.steps", "train.eval_every",
                       "train.checkpoint_every"}
    assert point["train.steps"] == 5 * study[name]["train.steps"]


def test_text_task_follows_the_corpus(monkeypatch, tmp_path):
  (tmp_path / "a.txt").write_text(
      "It is a truth universally acknowledged. " * 400)
  monkeypatch.setattr(matched_budget, "AUSTEN", pathlib.Path("/nonexistent"))
  points = matched_budget.sweep(f"cpu,seeds=3,text={tmp_path / '*.txt'}")
  text = _groups(points)["text"]
  assert len(text) == 3 * 3  # Three mixers, three seeds, no ablation.
  assert all(p["data.path"] == str(tmp_path / "*.txt") for p in text.values())
  with pytest.raises(ValueError, match="not one of: tiny, cpu, tune, cpu_long, "
                                       "horizon, device, device_tiny, paper"):
    matched_budget.sweep("laptop")
  with pytest.raises(ValueError, match="expected text=GLOB or seeds=N"):
    matched_budget.sweep("cpu,seeds=zero")


def test_austen_split_holds_out_novels(monkeypatch, austen_dir):
  monkeypatch.setattr(matched_budget, "AUSTEN", austen_dir)
  data = matched_budget.task_data(matched_budget.PRESETS["cpu"], "text", None)
  assert data["test_path"].endswith("persuasion.txt")
  assert "persuasion" not in data["path"]


def _fake_run(root, name, *, task, mixer, seed, acc, feedback=True,
              data=None):
  path = root / name
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps({
      "model": {"mixer": mixer, "feedback": feedback, "block": "gated"},
      "data": {"task": task, "max_lag": 32, **(data or {})},
      "train": {"seed": seed}}))
  (path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in [
      {"step": 10, "train/loss": 3.0}, {"step": 20, "train/loss": 2.0,
                                        "eval/accuracy": acc / 2}]))
  (path / "summary.json").write_text(json.dumps({
      "test/accuracy": acc, "eval/accuracy": acc / 2, "params": 78210,
      "flops_per_token": 3.1e6, "steps": 20, "wall_time_s": 100.0 + seed,
      "test/accuracy_by_lag": {"32": acc, "128": acc / 4}}))


def test_report_tables_and_plots(tmp_path, capsys):
  runs = tmp_path / "study"
  for seed, (sessa, attn) in enumerate([(0.5, 0.3), (0.7, 0.3)]):
    _fake_run(runs, f"diffuse_mqar.sessa.s{seed}", task="diffuse_mqar",
              mixer="sessa", seed=seed, acc=sessa)
    _fake_run(runs, f"diffuse_mqar.attention.s{seed}", task="diffuse_mqar",
              mixer="attention", seed=seed, acc=attn)
  _fake_run(runs, "diffuse_mqar.sessa_nofb.s0", task="diffuse_mqar",
            mixer="sessa", seed=0, acc=0.2, feedback=False)
  _fake_run(runs, "diffuse_mqar.attention.lr1e-2.s0", task="diffuse_mqar",
            mixer="attention", seed=0, acc=0.9)
  _fake_run(runs, "diffuse_mqar.sessa.s2", task="diffuse_mqar",
            mixer="sessa", seed=2, acc=0.5)
  (runs / "diffuse_mqar.sessa.s2" / "summary.json").unlink()
  (runs / "diffuse_mqar.mamba2.s0").mkdir()
  (runs / "diffuse_mqar.mamba2.s0" / "config.json").write_text(json.dumps(
      {"model": {"mixer": "mamba2"}, "data": {"task": "diffuse_mqar"}}))
  out = tmp_path / "results"
  md = report.write_report(runs, out, "study", memory_tail_task="none",
                           commands=["python launch.py --sweep=x"])
  text = md.read_text()
  std = np.std([0.5, 0.7], ddof=1)
  assert (f"| sessa | 78.21k | 3.10M | 0.3000 ± {std / 2:.4f} | "
          f"0.6000 ± {std:.4f} | 0.1541 | 2/3 | 20 | 100 ± 1 |") in text
  assert ("| attention | 78.21k | 3.10M | 0.1500 ± 0.0000 | "
          "0.3000 ± 0.0000 | 0.1222 |") in text
  assert "| sessa (no feedback) |" in text and "| mamba2 | — |" in text
  # A tuning sweep's grid setting is a row of its own.
  assert "| attention @ lr1e-2 | 78.21k | 3.10M | 0.4500 | 0.9000 |" in text
  assert "0/1" in text and "diffuse_mqar.mamba2.s0" in text
  assert ("Unfinished runs, newest eval/accuracy: diffuse_mqar.sessa.s2 "
          "0.2500 at step 20.") in text
  assert "python launch.py --sweep=x" in text
  assert "| sessa |" in capsys.readouterr().out
  for png in ("study_curves_diffuse_mqar.png", "study_accuracy_by_lag.png"):
    assert (out / png).stat().st_size > 1000 and f"({png})" in text
  # Two seeds each: sessa - attention = 0.3 ± t(0.975, 1) * 0.1 (Welch, the
  # attention seeds agree); one seed of the ablation gives no interval.
  half = stats.t.ppf(0.975, 1) * std / np.sqrt(2)
  assert (f"| sessa − attention | +0.3000 | [{0.3 - half:+.4f}, "
          f"{0.3 + half:+.4f}] | no |") in text
  assert "Not resolved (the interval includes 0): sessa − attention." in text
  assert "no interval: sessa − sessa (no feedback)" in text


def test_report_json_round_trips_every_table(tmp_path):
  runs = tmp_path / "study"
  lengths = {"min_tokens": 110, "max_tokens": 160}
  for seed, acc in enumerate([0.61, 0.65, 0.7]):
    _fake_run(runs, f"symbol_soup.sessa.s{seed}", task="symbol_soup",
              mixer="sessa", seed=seed, acc=acc, data=lengths)
    _fake_run(runs, f"symbol_soup.sessa,attention.s{seed}", task="symbol_soup",
              mixer="sessa,attention", seed=seed, acc=acc / 3, data=lengths)
  md = report.write_report(runs, tmp_path / "out", "study",
                           memory_tail_task="none", reference_examples=40,
                           planned=["symbol_soup.sessa.s0", "text.sessa.s0",
                                    *(p.name for p in runs.iterdir())])
  results = json.loads((tmp_path / "out" / "study.json").read_text())
  entry = results["tasks"]["symbol_soup"]
  assert entry["metric"] == "accuracy"
  hybrid = entry["mixers"]["sessa,attention"]
  assert hybrid["seeds"] == [0, 1, 2] and hybrid["params"] == 78210
  np.testing.assert_allclose(hybrid["test"], [0.61 / 3, 0.65 / 3, 0.7 / 3])
  assert hybrid["config"]["model"]["mixer"] == "sessa,attention"
  assert "seed" not in hybrid["config"]["train"]
  assert results["not_finished"] == ["text.sessa.s0"]
  reference = entry["reference"]
  assert reference["tokens"] == [110, 160] and reference["num_examples"] == 40
  assert list(reference["accuracy"]) == [
      "pooled_all", "pooled_blocks", "per_block", "per_block_bigram"]
  text = md.read_text()
  assert "Reference classifiers at 110..160 tokens" in text
  assert text.startswith("# study\n\n**Partial**: 6 of 7 points finished")
  # Every table and comparison is recomputed from the JSON alone.
  for lines in report.render_tables(results).values():
    assert "\n".join(lines) in text
  assert "Resolved: sessa − sessa,attention." in text
  assert str(tmp_path) not in text and str(tmp_path) not in json.dumps(
      results)


def test_welch_interval_matches_scipy():
  rng = np.random.default_rng(0)
  a, b = rng.normal(1.0, 0.3, 5), rng.normal(0.6, 0.1, 3)
  diff, lo, hi = report.welch_interval(a, b)
  ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
  np.testing.assert_allclose([diff, lo, hi],
                             [a.mean() - b.mean(), ci.low, ci.high])
  assert report.welch_interval(a, b[:1]) is None


def test_tiny_sweep_and_report_end_to_end(tmp_path, monkeypatch):
  from sessa_jax.sweeps import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(ROOT)
  results = sweep_lib.run_sweep("experiments/matched_budget.py:tiny",
                                tmp_path / "tiny")
  assert {r["status"] for r in results.values()} == {"ok"}, results
  assert results["diffuse_mqar.sessa.s0"]["fields"] == {
      "task": "diffuse_mqar", "variant": "sessa", "setting": None, "seed": 0}
  out = tmp_path / "results"
  md = report.write_report(tmp_path / "tiny", out, "tiny")
  tiny = json.loads((out / "tiny.json").read_text())["tasks"]["diffuse_mqar"]
  assert set(tiny["mixers"]) == {"sessa", "attention", "sessa,attention"}
  text = md.read_text()
  assert "| sessa |" in text and "| attention |" in text
  assert "| sessa,attention |" in text
  for png in ("tiny_curves_diffuse_mqar.png", "tiny_accuracy_by_lag.png",
              "tiny_memory_tail.png"):
    assert (out / png).stat().st_size > 1000, png
  tail = json.loads((out / "tiny_memory_tail.json").read_text())
  # Every seed's run is measured, named by mixer and seed.
  assert set(tail) == {"sessa s0", "attention s0", "sessa,attention s0"}
  # The hybrid's one Sessa layer (layer 0) gets its feedback impulse response.
  assert [e["layer"] for e in tail["sessa,attention s0"]["layers"]] == [0]
  assert [e["layer"] for e in tail["sessa s0"]["layers"]] == [0, 1]
  assert np.isfinite(tail["attention s0"]["influence"]["slope"])
  assert 0 <= tail["sessa s0"]["bound"]["c2"] <= 1
  assert "| sessa s0 | 1 |" in text


def test_symbol_soup_reference_ladder():
  """Each rung of the reference classifiers reads more structure and scores
  higher, and every rung rises with the example length."""
  accuracies = symbol_soup_ceiling.accuracies
  short, long = accuracies(110, 160, 200), accuracies(400, 600, 200)
  for acc in (short, long):
    rungs = list(acc.values())
    assert 0.1 < rungs[0] and rungs == sorted(rungs), acc
  assert all(short[k] < long[k] for k in short), (short, long)
  assert long["per_block_bigram"] > 0.6, long


def test_seed_band_uses_steps_every_seed_logged():
  runs = [report.Run(name=f"t.sessa.s{i}", path=pathlib.Path("."), config={},
                     summary=None, metrics=metrics)
          for i, metrics in enumerate((
              [{"step": 0, "k": 1.0}, {"step": 10, "k": 3.0},
               {"step": 20, "k": 5.0}],
              [{"step": 0, "k": 3.0}, {"step": 10, "k": 1.0}]))]
  steps, mean, low, high, seeds = report._seed_band(runs, "k")  # pylint: disable=protected-access
  np.testing.assert_array_equal(steps, [0, 10])
  np.testing.assert_allclose(mean, [2.0, 2.0])
  np.testing.assert_allclose(low, [1.0, 1.0])
  np.testing.assert_allclose(high, [3.0, 3.0])
  assert seeds == 2 and report._seed_band(runs, "absent") is None  # pylint: disable=protected-access


def test_setting_is_the_rows_field_else_the_names(tmp_path):
  """A run's grid setting is its point's field in the sweep's row; a row
  written before rows held fields leaves it to the point's name."""
  for name in ("t.sessa.lr1.s0", "u.sessa.lr2.s0"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text("{}")
  (tmp_path / "sweep_summary.json").write_text(json.dumps({
      "t.sessa.lr1.s0": {"status": "ok", "fields": {"setting": "wide"}},
      "u.sessa.lr2.s0": {"status": "ok"}}))
  assert [r.setting for r in report.load_runs(tmp_path)] == ["wide", "lr2"]
