"""Lets JAX 0.11's Python run on jaxlib 0.10's binaries, for GPU interpret mode only.

Two gaps need filling: jaxlib 0.10 has no strong_lru_cache (a plain
functools.lru_cache stands in), and its Shardy bindings lack ReductionOp
(a placeholder; interpret mode never lowers a reduction sharding).
"""
import functools

import jaxlib.mlir.dialects.sdy as _sdy
import jaxlib.weakref_lru_cache as _weakref_lru_cache


def _strong_lru_cache(f, context_fn, max_size, num_shards=64):
  del num_shards

  @functools.lru_cache(maxsize=max_size)
  def cached(context, args, kwargs):
    return f(*args, **dict(kwargs))

  @functools.wraps(f)
  def wrapper(*args, **kwargs):
    return cached(context_fn() if context_fn else None, args, tuple(sorted(kwargs.items())))

  wrapper.cache_clear = cached.cache_clear
  wrapper.cache_info = cached.cache_info
  wrapper.cache_keys = lambda: []
  return wrapper


if not hasattr(_weakref_lru_cache, "strong_lru_cache"):
  _weakref_lru_cache.strong_lru_cache = _strong_lru_cache
if not hasattr(_sdy, "ReductionOp"):
  class ReductionOp:  # noqa: D101 - a placeholder for enum members named in a dict literal
    SUM = MAX = MIN = PROD = None
  _sdy.ReductionOp = ReductionOp
