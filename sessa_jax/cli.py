"""Command lines of the scripts: absl flags, each script's own `FlagValues`.

A script defines its flags in a function of a `flags.FlagValues` and its
`main(argv)` parses them with `parse`:

  def _define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("quick", False, "a smoke run", flag_values=fv)

  def main(argv: Sequence[str] | None = None) -> None:
    args, _ = cli.parse(argv, _define_flags, "What the script does.")

Nothing is defined at import time and nothing on the global `flags.FLAGS`,
so scripts that import one another, tests that import several and
`launch.py` (whose flags are global) never clash, and a test calls
`main(["--flag=value", ...])` with the arguments it would type. `argv` is
the arguments after the program name (`sys.argv[1:]` when None); `-h` or
`--help` prints the flags and exits 0, a bad command line exits 2 with one
line on stderr.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn, Sequence

from absl import flags


class _HelpFlag(flags.BooleanFlag):
  """`-h`/`--help`: prints the help as soon as it is parsed, then exits 0."""

  def __init__(self, text: Callable[[], str]):
    super().__init__("help", False, "show this help and exit", short_name="h")
    self._text = text

  def parse(self, argument) -> None:
    if self._parse(argument):
      print(self._text())
      raise SystemExit(0)


def _prog() -> str:
  return os.path.basename(sys.argv[0])


def error(message: str) -> NoReturn:
  """Exits 2 with `PROG: error: MESSAGE` on stderr (a bad command line)."""
  print(f"{_prog()}: error: {message}", file=sys.stderr)
  raise SystemExit(2)


def parse(argv: Sequence[str] | None,
          define: Callable[[flags.FlagValues], None], description: str, *,
          positional: str = "",
          hidden: Sequence[str] = ()) -> tuple[flags.FlagValues, list[str]]:
  """Parses `argv` against the flags `define` puts on a fresh `FlagValues`.

  Args:
    argv: the arguments after the program name; `sys.argv[1:]` when None.
    define: defines the script's flags on the `FlagValues` it is given.
    description: the help's text above the flags.
    positional: how the arguments other than flags are named in the help
      (e.g. "DIR"); empty when the script takes none, and then any is an
      error.
    hidden: flags left out of the help (e.g. a child process's `--child`).

  Returns:
    The parsed flags (each a read as an attribute, `args.NAME`) and the
    arguments other than flags, in order.
  """
  fv = flags.FlagValues()
  define(fv)
  module = next(iter(fv.flags_by_module_dict()))  # The script's.

  def text() -> str:
    for name in hidden:
      delattr(fv, name)
    usage = " ".join(filter(None, [_prog(), "[flags]", positional]))
    return f"usage: {usage}\n\n{description}\n{fv.module_help(module)}"

  flags.DEFINE_flag(_HelpFlag(text), flag_values=fv, module_name=module)
  try:
    rest = fv([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])[1:]
  except flags.Error as e:
    error(str(e))
  if rest and not positional:
    error(f"unrecognized arguments: {' '.join(rest)}")
  return fv, rest
