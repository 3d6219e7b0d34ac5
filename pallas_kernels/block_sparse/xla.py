"""Block-sparse attention in plain XLA: gather the listed key blocks, attend densely over them.

The tiled XLA flash path can only skip a tile when no (batch, head) of its
slab needs it, so with per-head lists its cost stays that of dense attention.
This path's cost follows the lists instead: for query block I of (b, h) it
gathers the n key blocks the list names,

    K_I = concat_j K[idx[b, h, I, j]],   V_I likewise        [n * bk, D]
    S_I = tile logits of Q_I K_I^T  (scale, soft cap, distance bias,
          the token mask of masking.py; -inf in tiles past the count,
          out of range or repeated)
    O_I = softmax(S_I [, sink_h]) V_I,   lse_I = logsumexp(S_I [, sink_h])

so a forward costs B * Hq * Tq * n * bk * D multiply-adds, n / nk of dense
attention, and the backward (autodiff: the gathers transpose to scatter-adds
into dK and dV) the same fraction of dense. The list width n is the static
budget; entries past `block_counts` only cost masked work, which is why the
dispatch uses this path only when n < nk.

Memory stays linear in T: query blocks run in chunks under `lax.map` (as
many per chunk as fit `score_budget` scores: cache-sized on CPU, large on
accelerators), each chunk rematerialised in the backward (`jax.checkpoint`),
so at most one chunk's gathered keys and scores are alive at a time.

The math inside a tile is `flash/tile.py`'s, the same functions the Pallas
kernels use, evaluated on batched tiles; entries are canonicalised within the
list width (sorted, repeats and out-of-range entries masked), which gives the
semantics of `reference.py` (the expanded block mask) exactly.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash import masking
from pallas_kernels.flash import reference
from pallas_kernels.flash import tile
from pallas_kernels.flash import xla as flash_xla

_F32 = jnp.float32
# Score elements per chunk of query blocks (float32). On accelerators 32 Mi
# (128 MiB, the same again for probabilities): large matmuls, bounded memory
# at T = 32k. On CPU the dense XLA path's cache-sized tile: at T = 8192,
# H = 4, 10% density that measured 1.6x (forward) and 2.1x (forward +
# backward) faster than 32 Mi on the 2-core EPYC.
ACCELERATOR_SCORE_BUDGET = 1 << 25


def default_score_budget(platform: str) -> int:
  return flash_xla.CPU_TILE_ELEMENTS if platform == "cpu" else ACCELERATOR_SCORE_BUDGET


def canonical_lists(indices: jax.Array, counts: jax.Array, num_kv_blocks: int):
  """Lists within their own width: (sorted indices, valid [.., n] bool); repeats, entries past the count and out-of-range entries are invalid."""
  n = indices.shape[-1]
  take = (jnp.arange(n) < counts[..., None]) & (indices >= 0) & (indices < num_kv_blocks)
  keyed = jnp.sort(jnp.where(take, indices, num_kv_blocks).astype(jnp.int32), axis=-1)
  first = jnp.concatenate(
      [jnp.ones_like(keyed[..., :1], bool), keyed[..., 1:] != keyed[..., :-1]], axis=-1)
  valid = (keyed < num_kv_blocks) & first
  return jnp.where(valid, keyed, 0), valid


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_indices: jax.Array,
    block_counts: jax.Array,
    *,
    block_shape: Tuple[int, int],
    mask_args: masking.MaskArgs,
    scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None,
    distance_bias: Optional[jax.Array] = None,
    return_lse: bool = False,
    score_budget: Optional[int] = None,
):
  """Block-sparse attention by gathering; the contract of `block_sparse_attention`.

  `mask_args` is the structured mask (no dense part, no block mask: the
  lists are the block mask). Differentiable in q, k, v, sinks and
  distance_bias. `score_budget`: score elements per chunk of query blocks
  (default `default_score_budget` of the platform).
  """
  if mask_args.dense is not None or mask_args.block_mask is not None:
    raise ValueError("the gather path takes the block lists, not a dense or block mask")
  b, tq, hq, d = q.shape
  tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  g = hq // hkv
  bq, bk = block_shape
  nq, nk = -(-tq // bq), -(-tk // bk)
  n = block_indices.shape[-1]
  scale = d ** -0.5 if scale is None else float(scale)

  idx, valid = canonical_lists(block_indices, block_counts, nk)
  heads = idx.shape[1]  # 1 (shared by all heads) or Hq
  g_lists = 1 if heads == 1 else g
  # [nq, B, Hkv, G', n]: query blocks lead, for lax.map.
  def per_kv_head(x):
    x = jnp.broadcast_to(x, (b, heads, nq, n))
    x = x.reshape(b, heads // g_lists, g_lists, nq, n)
    x = jnp.broadcast_to(x, (b, hkv, g_lists, nq, n))
    return jnp.moveaxis(x, 3, 0)
  idx, valid = per_kv_head(idx), per_kv_head(valid)

  q_pad = jnp.pad(q, ((0, 0), (0, nq * bq - tq), (0, 0), (0, 0)))
  qb = q_pad.reshape(b, nq, bq, hkv, g, d).transpose(1, 0, 3, 4, 2, 5)  # [nq, B, Hkv, G, bq, D]
  def kv_blocks(x):  # [B, Tk, Hkv, D] -> [B, Hkv, nk, bk, D]
    x = jnp.pad(x, ((0, 0), (0, nk * bk - tk), (0, 0), (0, 0)))
    return x.reshape(b, nk, bk, hkv, x.shape[-1]).transpose(0, 3, 1, 2, 4)
  kb, vb = kv_blocks(k), kv_blocks(v)

  m = mask_args
  needs_pos = m.q_positions is not None or distance_bias is not None
  q_pos, kv_pos = reference.positions(m, b, tq, tk) if needs_pos else (None, None)
  spec = tile.TileSpec(
      scale=scale, soft_cap=logits_soft_cap, is_causal=m.is_causal, window=m.window,
      chunk_size=m.chunk_size, has_prefix=m.prefix_lengths is not None,
      has_positions=needs_pos, has_segments=m.q_segment_ids is not None,
      has_distance_bias=distance_bias is not None, has_sinks=sinks is not None)
  # Per-head scalars as tile.py's rows, shaped to broadcast over [B, Hkv, G, bq, L].
  params = jnp.zeros((hq, tile.NUM_HEAD_PARAMS), _F32)
  if distance_bias is not None:
    params = params.at[:, :3].set(distance_bias.astype(_F32))
  if sinks is not None:
    params = params.at[:, tile.SINK].set(sinks.astype(_F32))
  params = params.T.reshape(tile.NUM_HEAD_PARAMS, 1, hkv, g, 1, 1)

  batch_ix = jnp.arange(b)[:, None, None, None]
  head_ix = jnp.arange(hkv)[None, :, None, None]

  def take_tokens(x, tokens):  # x [B, T] per token; tokens [B, Hkv, G', L] -> same shape
    flat = tokens.reshape(b, -1)
    return jnp.take_along_axis(x, jnp.clip(flat, 0, x.shape[1] - 1), axis=1).reshape(tokens.shape)

  def one_query_block(xs):
    q_i, idx_i, valid_i, block = xs  # [B, Hkv, G, bq, D], [B, Hkv, G', n] x2, scalar
    k_i = kb[batch_ix, head_ix, idx_i].reshape(b, hkv, g_lists, n * bk, d)
    v_i = vb[batch_ix, head_ix, idx_i].reshape(b, hkv, g_lists, n * bk, dv)
    tokens = (idx_i[..., None] * bk + jnp.arange(bk)).reshape(b, hkv, g_lists, n * bk)
    key_ok = jnp.repeat(valid_i, bk, axis=-1) & (tokens < tk)
    if m.kv_lengths is not None:
      key_ok = key_ok & (tokens < m.kv_lengths[:, None, None, None])
    flags = key_ok.astype(jnp.int32) * tile.VALID_KEY
    q_rows = block * bq + jnp.arange(bq)
    qp = kp = qs = ks = None
    if needs_pos:
      qp = jnp.take(q_pos, jnp.clip(q_rows, 0, tq - 1), axis=1)[:, None, None, :, None]
      kp = take_tokens(kv_pos, tokens)
      if m.prefix_lengths is not None:
        in_prefix = kp < m.prefix_lengths[:, None, None, None]
        flags = flags | in_prefix.astype(jnp.int32) * tile.IN_PREFIX
      kp = kp[:, :, :, None, :]
    if m.q_segment_ids is not None:
      qs = jnp.take(m.q_segment_ids, jnp.clip(q_rows, 0, tq - 1), axis=1)[:, None, None, :, None]
      ks = take_tokens(m.kv_segment_ids, tokens)[:, :, :, None, :]
    flags = flags[:, :, :, None, :]
    raw = jnp.matmul(q_i, jnp.swapaxes(k_i, -1, -2), preferred_element_type=_F32) * scale
    vis = tile.visible(spec, qp, qs, kp, ks, flags)
    s = tile.logits(spec, raw, qp, kp, params, vis)  # [B, Hkv, G, bq, n * bk]
    probs, lse = reference.softmax_with_sink(s, params[tile.SINK] if sinks is not None else None)
    out = jnp.matmul(probs.astype(v.dtype), v_i, preferred_element_type=_F32)
    return out.astype(q.dtype), lse

  if score_budget is None:
    score_budget = default_score_budget(jax.default_backend())
  per_block = b * hq * bq * n * bk
  chunk = int(max(1, min(nq, score_budget // max(per_block, 1))))
  out, lse = lax.map(jax.checkpoint(one_query_block), (qb, idx, valid, jnp.arange(nq)),
                     batch_size=chunk)
  # [nq, B, Hkv, G, bq, Dv] -> [B, Tq, Hq, Dv]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, hq, dv)[:, :tq]
  if not return_lse:
    return out
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, hq, nq * bq)[:, :, :tq]
  return out, lse
