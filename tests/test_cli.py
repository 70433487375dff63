"""sessa_jax.cli: the experiment scripts' absl command lines."""

import pathlib
import subprocess
import sys

import pytest
from absl import flags

from sessa_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("steps", 3, "steps to run", flag_values=fv)
  flags.DEFINE_bool("quick", False, "a smoke run", flag_values=fv)
  flags.DEFINE_bool("child", False, "internal", flag_values=fv)


def test_flags_parse_on_their_own_flag_values():
  args, rest = cli.parse(["--steps=5", "--quick", "run_dir"], _define,
                         "A script.", positional="DIR")
  assert (args.steps, args.quick, rest) == (5, True, ["run_dir"])
  assert "steps" not in flags.FLAGS  # Nothing defined globally.
  again, _ = cli.parse([], _define, "A script.")  # A second parse is fresh.
  assert (again.steps, again.quick) == (3, False)


def test_help_lists_the_flags_but_hidden_ones_and_exits_0(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.parse(["--help"], _define, "A script.", hidden=("child",))
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert "A script." in out and "--steps" in out and "--child" not in out


@pytest.mark.parametrize("argv,message", [
    (["--stepz=2"], "Unknown command line flag 'stepz'"),
    (["--steps=two"], "steps"),
    (["stray"], "unrecognized arguments: stray"),
])
def test_bad_command_lines_exit_2_in_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.parse(argv, _define, "A script.")
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1


def test_a_script_prints_its_help_as_a_user_runs_it():
  result = subprocess.run(
      [sys.executable, "experiments/report.py", "--help"], cwd=ROOT,
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "usage: report.py [flags] " in result.stdout
  assert "--study" in result.stdout
