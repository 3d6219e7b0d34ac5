"""The common projection module: x -> (q, k, v) with independent head layouts, and o -> y.

q: [B, T, Hq, D], k/v: [B, T, Hkv, D]; kernels keep their head axes so they
shard on "heads" / "kv_heads" and map one-to-one onto outside checkpoints.
"""

from __future__ import annotations

import jax
from flax import nnx

from layers.attention.config import AttentionConfig
from layers.linear import Linear


class QKVProjection(nnx.Module):

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    kw = dict(use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.q = Linear(cfg.d_model, (cfg.num_heads, cfg.head_dim),
                    axes=("embed", "heads", "head_dim"), **kw)
    self.k = Linear(cfg.d_model, (cfg.num_kv_heads, cfg.head_dim),
                    axes=("embed", "kv_heads", "head_dim"), **kw)
    self.v = Linear(cfg.d_model, (cfg.num_kv_heads, cfg.head_dim),
                    axes=("embed", "kv_heads", "head_dim"), **kw)

  def __call__(self, x: jax.Array, kv_input: jax.Array | None = None):
    src = x if kv_input is None else kv_input
    return self.q(x), self.k(src), self.v(src)


class OutProjection(nnx.Module):
  """[B, T, H, D] -> [B, T, d_model]; H = cfg.num_heads unless `num_heads` is given (an
  encoding that widens the heads, layers/attention/positional.py (d))."""

  def __init__(self, cfg: AttentionConfig, *, num_heads: int | None = None, rngs: nnx.Rngs):
    num_heads = cfg.num_heads if num_heads is None else num_heads
    self.o = Linear((num_heads, cfg.head_dim), cfg.d_model,
                    axes=("heads", "head_dim", "embed"), use_bias=cfg.use_bias,
                    dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, o: jax.Array) -> jax.Array:
    return self.o(o)
