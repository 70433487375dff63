"""The README's commands, files, config keys and links exist in the repo.

Reads README.md as text (nothing runs): every `make X` is a Makefile target,
every path it names under configs/, experiments/, tests/ or docs/ exists,
every `--config.a.b` override and every dotted config key it names is a key
of some config in configs/, every flag of a `launch.py` (or other script)
command is defined by that program, and every docs/ link anywhere in the repo
points at a page and heading that exist.
"""

import os
import pathlib
import re

import pytest

from sessa_jax.train import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SECTIONS = config_lib.SECTIONS


def _commands(text: str) -> list[tuple[str, str]]:
  """Shell fragments with their paragraph: indented lines and code spans.

  Fenced blocks (the layout tree, Python snippets) hold no commands.
  """
  text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
  commands = []
  for paragraph in re.split(r"\n\s*\n", text):
    commands += [(l.strip(), paragraph) for l in paragraph.splitlines()
                 if l.startswith("    ")]
    commands += [(s.replace("\n", " "), paragraph)
                 for s in re.findall(r"`([^`]+)`", paragraph)]
  return commands


COMMANDS = [command for command, _ in _commands(README)]


def _programs(command: str, paragraph: str) -> list[pathlib.Path]:
  """The repo files whose flags `command` may use; empty for other tools.

  A flag standing alone in a code span (`--force`) belongs to launch.py or to
  a script the same paragraph names.
  """
  command = command.split("#")[0]
  if "launch.py" in command:
    return [REPO / "launch.py"]
  if command.startswith("--"):
    named = re.findall(r"\b((?:experiments/)\w+\.py)", paragraph)
    return [REPO / "launch.py"] + [REPO / p for p in named]
  match = re.search(r"python (?:-m (\S+)|(\S+\.py))", command)
  if not match:
    return []
  if match[1]:
    return [REPO / (match[1].replace(".", "/") + ".py")]
  return [REPO / match[2]]


def _defined_flags(path: pathlib.Path) -> set[str]:
  """Flag names an absl or argparse program defines (read from its source)."""
  source = path.read_text()
  names = set(re.findall(
      r"(?:DEFINE_\w+|add_argument)\(\s*[\"'](?:--)?(\w+)[\"']", source))
  names.add("help")
  if "absl" in source:
    # Imported for their side effect: they define absl's own flags.
    from absl import app, logging  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    from absl import flags  # pylint: disable=g-import-not-at-top
    names |= set(flags.FLAGS)  # absl's own: --verbosity, --helpfull, ...
  return names


def _config_keys() -> set[str]:
  """Every dotted key of every config in configs/ at its default argument."""
  keys = set()
  for path in sorted((REPO / "configs").glob("*.py")):
    config = config_lib.load_config(str(path))
    for section in SECTIONS:
      keys |= {f"{section}.{k}" for k in config[section]}
  return keys


def _make_targets() -> set[str]:
  makefile = (REPO / "Makefile").read_text()
  return set(re.findall(r"^([\w-]+):(?!=)", makefile, flags=re.MULTILINE))


def test_make_targets_exist():
  named = {m for c in COMMANDS for m in re.findall(r"^make ([\w-]+)", c)}
  assert {"run", "test"} <= named  # The README's two commands are seen.
  missing = named - _make_targets()
  assert not missing, f"README names make targets the Makefile lacks: {missing}"


def test_named_files_exist():
  pattern = r"\b((?:configs|experiments|tests|docs)/[\w./-]*\w)"
  named = {p for p in re.findall(pattern, README)
           if not re.search(r"<|\*", p)}
  # Package modules, named with or without the sessa_jax/ prefix.
  modules = set(re.findall(
      r"\b(?:sessa_jax/)?((?:models|kernels|data|train|analysis)/\w+\.py)",
      README))
  named |= {f"sessa_jax/{m}" for m in modules}
  assert {"configs/default.py", "sessa_jax/kernels/ssd.py"} <= named
  missing = sorted(p for p in named if not (REPO / p).exists())
  assert not missing, f"README names files that do not exist: {missing}"


def test_config_keys_exist():
  keys = _config_keys()
  named = set()
  for command in COMMANDS:
    named |= set(re.findall(r"--config\.([\w.]+)=", command))
    for section, key in re.findall(rf"^({'|'.join(SECTIONS)})\.(\w+)\b(?!\.)",
                                   command):
      named.add(f"{section}.{key}")
    for section, group in re.findall(r"^(\w+)\.\{([\w,]+)\}$", command):
      named |= {f"{section}.{k}" for k in group.split(",")}
  # The list of train keys given in parentheses after `train.*`.
  listed = re.search(r"`train\.\*` \(([^)]*)\)", README)
  named |= {f"train.{k.strip()}" for k in listed[1].replace("\n", " ")
            .split(",")}
  assert {"train.lr", "model.block", "mesh.tensor"} <= named
  missing = sorted(named - keys)
  assert not missing, f"README names config keys no config has: {missing}"


def test_flags_exist():
  checked = 0
  for command, paragraph in _commands(README):
    programs = _programs(command, paragraph)
    if not programs:
      continue
    for program in programs:
      assert program.is_file(), f"README runs {program}, which is missing"
    # Leading VAR=value settings are the environment's, not the program's.
    argv = re.sub(r"^(\w+=\S*\s+)+", "", command.split("#")[0].lstrip())
    flags = set(re.findall(r"--(\w+)\b(?!\.)", argv))
    missing = flags - set().union(*map(_defined_flags, programs))
    assert not missing, (f"README passes {sorted(missing)} to "
                         f"{[p.name for p in programs]} in {command!r}")
    checked += bool(flags)
  assert checked >= 5


def _text_files() -> list[pathlib.Path]:
  """The repo's .py, .md and .json files, skipping build and run outputs."""
  skip = {".git", ".venv", "workdirs", "build", "__pycache__"}
  files = []
  for root, dirs, names in os.walk(REPO):
    dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
    files += [pathlib.Path(root) / n for n in names
              if n.endswith((".py", ".md", ".json"))]
  return files


def _anchor(heading: str) -> str:
  """GitHub's anchor of a markdown heading."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


@pytest.mark.parametrize("page", sorted(
    p.name for p in (REPO / "docs").glob("*.md")))
def test_docs_links_resolve(page):
  headings = re.findall(r"^#+ (.+)$", (REPO / "docs" / page).read_text(),
                        flags=re.MULTILINE)
  anchors = {_anchor(h) for h in headings}
  seen = 0
  for path in _text_files():
    for anchor in re.findall(rf"docs/{re.escape(page)}#([\w-]+)",
                             path.read_text(errors="ignore")):
      seen += 1
      assert anchor in anchors, f"{path.relative_to(REPO)} links to " \
          f"docs/{page}#{anchor}, which is not a heading of docs/{page}"
    for anchor in re.findall(r"\]\(#([\w-]+)\)", path.read_text(
        errors="ignore")) if path.name == page else ():
      assert anchor in anchors, f"docs/{page} links to missing #{anchor}"
  assert page != "design.md" or seen >= 10
