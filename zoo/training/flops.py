"""The machine's measured matmul peak, the denominator of model FLOPs utilisation.

MFU = (model FLOPs per token x tokens/s) / (peak FLOP/s x devices), as in the
PaLM paper. Vendor peaks are meaningless on a CPU, so the peak is measured:
the best of a few large jitted matmuls in the compute dtype. A config may pin
it instead (`config.peak_flops_per_device`), e.g. the datasheet number on a TPU.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=None)
def measured_peak_flops(dtype_name: str = "float32", n: int = 0, repeats: int = 5) -> float:
  """Best FLOP/s of an n x n x n matmul on the default device (n picked per platform)."""
  platform = jax.devices()[0].platform
  n = n or (2048 if platform == "cpu" else 8192)
  dtype = jnp.dtype(dtype_name)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best
