"""Compile targets: names, kernel choice by target, the target dry run.

The deviceless compiles themselves need an accelerator compiler, which the
CPU suite does not install: `make test-targets` runs them. Here: what the
CPU environment can check, and that a missing compiler says how to get it.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from sessa_jax import targets
from sessa_jax.kernels import feedback
from sessa_jax.kernels.feedback import pallas as feedback_pallas
from sessa_jax.models import attention
from sessa_jax.train import compiled as compiled_lib
from sessa_jax.train import target_compile
from sessa_jax.train import trainer
from test_train_loop import tiny_config


def test_parse_names_gpus_and_tpu_slices():
  h200 = targets.parse("H200")
  assert (h200.platform, h200.smem_bytes, h200.chips) == ("gpu", 232_448, 1)
  assert targets.parse("a100").smem_bytes == 166_912
  assert targets.parse("h200x8").topology == "1x1x8"
  slice_ = targets.parse("v5e:4x4")
  assert (slice_.platform, slice_.chips, slice_.memory_bytes) == (
      "tpu", 16, 16 << 30)
  assert targets.parse("v5p:2x2x2").chips == 8
  for bad in ("h300", "v5e", "v5e:2xa", "v7:2x2", "h200x0"):
    with pytest.raises(ValueError, match="is not one of: h200, h100, a100"):
      targets.parse(bad)


def test_kernel_choice_follows_the_target_not_the_process():
  assert targets.platform() == jax.default_backend() == "cpu"
  assert feedback.resolve_impl("auto") == "chunked"
  assert attention.resolve_impl("auto", jnp.bfloat16, 64) == "xla"
  with targets.compiling_for("h200"):
    assert targets.active().name == "h200"
    assert feedback.resolve_impl("auto") == "pallas"
    assert feedback_pallas._default_backend() == "gpu"
    assert attention.resolve_impl("auto", jnp.bfloat16, 64) == "cudnn"
  with targets.compiling_for("v5e:2x2"):
    assert feedback_pallas._default_backend() == "tpu"
    assert attention.resolve_impl("auto", jnp.bfloat16, 64) == "xla"
  assert targets.active().platform == "cpu"


def test_gpu_tiles_follow_the_targets_shared_memory():
  bf16 = jnp.dtype(jnp.bfloat16)
  with targets.compiling_for("h200"):
    h200 = feedback_pallas.kernel_tilings("gpu", 256, 384, bf16, jnp.float32)
  with targets.compiling_for("a100"):
    a100 = feedback_pallas.kernel_tilings("gpu", 256, 384, bf16, jnp.float32)
  assert h200["rect_col"] == (32, 2) and a100["rect_col"] == (16, 2)


def test_kernels_traced_for_a_target_are_listed():
  args = [jnp.ones((1, 32, 16)), jnp.ones((1, 32, 16)),
          jnp.full((1, 32), 0.5), jnp.ones((1, 32, 16))]
  assert targets.traced_kernels() == []
  with targets.compiling_for("h200"):
    jax.eval_shape(lambda *a: feedback_pallas.feedback_solve_pallas(
        *a, chunk=16, interpret=True), *args)
    names = {name.split(" ")[0] for name, _, _ in targets.traced_kernels()}
  assert names == {"row_stats", "rect_apply", "leaf_solve"}


def test_explain_turns_on_chip_memory_errors_into_one_line():
  h200 = targets.parse("h200")
  smem = RuntimeError("RESOURCE_EXHAUSTED: Shared memory size limit "
                      "exceeded: requested 263168, available: 232448, "
                      "context: []\nmore")
  assert target_compile.explain(smem, h200) == (
      "a Pallas GPU kernel asks for 263,168 bytes of shared memory per "
      "block; h200 has 232,448")
  for vmem in ("E1001: CompileTimeScopedVmemOom: ...",
               "Ran out of memory in memory space vmem. Used 128.00M of "
               "127.94M vmem. Exceeded vmem capacity by 64.0K."):
    assert target_compile.explain(RuntimeError(vmem), targets.parse(
        "v6e:2x2")).endswith("(v6e:2x2's VMEM)")
  other = ValueError("first line\nsecond")
  assert target_compile.explain(other, h200) == "ValueError: first line"


def test_memory_report_says_whether_it_fits():
  stats = {"argument_bytes": 1 << 20, "output_bytes": 1 << 20,
           "temp_bytes": 2 << 20, "alias_bytes": 1 << 20,
           "peak_bytes": 3 << 20, "flops": None}
  assert "(0%; fits)" in compiled_lib.format_analysis(stats, 16 << 30)
  assert "does NOT fit" in compiled_lib.format_analysis(stats, 2 << 20)
  assert "fit" not in compiled_lib.format_analysis(stats)


def test_dry_run_refuses_a_step_larger_than_the_chip(monkeypatch):
  small = targets.Target("local:tiny", "cpu", memory_bytes=1 << 10)
  monkeypatch.setattr(targets, "local", lambda: small)
  with pytest.raises(trainer.DoesNotFit, match="local:tiny has 0.00 GiB"):
    trainer.dry_run(tiny_config())


@pytest.mark.skipif(target_compile.compiler_installed(targets.parse("h200")),
                    reason="the CUDA compiler is installed here")
def test_target_dry_run_without_its_compiler_says_how_to_install_it(
    tmp_path):
  proc = subprocess.run(
      [sys.executable, "launch.py", "--config=configs/default.py",
       f"--workdir={tmp_path / 'run'}", "--dry_run", "--target=h200"],
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "make dry-run TARGET=h200" in lines[0], lines
  assert not (tmp_path / "run").exists()
