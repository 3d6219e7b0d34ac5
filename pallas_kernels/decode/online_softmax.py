"""The online softmax the decode kernels share: one block step inside a kernel, one merge after.

A kernel walks one kv head's cache block by block, holding for each query row
a running max m, a running denominator l and an unnormalised output acc:

    S      = scale * Q K_blk^T  (then cap * tanh(S / cap)), -inf where invisible
    m'     = max(m, max_s S)                      (-inf while nothing is visible)
    alpha  = exp(m - m'),  P = exp(S - m')        (a -inf m' is shifted by 0 instead)
    l'     = alpha l + sum_s P
    acc'   = alpha acc + P V_blk                  (P cast to V's dtype, f32 accumulation)

Splits of the cache (kv-splits, or none) leave partial states (acc_i, m_i, l_i)
that `finalize` merges, adding the sinks:

    M   = max(max_i m_i, sink)
    l   = sum_i exp(m_i - M) l_i + exp(sink - M)
    out = sum_i exp(m_i - M) acc_i / l            (0 where l = 0)
    lse = M + log l                               (-inf where l = 0)

A row is visible at cache position s iff s <= L - Tq + t for its step t = r // G.
Kernels test it without a vector division: (s - L + Tq) * G <= r.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.decode import cache_layout
from pallas_kernels.flash import tile


def visible(positions: jax.Array, rows: jax.Array, length, q_len: int, group: int) -> jax.Array:
  """Row r (step r // group) sees cache position s iff s <= length - q_len + r // group."""
  return (positions - length + q_len) * group <= rows


def block_scores(q, k, *, scale: float, logits_soft_cap: Optional[float]) -> jax.Array:
  """scale * q k^T in float32 (then the soft cap): [rows, D] x [block, D] -> [rows, block]."""
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
  if logits_soft_cap is not None:
    s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
  return s


def step(s, v, m, l, acc):
  """One block: s [rows, block] masked scores (f32), v [block, D]; m, l [rows, 1]; acc [rows, D].

  The flash kernels' tile step (`pallas_kernels/flash/tile.py`), in this module's argument order.
  """
  return tile.online_softmax_step(m, l, acc, s, v)


def finalize(acc: jax.Array, m: jax.Array, l: jax.Array, sinks: Optional[jax.Array] = None):
  """Merges partial states over axis 0: acc [n, ..., D], m, l [n, ...]; sinks broadcasts to
  m.shape[1:]. Returns (out [..., D] float32, lse [...] float32)."""
  m_all = jnp.max(m, axis=0)
  if sinks is not None:
    m_all = jnp.maximum(m_all, sinks)
  shift = jnp.where(m_all == -jnp.inf, 0.0, m_all)
  w = jnp.exp(m - shift)  # a split with nothing visible has m = -inf and weighs 0
  l_all = jnp.sum(w * l, axis=0)
  if sinks is not None:
    l_all = l_all + jnp.exp(sinks - shift)
  acc_all = jnp.sum(w[..., None] * acc, axis=0)
  out = acc_all / jnp.where(l_all == 0, 1.0, l_all)[..., None]
  lse = jnp.where(l_all > 0, jnp.log(jnp.where(l_all > 0, l_all, 1.0)) + shift, -jnp.inf)
  return out, lse


def finish_grouped(acc, m, l, *, sinks, q_len: int, num_q_heads: int, dtype, return_lse: bool):
  """A split kernel's partial states over grouped rows -> out [B, Tq, Hq, D] (and lse [B, Hq, Tq]).

  acc [n, B, Hkv, rows, D], m and l [n, B, Hkv, rows] (float32), rows in
  `cache_layout.group_queries` order; `sinks` [Hq] or None.
  """
  hkv, rows = acc.shape[2], acc.shape[3]
  sink_rows = None
  if sinks is not None:
    sink_rows = cache_layout.sinks_per_row(sinks, hkv, q_len, rows)[None]
  out, lse = finalize(acc, m, l, sink_rows)
  out = cache_layout.ungroup_rows(out, q_len, num_q_heads).astype(dtype)
  if not return_lse:
    return out
  return out, cache_layout.ungroup_rows(lse, q_len, num_q_heads).transpose(0, 2, 1)

