"""Value checks shared by the config dataclasses of models, data and training.

Each raises a ValueError that names the offending key as `section.key`, the
way it is written on the command line (`--config.model.d_model=...`).
"""

from __future__ import annotations

from typing import Any, Iterable


def at_least(section: str, config: Any, keys: Iterable[str],
             minimum: int | float = 1) -> None:
  """Checks that each named attribute of `config` is >= `minimum`.

  Args:
    section: the config section (`model`, `data`, `train`), for the message.
    config: the object holding the values (a config dataclass).
    keys: attribute names to check; a value of None is not checked.
    minimum: the smallest allowed value.

  Raises:
    ValueError: naming the first key whose value is below `minimum`.
  """
  for key in keys:
    value = getattr(config, key)
    if value is not None and value < minimum:
      raise ValueError(f"{section}.{key} must be >= {minimum}, got {value}")


def one_of(section: str, key: str, value: Any, choices: Iterable[Any]) -> None:
  """Raises a ValueError naming `section.key` and the choices unless allowed."""
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"{section}.{key}={value!r} is not one of: "
                     f"{', '.join(map(str, choices))}")
