"""matplotlib for the plotting scripts in experiments/ (an optional extra)."""

from __future__ import annotations

INSTALL_HINT = ("pip install -e '.[plot]' in the checkout (`make install` "
                "includes it)")


def pyplot():
  """`matplotlib.pyplot` on the file-only Agg backend.

  Returns:
    The `matplotlib.pyplot` module.

  Raises:
    ImportError: matplotlib is not installed; the message says how to install
      it.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"plotting needs matplotlib, which is not installed: "
                      f"{INSTALL_HINT}") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt
