"""The matched-budget sweep definition, the report, and both end to end."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from sessa_jax import budget
from sessa_jax import data as data_lib
from sessa_jax.models.config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name: str):
  spec = importlib.util.spec_from_file_location(
      f"_test_{name}", ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


matched_budget = _load("matched_budget")
report = _load("report")


def _model_cfg(point, vocab_size):
  fields = {k.split(".", 1)[1]: v for k, v in point.items()
            if k.startswith("model.")}
  return ModelConfig(**fields, vocab_size=vocab_size)


def _groups(points):
  by_task = {}
  for name, point in points.items():
    by_task.setdefault(name.split(".")[0], {})[name] = point
  return by_task


def test_cpu_preset_is_matched(monkeypatch):
  monkeypatch.setattr(matched_budget, "AUSTEN", pathlib.Path("/nonexistent"))
  points = matched_budget.sweep("cpu")
  by_task = _groups(points)
  assert set(by_task) == {"symbol_soup", "diffuse_mqar"}  # No corpus: no text.
  for task, group in by_task.items():
    variants = {name.split(".")[1] for name in group}
    ablation = {"sessa_nofb"} if task == "diffuse_mqar" else set()
    assert variants == {"sessa", "attention", "mamba2"} | ablation
    assert {name.split(".")[2] for name in group} == {"s0", "s1"}
    data = {k.split(".", 1)[1]: v for k, v in next(iter(group.values())).items()
            if k.startswith("data.")}
    vocab = data_lib.get_task({"task": task, **data}).vocab_size
    counts = {n: budget.count_params(_model_cfg(p, vocab))
              for n, p in group.items()}
    target = counts[f"{task}.sessa.s0"]
    assert all(abs(c / target - 1) <= 0.02 for c in counts.values()), counts
    shared = lambda p: {k: v for k, v in p.items()  # pylint: disable=g-long-lambda
                        if k.startswith(("train.", "data.")) and k != "train.seed"}
    assert all(shared(p) == shared(next(iter(group.values())))
               for p in group.values())
    assert all(p["model.feedback"] is (".sessa_nofb." not in n)
               for n, p in group.items())
    assert all(p["config"].startswith(f"configs/{task}.py:") for p in group.values())


def test_text_task_follows_the_corpus(monkeypatch, tmp_path):
  (tmp_path / "a.txt").write_text("It is a truth universally acknowledged. " * 400)
  monkeypatch.setattr(matched_budget, "AUSTEN", pathlib.Path("/nonexistent"))
  points = matched_budget.sweep(f"cpu,seeds=3,text={tmp_path / '*.txt'}")
  text = _groups(points)["text"]
  assert len(text) == 3 * 3  # Three mixers, three seeds, no ablation.
  assert all(p["data.path"] == str(tmp_path / "*.txt") for p in text.values())
  with pytest.raises(ValueError, match="not one of: tiny, cpu, paper"):
    matched_budget.sweep("laptop")
  with pytest.raises(ValueError, match="expected text=GLOB or seeds=N"):
    matched_budget.sweep("cpu,seeds=zero")


def test_austen_split_holds_out_novels(monkeypatch, austen_dir):
  monkeypatch.setattr(matched_budget, "AUSTEN", austen_dir)
  data = matched_budget.task_data(matched_budget.PRESETS["cpu"], "text", None)
  assert data["test_path"].endswith("persuasion.txt")
  assert "persuasion" not in data["path"]


def _fake_run(root, name, *, task, mixer, seed, acc, feedback=True):
  path = root / name
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps({
      "model": {"mixer": mixer, "feedback": feedback, "block": "gated"},
      "data": {"task": task, "max_lag": 32}, "train": {"seed": seed}}))
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
  (runs / "diffuse_mqar.mamba2.s0").mkdir()
  (runs / "diffuse_mqar.mamba2.s0" / "config.json").write_text(json.dumps(
      {"model": {"mixer": "mamba2"}, "data": {"task": "diffuse_mqar"}}))
  out = tmp_path / "results"
  md = report.write_report(runs, out, "study", memory_tail_task="none",
                           commands=["python launch.py --sweep=x"])
  text = md.read_text()
  std = np.std([0.5, 0.7], ddof=1)
  assert f"| sessa | 78.21k | 3.10M | 0.3000 ± {std / 2:.4f} | 0.6000 ± {std:.4f} | 0.1541 | 2/2 | 20 | 100 ± 1 |" in text
  assert "| attention | 78.21k | 3.10M | 0.1500 ± 0.0000 | 0.3000 ± 0.0000 | 0.1222 |" in text
  assert "| sessa (no feedback) |" in text and "| mamba2 | — |" in text
  assert "0/1" in text and "diffuse_mqar.mamba2.s0" in text
  assert "python launch.py --sweep=x" in text
  assert "| sessa |" in capsys.readouterr().out
  for png in ("study_curves_diffuse_mqar.png", "study_accuracy_by_lag.png"):
    assert (out / png).stat().st_size > 1000 and f"({png})" in text


def test_tiny_sweep_and_report_end_to_end(tmp_path, monkeypatch):
  from sessa_jax.train import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(ROOT)
  results = sweep_lib.run_sweep("experiments/matched_budget.py:tiny",
                                tmp_path / "tiny")
  assert {r["status"] for r in results.values()} == {"ok"}, results
  out = tmp_path / "results"
  md = report.write_report(tmp_path / "tiny", out, "tiny")
  text = md.read_text()
  assert "| sessa |" in text and "| attention |" in text
  for png in ("tiny_curves_diffuse_mqar.png", "tiny_accuracy_by_lag.png",
              "tiny_memory_tail.png"):
    assert (out / png).stat().st_size > 1000, png
  tail = json.loads((out / "tiny_memory_tail.json").read_text())
  assert set(tail) == {"sessa", "attention"}
  assert np.isfinite(tail["attention"]["influence"]["slope"])
  assert 0 <= tail["sessa"]["bound"]["c2"] <= 1
