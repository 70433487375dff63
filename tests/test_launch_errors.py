"""launch.py's errors as a user meets them: one short line on stderr (no
library noise) for a full disk or a `--force` onto other shapes, Ctrl-C that
saves, flags that cannot work, and where the results went."""

import json
import resource
import signal
import subprocess
import sys

from test_launch import ROOT, TINY, launch, launch_env, wait_for_lines


def run_launch(*args, preexec_fn=None, extra_env=None
               ) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args],
                        cwd=ROOT, env={**launch_env(1), **(extra_env or {})},
                        capture_output=True, text=True, timeout=240,
                        preexec_fn=preexec_fn)


def file_size_limit(limit: int):
  """A preexec_fn: writing a file past `limit` bytes fails like a full disk."""
  def apply():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return apply


def error_lines(stderr: str) -> list[str]:
  """stderr's lines, but the progress bar's ("3.5s/step" or "2.1step/s")."""
  return [line for line in stderr.splitlines()
          if line.strip() and "s/step" not in line and "step/s" not in line]


def test_full_disk_during_a_save_is_one_line(tmp_path):
  # Old code: 741 lines of orbax and "Event loop is closed" tracebacks.
  # No compilation cache: the size limit would make jax warn about every
  # entry it cannot write, and leave truncated ones that later runs warn
  # about reading.
  result = run_launch(*TINY, f"--workdir={tmp_path / 'run'}",
                      "--config.train.steps=4",
                      "--config.train.checkpoint_every=2",
                      preexec_fn=file_size_limit(3000),
                      extra_env={"JAX_ENABLE_COMPILATION_CACHE": "false"})
  assert result.returncode == 1
  lines = error_lines(result.stderr)
  assert len(lines) <= 5, result.stderr[-3000:]
  assert lines[-1].startswith("launch.py: error:")
  assert "File too large" in lines[-1]


def test_force_onto_other_shapes_is_a_few_lines(tmp_path):
  # Old code: 527 lines, the error in the middle.
  args = [*TINY, f"--workdir={tmp_path}", "--config.train.checkpoint_every=2"]
  assert run_launch(*args, "--config.train.steps=2").returncode == 0
  result = run_launch(*args, "--config.train.steps=4",
                      "--config.model.d_model=32", "--force")
  assert result.returncode == 1
  lines = error_lines(result.stderr)
  assert len(lines) <= 5, result.stderr[-3000:]
  assert "no checkpoint fits" in lines[-1]
  assert "--force: resuming" in result.stderr


def test_ctrl_c_saves_and_exits_130_and_a_second_exits_at_once(tmp_path):
  # Old code: a KeyboardInterrupt traceback, nothing saved since the last
  # checkpoint.
  args = [*TINY, "--config.train.checkpoint_every=1000",
          "--config.train.steps=100000"]
  proc = launch(*args, f"--workdir={tmp_path / 'once'}")
  wait_for_lines(tmp_path / "once" / "metrics.jsonl", 3, proc)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 130, out[-3000:]
  assert "checkpoint saved in" in out and "Traceback" not in out
  assert any(p.name.isdigit() for p in (tmp_path / "once" / "checkpoints")
             .iterdir())
  proc = launch(*args, f"--workdir={tmp_path / 'twice'}")
  wait_for_lines(tmp_path / "twice" / "metrics.jsonl", 3, proc)
  proc.send_signal(signal.SIGINT)
  # The second Ctrl-C goes once the first is handled, while the run saves:
  # a fixed wait could outlast the save of so small a model.
  for line in proc.stdout:
    if "SIGINT: saving" in line:
      break
  proc.send_signal(signal.SIGINT)
  proc.communicate(timeout=30)
  assert proc.returncode == -signal.SIGINT


def test_eval_past_a_truncated_newest_checkpoint_is_a_few_lines(tmp_path):
  # Old code: 2,684 lines of orbax tracebacks, although the fallback worked.
  args = [*TINY, f"--workdir={tmp_path}", "--config.train.checkpoint_every=2"]
  assert run_launch(*args, "--config.train.steps=4").returncode == 0
  files = (tmp_path / "checkpoints" / "4" / "state").rglob("d/*")
  damaged = max((p for p in files if p.is_file()),
                key=lambda p: p.stat().st_size)
  damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])
  result = run_launch(f"--workdir={tmp_path}", "--mode=eval")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = error_lines(result.stderr)
  assert len(lines) <= 5, result.stderr[-3000:]
  assert "checkpoints/4 cannot be restored" in result.stderr
  assert json.loads((tmp_path / "eval_summary.json").read_text())["steps"] == 2


def test_finished_run_names_its_results(tmp_path):
  # Old code: a bare JSON dump.
  result = run_launch(*TINY, f"--workdir={tmp_path}", "--config.train.steps=2",
                      "--config.train.eval_every=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 1: eval/accuracy" in result.stdout
  assert result.stdout.splitlines()[-1].startswith(
      f"results in {tmp_path}: summary.json")


def test_sample_flags_that_cannot_work_are_one_line(tmp_path):
  # Old code: --num_samples=0 reached sampling (ZeroDivisionError).
  for flag in ("--num_samples=0", "--num_samples=-1", "--num_tokens=-1"):
    result = run_launch(f"--workdir={tmp_path}", "--mode=sample", flag)
    assert result.returncode == 1
    assert len(error_lines(result.stderr)) == 1, result.stderr
    assert flag.split("=")[0][2:] in result.stderr
