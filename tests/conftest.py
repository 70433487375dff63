"""Test setup: 8 fake CPU devices for sharding tests, shared paths."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # pylint: disable=g-import-not-at-top

ASSETS = pathlib.Path(__file__).parent / "assets"
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def assets_dir() -> pathlib.Path:
  return ASSETS


@pytest.fixture
def austen_dir() -> pathlib.Path:
  """The Austen-6 corpus beside the checkout; skips where it is absent."""
  path = SHARED / "data" / "austen"
  if not path.is_dir():
    pytest.skip("../shared/data/austen is not present")
  return path
