"""Reference decode attention in plain jax.numpy: the specification.

A few new query tokens per sequence attend to a KV cache. For sequence b,
query head h (reading kv head g = h // (Hq // Hkv)) and query step t < Tq,
with L = lengths[b] (or lengths[b, g] for per-kv-head lengths):

    pos_t  = L - Tq + t                          the query's own position
    S_ts   = scale * q_{b,t,h} . k_{b,s,g}        for cache positions s <= pos_t
    S_ts   = cap * tanh(S_ts / cap)               if logits_soft_cap
    lse_t  = log(sum_{s <= pos_t} exp(S_ts) + exp(sink_h))    the sink term if sinks
    out_t  = sum_{s <= pos_t} exp(S_ts - lse_t) v_{b,s,g}

The new tokens are already written into the cache (the last of them at L - 1),
so the last query sees all L entries and the queries are causal among
themselves: this is the last Tq rows of causal attention over cache[:L]. A
query with nothing visible (L = 0, or pos_t < 0) outputs zeros; its lse is
-inf, or the sink logit with sinks. Cache entries at positions >= L are never
read: whatever they hold (stale pages, NaN) cannot reach the output. Lengths
must lie in [0, capacity]; capacity is S, or pages_per_seq * page_size.

The reference gathers pages into a contiguous cache and calls the dense flash
reference (`pallas_kernels.flash.reference.attention`) with the mask above:
structured (causal, query positions L - Tq + t) for per-sequence lengths, a
dense [B, Hq, Tq, S] mask for per-kv-head lengths. It repeats kv heads and is
quadratic on purpose; every fast path is tested against it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.decode import cache_layout
from pallas_kernels.flash import masking
from pallas_kernels.flash import reference as flash_reference


def check_args(q, k_cache, v_cache, lengths, page_table=None, sinks=None,
               logits_soft_cap=None) -> None:
  """Shape rules shared by every path; errors name the offending argument."""
  if q.ndim != 4:
    raise ValueError(f"q must be [batch, q_len, q_heads, head_dim], got shape {tuple(q.shape)}")
  layout = "[num_pages, page_size, kv_heads, head_dim]" if page_table is not None else (
      "[batch, capacity, kv_heads, head_dim]")
  if k_cache.ndim != 4:
    raise ValueError(f"k_cache must be {layout}, got shape {tuple(k_cache.shape)}")
  if tuple(v_cache.shape) != tuple(k_cache.shape):
    raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got"
                     f" {tuple(v_cache.shape)}")
  if v_cache.dtype != k_cache.dtype:
    raise ValueError(f"v_cache dtype {v_cache.dtype} differs from k_cache dtype {k_cache.dtype}")
  for name, x in (("q", q), ("k_cache", k_cache)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")
  b, tq, hq, d = q.shape
  hkv = k_cache.shape[2]
  if tq < 1:
    raise ValueError(f"q must hold at least one query step, got q_len={tq}")
  if k_cache.shape[3] != d:
    raise ValueError(f"k_cache head_dim {k_cache.shape[3]} differs from q head_dim {d}")
  if hq % hkv:
    raise ValueError(f"q heads ({hq}) must be a multiple of k_cache kv heads ({hkv})")
  if page_table is not None:
    if page_table.ndim != 2 or page_table.shape[0] != b:
      raise ValueError(f"page_table must be [batch={b}, pages_per_seq], got shape"
                       f" {tuple(page_table.shape)}")
    if not jnp.issubdtype(page_table.dtype, jnp.integer):
      raise ValueError(f"page_table must be an integer array, got {page_table.dtype}")
  elif k_cache.shape[0] != b:
    raise ValueError(f"k_cache batch {k_cache.shape[0]} differs from q batch {b}")
  if tuple(lengths.shape) not in ((b,), (b, hkv)):
    raise ValueError(f"lengths must be [batch={b}] or [batch={b}, kv_heads={hkv}], got shape"
                     f" {tuple(lengths.shape)}")
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be an integer array, got {lengths.dtype}")
  if sinks is not None and tuple(sinks.shape) != (hq,):
    raise ValueError(f"sinks must have shape ({hq},) (one logit per query head), got"
                     f" {tuple(sinks.shape)}")
  if logits_soft_cap is not None and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    lengths: jax.Array,
    page_table: Optional[jax.Array] = None,
    scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None,
    return_lse: bool = False,
    return_probs: bool = False,
):
  """Dense decode attention. Returns out [B, Tq, Hq, D] (+ lse [B, Hq, Tq]) (+ probs).

  `probs` are the weights [B, Hq, Tq, capacity] on the (gathered) cache
  positions; with sinks a row sums to less than one.
  """
  check_args(q, k_cache, v_cache, lengths, page_table, sinks, logits_soft_cap)
  if page_table is not None:
    k_cache = cache_layout.gather_pages(k_cache, page_table)
    v_cache = cache_layout.gather_pages(v_cache, page_table)
  b, tq, hq, _ = q.shape
  s, hkv = k_cache.shape[1], k_cache.shape[2]
  lengths = jnp.asarray(lengths, jnp.int32)
  # Positions past the length are never read, whatever they hold.
  written = jnp.arange(s)[None, :, None] < cache_layout.lengths_per_kv_head(lengths, hkv)[:, None]
  k_cache = jnp.where(written[..., None], k_cache, 0)
  v_cache = jnp.where(written[..., None], v_cache, 0)
  steps = jnp.arange(tq, dtype=jnp.int32)
  if lengths.ndim == 1:
    mask_args = masking.make_mask_args(
        b, tq, s, is_causal=True, q_positions=lengths[:, None] - tq + steps[None, :])
  else:
    per_q_head = cache_layout.lengths_per_kv_head(lengths, hkv).repeat(hq // hkv, axis=1)
    q_pos = per_q_head[:, :, None] - tq + steps  # [B, Hq, Tq]
    dense = jnp.arange(s)[None, None, None, :] <= q_pos[..., None]
    mask_args = masking.make_mask_args(b, tq, s, mask=dense, num_heads=hq)
  return flash_reference.attention(
      q, k_cache, v_cache, mask_args=mask_args, scale=scale, logits_soft_cap=logits_soft_cap,
      sinks=sinks, return_lse=return_lse, return_probs=return_probs)
