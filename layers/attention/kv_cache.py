"""A contiguous KV cache for softmax self-attention decoding (ARCHITECTURE.md, contract point 7).

    k, v     [B, S, Hkv, D]   S = capacity; k is stored after the positional transform
    lengths  [B] int32        positions 0..L_b - 1 of sequence b are written

Token t of a step of Tq new tokens sits at position L_b + t: `write` puts its K/V
there and advances L_b by Tq, so the sequences of a batch may hold different
lengths (prompts of different sizes). Entries at positions >= L_b are never
read (stale writes past a length are harmless).

`attend_cache` is the attention of the new queries against the cache, the last
Tq rows of causal attention over cache[:L]:

    out_t = softmax_{s <= L - Tq + t, s in window}(scale q_t K_s^T + bias(i - s)) V_s

Without a window or distance bias it runs `pallas_kernels.decode_attention`
(the per-sequence-length decode kernels: Pallas on GPU/TPU, XLA on CPU); with
a sliding window or an ALiBi/BAM distance bias, which the decode kernels do not
express, it runs `flash_attention` with the query positions L - Tq + t, key
positions 0..S-1 and kv_lengths = L (the same visibility rules, tiled).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from layers.attention.masks import Mask
from pallas_kernels.decode import api as decode_api
from pallas_kernels.flash import api as flash_api


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """k, v [B, S, Hkv, D] and the per-sequence lengths [B] (int32)."""

  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @classmethod
  def zeros(cls, batch: int, capacity: int, num_kv_heads: int, head_dim: int,
            dtype=jnp.float32) -> "KVCache":
    if batch < 1 or capacity < 1:
      raise ValueError(f"a KV cache needs batch >= 1 and capacity >= 1, got batch={batch}, "
                       f"capacity={capacity}")
    shape = (batch, capacity, num_kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

  @property
  def capacity(self) -> int:
    return self.k.shape[1]

  def positions(self, num_tokens: int) -> jax.Array:
    """The positions [B, num_tokens] of the next tokens: L_b + t."""
    return self.lengths[:, None] + jnp.arange(num_tokens, dtype=jnp.int32)[None, :]

  def write(self, k: jax.Array, v: jax.Array) -> "KVCache":
    """New tokens' k, v [B, Tq, Hkv, D] at positions L_b + t; lengths += Tq.

    Positions past the capacity are dropped (the caller sizes the cache)."""
    pos = self.positions(k.shape[1])
    rows = jnp.arange(k.shape[0])[:, None]
    return KVCache(self.k.at[rows, pos].set(k.astype(self.k.dtype), mode="drop"),
                   self.v.at[rows, pos].set(v.astype(self.v.dtype), mode="drop"),
                   self.lengths + k.shape[1])

  def fill(self, k: jax.Array, v: jax.Array, lengths: jax.Array) -> "KVCache":
    """A prefill: k, v [B, T, Hkv, D] at positions 0..T-1, lengths = `lengths` [B] (the real
    tokens of right-padded prompts; the padding's entries are overwritten by later steps)."""
    t = k.shape[1]
    if t > self.capacity:
      raise ValueError(f"a prompt of {t} tokens does not fit a KV cache of capacity "
                       f"{self.capacity}")
    return KVCache(self.k.at[:, :t].set(k.astype(self.k.dtype)),
                   self.v.at[:, :t].set(v.astype(self.v.dtype)),
                   jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), self.lengths.shape))


def decode_implementation(implementation: str) -> str:
  """The decode backend of a layer's flash `implementation` ("cudnn", which has no decode
  backend, means "auto")."""
  return implementation if implementation in decode_api.available_implementations() else "auto"


def attend_cache(q: jax.Array, cache: KVCache, *, window=None,
                 distance_bias: Optional[jax.Array] = None, sinks: Optional[jax.Array] = None,
                 implementation: str = "auto") -> jax.Array:
  """q [B, Tq, Hq, D] (already transformed, the new tokens already written) -> [B, Tq, Hq, D].

  implementation: the layer's flash implementation name."""
  if window is None and distance_bias is None:
    return decode_api.decode_attention(q, cache.k, cache.v, lengths=cache.lengths, sinks=sinks,
                                       implementation=decode_implementation(implementation))
  b, tq = q.shape[:2]
  kv_positions = jnp.broadcast_to(jnp.arange(cache.capacity, dtype=jnp.int32),
                                  (b, cache.capacity))
  mask = Mask(causal=True, window=window, q_positions=cache.positions(tq) - tq,
              kv_positions=kv_positions, kv_lengths=cache.lengths)
  return flash_api.flash_attention(q, cache.k, cache.v, sinks=sinks, distance_bias=distance_bias,
                                   implementation=implementation, **mask.kernel_args())
