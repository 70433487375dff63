"""The feedback benchmark scripts run end to end (the GPU check as a CPU dry
run)."""

import json
import subprocess
import sys

import pytest

from experiments import bench
from experiments import gpu_check


@pytest.mark.slow  # Compiles every case in interpret mode: a few minutes.
def test_gpu_check_dry_run_writes_json_and_tables(tmp_path):
  subprocess.run(
      [sys.executable, "experiments/gpu_check.py", "--dry_run",
       "--lengths=32", f"--out_dir={tmp_path}"], check=True,
      capture_output=True, timeout=300)
  result = json.loads((tmp_path / "gpu_check.json").read_text())
  assert result["dry_run"] and len(result["correctness"]) == 3
  for case in result["correctness"]:
    assert case["ok"], case
    if case["dtype"] == "float32":
      assert max(case["rel_max_error"].values()) < 1e-4, case
  impls = {(row["impl"], row.get("heads")): row for row in result["timings"]}
  assert impls[("pallas", None)]["seconds"] > 0
  assert impls[("dense", None)]["seconds"] > 0
  assert "skipped" in impls[("cudnn_attention", 4)]
  assert "skipped" in impls[("cudnn_attention", 1)]
  assert result["ratios"]["pallas_compile_s"] == {
      "32": impls[("pallas", None)]["compile_s"]}
  layers = {(row["mixer"], row.get("feedback_impl")): row
            for row in result["layers"]}
  assert set(layers) == {("sessa", "pallas"), ("sessa", "chunked"),
                         ("attention", None), ("mamba2", None)}
  assert all(row["tokens_per_s"] > 0 for row in layers.values()), layers
  table = (tmp_path / "gpu_check.md").read_text()
  assert "| float32 | 40 |" in table and "| 32 |" in table


def test_gpu_check_ratios_and_tables():
  result = {
      "device": "H200", "jax": "0", "argv": "", "wall_s": 1.0,
      "config": {"batch": 2, "width": 256, "heads": 4, "chunk": 256,
                 "tile": {}},
      "correctness": [{"t": 1024, "dtype": "float32", "ok": True,
                       "rel_max_error": dict.fromkeys(gpu_check.NAMES, 1e-4)}],
      "timings": [
          {"t": 4096, "impl": "pallas", "seconds": 2e-3, "compile_s": 5.0},
          {"t": 4096, "impl": "cudnn_attention", "heads": 4, "seconds": 1e-3},
          {"t": 4096, "impl": "cudnn_attention", "heads": 1, "error": "x"},
          {"t": 32768, "impl": "pallas", "seconds": 8e-2, "compile_s": 6.0},
          {"t": 32768, "impl": "cudnn_attention", "heads": 4,
           "seconds": 1e-2}],
      "layers": [
          {"t": 4096, "mixer": "sessa", "feedback_impl": "pallas",
           "tokens_per_s": 3e6},
          {"t": 4096, "mixer": "attention", "tokens_per_s": 6e6}],
  }
  result["ratios"] = ratios = gpu_check.ratios(result)
  assert ratios["pallas_over_cudnn"] == {4096: 2.0, 32768: 8.0}
  assert ratios["sessa_over_attention_tokens"] == {4096: 0.5}
  assert ratios["compile_longest_over_shortest"] == 6.0 / 5.0
  table = gpu_check.markdown(result)
  assert "| 4096 | 2 ms | 1 ms | error | 5.0 s |" in table, table
  assert "| 4096 | sessa (pallas) | 3e+06 |" in table, table


def test_bench_flop_convention():
  # Two causal products of T*D/2 multiply-adds per token, 2 FLOPs each.
  assert bench._solve_flops(1024) == 2 * 2 * bench.B * 1024 * 1024 / 2 * 256
