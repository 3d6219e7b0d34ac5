"""How the decode paths see a KV cache: pages, per-kv-head lengths, query rows per kv head.

Two cache layouts reach the decode paths:

  contiguous:  k_cache, v_cache [B, S, Hkv, D]; sequence b owns k_cache[b].
  paged:       k_pages, v_pages [num_pages, page_size, Hkv, D] and
               page_table [B, pages_per_seq] int32; logical position s of
               sequence b lives at k_pages[page_table[b, s // page_size],
               s % page_size].

A contiguous cache *is* a paged one with pages of any size `block` dividing S
and the identity table page_table[b, p] = b * (S // block) + p; the view is a
free reshape (`contiguous_as_pages`), so the kernels only know pages.

Lengths are [B] (one per sequence) or [B, Hkv] (one per kv head, for head-wise
eviction); `lengths_per_kv_head` broadcasts the first to the second.

Grouped queries: query head h = g * G + j (G = Hq // Hkv) reads kv head g. The
kernels see the Tq * G query rows of kv head g as one matrix, row r = t * G + j
(`group_queries`), so one pass over a kv head's cache serves all its query heads
and no per-query-head copy of the cache is ever made.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp


def lengths_per_kv_head(lengths: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B] or [B, Hkv] -> int32 [B, Hkv]."""
  lengths = jnp.asarray(lengths, jnp.int32)
  if lengths.ndim == 1:
    lengths = jnp.broadcast_to(lengths[:, None], (lengths.shape[0], num_kv_heads))
  return lengths


def gather_pages(pages: jax.Array, page_table: jax.Array) -> jax.Array:
  """[num_pages, page_size, Hkv, D] x [B, P] -> the contiguous [B, P * page_size, Hkv, D]."""
  b, p = page_table.shape
  _, page_size, hkv, d = pages.shape
  return pages[page_table].reshape(b, p * page_size, hkv, d)


def contiguous_as_pages(cache: jax.Array, block: int) -> Tuple[jax.Array, jax.Array]:
  """[B, S, Hkv, D] -> (pages [B * S // block, block, Hkv, D], page_table [B, S // block]).

  A reshape (no copy); `block` must divide S.
  """
  b, s, hkv, d = cache.shape
  if s % block:
    raise ValueError(f"block ({block}) must divide the cache length S={s}")
  per_seq = s // block
  table = jnp.arange(b * per_seq, dtype=jnp.int32).reshape(b, per_seq)
  return cache.reshape(b * per_seq, block, hkv, d), table


def as_pages(k_cache: jax.Array, v_cache: jax.Array, page_table: Optional[jax.Array],
             block: Optional[int]) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """(k_pages, v_pages, int32 page_table): a paged cache as is, a contiguous one viewed in
  pages of `block` rows (which must divide S)."""
  if page_table is None:
    k_pages, page_table = contiguous_as_pages(k_cache, block)
    v_pages, _ = contiguous_as_pages(v_cache, block)
    return k_pages, v_pages, page_table
  return k_cache, v_cache, page_table.astype(jnp.int32)


def split_pages(pages_per_seq: int, programs: int, target: int,
                num_splits: Optional[int] = None) -> Tuple[int, int]:
  """(num_splits, pages_per_split): kv splits (flash-decoding) until `programs * splits`
  reaches `target`, or `num_splits` if given; no split is empty."""
  if num_splits is None:
    num_splits = max(1, min(pages_per_seq, -(-target // programs)))
  pages_per_split = -(-pages_per_seq // num_splits)
  return -(-pages_per_seq // pages_per_split), pages_per_split


def split_kernel_inputs(q, k_cache, v_cache, page_table, block: Optional[int], *, rows: int,
                        target: int, num_splits: Optional[int] = None):
  """What a GPU split-decode kernel reads: (k_pages, v_pages, page_table, grouped queries
  [B, Hkv, rows, D] in the cache dtype, num_splits, pages_per_split)."""
  k_pages, v_pages, page_table = as_pages(k_cache, v_cache, page_table, block)
  hkv = k_pages.shape[2]
  num_splits, pages_per_split = split_pages(page_table.shape[1], q.shape[0] * hkv, target,
                                            num_splits)
  qg = group_queries(q.astype(k_pages.dtype), hkv, rows)
  return k_pages, v_pages, page_table, qg, num_splits, pages_per_split


def pick_block(length: int, *, cap: int, multiple_of: int = 1, power_of_two: bool = False
               ) -> Optional[int]:
  """The largest divisor of `length` that is <= cap and a multiple of `multiple_of`
  (and a power of two if asked), or None if there is none."""
  for block in range(min(cap, length), 0, -1):
    if length % block or block % multiple_of:
      continue
    if power_of_two and block & (block - 1):
      continue
    return block
  return None


def group_queries(q: jax.Array, num_kv_heads: int, rows: int) -> jax.Array:
  """q [B, Tq, Hq, D] -> [B, Hkv, rows, D], row r = t * G + j holds query head g * G + j at
  step t; rows past Tq * G are zeros (padding to the kernel's tile)."""
  b, tq, hq, d = q.shape
  g = hq // num_kv_heads
  x = q.reshape(b, tq, num_kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, num_kv_heads,
                                                                            tq * g, d)
  return jnp.pad(x, ((0, 0), (0, 0), (0, rows - tq * g), (0, 0)))


def ungroup_rows(x: jax.Array, q_len: int, num_q_heads: int) -> jax.Array:
  """[B, Hkv, rows, ...] -> [B, Tq, Hq, ...], the inverse of `group_queries` (drops padding)."""
  b, hkv = x.shape[:2]
  g = num_q_heads // hkv
  rest = x.shape[3:]
  x = x[:, :, :q_len * g].reshape(b, hkv, q_len, g, *rest)
  return jnp.moveaxis(x, 2, 1).reshape(b, q_len, num_q_heads, *rest)


def sinks_per_row(sinks: jax.Array, num_kv_heads: int, q_len: int, rows: int) -> jax.Array:
  """sinks [Hq] -> float32 [Hkv, rows] in the row order of `group_queries` (-inf on padding)."""
  per_group = sinks.astype(jnp.float32).reshape(num_kv_heads, -1)  # [Hkv, G]
  x = jnp.tile(per_group, (1, q_len))  # row t * G + j -> sinks[g * G + j]
  return jnp.pad(x, ((0, 0), (0, rows - x.shape[1])), constant_values=-jnp.inf)


def call_refusal(call, dtypes, block_kv: Optional[int]) -> Optional[str]:
  """Why a decode kernel cannot take `call` for dtype or block reasons, shared by every backend."""
  if call.q_dtype != call.kv_dtype:
    return f"q dtype {call.q_dtype} differs from the cache dtype {call.kv_dtype}"
  if call.kv_dtype not in dtypes:
    names = ", ".join(str(d) for d in dtypes)
    return f"dtype {call.kv_dtype} is not one of {names}"
  if block_kv is not None and not call.paged and call.capacity % block_kv:
    return f"block_kv={block_kv} does not divide the cache length {call.capacity}"
  return None

