"""The feedback benchmark scripts run end to end (GPU check as a CPU dry run)."""

import json
import subprocess
import sys

from experiments import bench


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


def test_bench_flop_convention():
  # Two causal products of T*D/2 multiply-adds per token, 2 FLOPs each.
  assert bench._solve_flops(1024) == 2 * 2 * bench.B * 1024 * 1024 / 2 * 256
