"""pytest plugin: the GPU-marked Mosaic GPU tests, run in GPU interpret mode on the CPU.

The tests believe they are on a Hopper GPU (jax.default_backend() says "gpu",
mosaic_gpu.hopper() says yes), and every plgpu.kernel runs in the interpreter.
MGPU_RACES=1 also turns on its happens-before race detector, and a test that
races fails.
"""
import os

import jax
import pytest
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret import params

RACES = os.environ.get("MGPU_RACES") == "1"


def pytest_configure(config):
  del config
  jax.default_backend = lambda: "gpu"
  from pallas_kernels import mosaic_gpu  # noqa: PLC0415 - after the backend is faked
  mosaic_gpu.hopper = lambda: (True, "")
  params.set_gpu_interpret_mode(params.InterpretGPUParams(detect_races=RACES))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:  # tests/conftest.py skips GPU-marked tests where no GPU is found
    item.own_markers = [m for m in item.own_markers if m.name != "skip"]


@pytest.fixture(autouse=True)
def _no_races():
  yield
  if RACES:
    races = gpu_callbacks.get_races()
    assert races is not None and not races.races_found, "the GPU interpreter found a data race"
