"""Test session settings. Tests that need several devices run in a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see tests/zoo/training)."""

import jax
import pytest


def has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)

