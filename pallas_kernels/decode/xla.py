"""Decode attention in plain XLA: grouped queries against the cache, no per-query-head copies.

The equations are those of `reference.py`. Query heads are viewed as
[B, Tq, Hkv, G, D] so each kv head is contracted once with all of its G query
heads (one batched matmul per kv head; the cache is never repeated):

    S[b, g, t, j, s] = scale * q[b, t, g, j] . k[b, s, g]      float32
    visible          = s <= L[b, g] - Tq + t

then the masked softmax (with sinks in the denominator) and P V.

Memory: the float32 scores and weights, 2 x [B, Hq, Tq, capacity]; one masked
copy of V ([B, capacity, Hkv, D], positions past the length zeroed so that
stale or NaN entries cannot leak through 0 * NaN); with a page table, also the
gathered pages of K and V ([B, pages_per_seq * page_size, Hkv, D] each, the
gather fusing with the masking). Supports every call, on every platform.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.decode import cache_layout


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
):
  """out [B, Tq, Hq, D] in q.dtype (+ lse [B, Hq, Tq] float32); arguments as in `api.py`."""
  if page_table is not None:
    k_cache = cache_layout.gather_pages(k_cache, page_table)
    v_cache = cache_layout.gather_pages(v_cache, page_table)
  b, tq, hq, d = q.shape
  s, hkv = k_cache.shape[1], k_cache.shape[2]
  g = hq // hkv
  scale = d ** -0.5 if scale is None else scale
  lengths = cache_layout.lengths_per_kv_head(lengths, hkv)  # [B, Hkv]

  qg = q.reshape(b, tq, hkv, g, d)
  logits = jnp.einsum("btkjd,bskd->bktjs", qg, k_cache,
                      preferred_element_type=jnp.float32) * scale
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  q_pos = lengths[:, :, None] - tq + jnp.arange(tq, dtype=jnp.int32)  # [B, Hkv, Tq]
  visible = jnp.arange(s)[None, None, None, None, :] <= q_pos[:, :, :, None, None]
  logits = jnp.where(visible, logits, -jnp.inf)

  m = jnp.max(logits, axis=-1, initial=-jnp.inf)  # [B, Hkv, Tq, G]
  if sinks is not None:
    sink = sinks.astype(jnp.float32).reshape(1, hkv, 1, g)
    m = jnp.maximum(m, sink)
  shift = jnp.where(m == -jnp.inf, 0.0, m)
  p = jnp.exp(logits - shift[..., None])
  l = jnp.sum(p, axis=-1)
  if sinks is not None:
    l = l + jnp.exp(sink - shift)

  written = jnp.arange(s)[None, :, None] < lengths[:, None, :]  # [B, S, Hkv]
  v_cache = jnp.where(written[..., None], v_cache, jnp.zeros((), v_cache.dtype))
  acc = jnp.einsum("bktjs,bskd->btkjd", p.astype(v_cache.dtype), v_cache,
                   preferred_element_type=jnp.float32)
  l_btkj = l.transpose(0, 2, 1, 3)  # [B, Tq, Hkv, G]
  out = acc / jnp.where(l_btkj == 0, 1.0, l_btkj)[..., None]
  out = out.reshape(b, tq, hq, d).astype(q.dtype)
  if not return_lse:
    return out
  lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + shift, -jnp.inf)
  return out, lse.transpose(0, 1, 3, 2).reshape(b, hq, tq)  # [B, Hkv, G, Tq] -> [B, Hq, Tq]
