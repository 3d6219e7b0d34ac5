"""Which key blocks each query block visits: block masks and block lists.

The Pallas kernels (tpu.py, gpu_triton.py) never loop over all key blocks.
For every (batch, head, query block) they read a list of key-block indices
and a count, and for the backward dK/dV pass the transposed lists (for every
key block, the query blocks that read it). The lists come from a boolean
block mask `[B, H, nq, nk]` (H = 1 when every head shares it):

  * dense flash derives the block mask from the token mask (`masking.py`)
    with per-block ranges of positions and segment ids (`block_mask_from_mask`,
    conservative: it may keep a block with no visible pair, never drops one
    with a visible pair; the kernels mask inside each tile anyway);
  * block-sparse attention takes it from the user (`block_sparse/api.py`).

Canonical lists are sorted, distinct and padded with the last valid index, so
a TPU grid step past the count maps to the block already in VMEM and issues
no new copy.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.flash import masking

_BIG = jnp.iinfo(jnp.int32).max // 2


@dataclasses.dataclass(frozen=True)
class BlockSchedule:
  """Forward lists (per query block) and their transpose (per key block)."""

  indices: jax.Array  # [B, H, nq, nk] int32: visible key blocks first, ascending
  counts: jax.Array  # [B, H, nq] int32
  t_indices: jax.Array  # [B, H, nk, nq] int32: query blocks reading each key block
  t_counts: jax.Array  # [B, H, nk] int32

  @property
  def num_heads(self) -> int:
    return self.indices.shape[1]


jax.tree_util.register_dataclass(
    BlockSchedule, data_fields=["indices", "counts", "t_indices", "t_counts"], meta_fields=[])


def _lists(block_mask: jax.Array):
  """[..., n_rows, n_cols] bool -> (indices [..., n_rows, n_cols], counts [..., n_rows])."""
  n_cols = block_mask.shape[-1]
  cols = jnp.arange(n_cols, dtype=jnp.int32)
  # Visible columns keep their index, the rest sort after them.
  keyed = jnp.where(block_mask, cols, n_cols + cols)
  order = jnp.sort(keyed, axis=-1)
  counts = jnp.sum(block_mask, axis=-1, dtype=jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  last = jnp.where(counts[..., None] > 0, last, 0)
  indices = jnp.where(cols < counts[..., None], order, last)
  return indices.astype(jnp.int32), counts


def from_block_mask(block_mask: jax.Array) -> BlockSchedule:
  """The schedule of a boolean block mask [B, H, nq, nk]."""
  indices, counts = _lists(block_mask)
  t_indices, t_counts = _lists(jnp.swapaxes(block_mask, -1, -2))
  return BlockSchedule(indices, counts, t_indices, t_counts)


def block_mask_from_lists(indices: jax.Array, counts: jax.Array, num_kv_blocks: int) -> jax.Array:
  """User lists -> block mask [B, H, nq, nk]; entries past the count or out of range are ignored."""
  n = indices.shape[-1]
  take = jnp.arange(n)[None, None, None, :] < counts[..., None]
  valid = take & (indices >= 0) & (indices < num_kv_blocks)
  one_hot = (indices[..., None] == jnp.arange(num_kv_blocks)) & valid[..., None]
  return jnp.any(one_hot, axis=-2)


def _block_range(x: jax.Array, valid: jax.Array, block: int):
  """Per-block (min, max) of x [B, T_padded] over valid entries; empty blocks give (BIG, -BIG)."""
  b = x.shape[0]
  xb = x.reshape(b, -1, block)
  vb = valid.reshape(b, -1, block)
  lo = jnp.min(jnp.where(vb, xb, _BIG), axis=-1)
  hi = jnp.max(jnp.where(vb, xb, -_BIG), axis=-1)
  return lo, hi


def block_mask_from_mask(m: masking.MaskArgs, tq: int, tk: int, block_q: int, block_k: int,
                         batch: int) -> jax.Array:
  """Conservative block mask [B, 1, nq, nk] of a structured mask (no dense part).

  A block is kept when each rule *could* hold for some pair in it, judged from
  the blocks' ranges of positions and segment ids. Padded keys and queries
  (past `tk`, `tq`) never make a block visible. A user block mask in `m` is
  not read here; the caller AND-s it in.
  """
  if m.dense is not None:
    raise ValueError("a dense mask has no block schedule; use implementation='xla'")
  nq, nk = -(-tq // block_q), -(-tk // block_k)
  q_valid = jnp.broadcast_to(jnp.arange(nq * block_q) < tq, (batch, nq * block_q))
  k_valid = jnp.broadcast_to(jnp.arange(nk * block_k) < tk, (batch, nk * block_k))
  if m.kv_lengths is not None:
    k_valid = k_valid & (jnp.arange(nk * block_k)[None, :] < m.kv_lengths[:, None])

  def pad(x, size):
    return jnp.pad(x, ((0, 0), (0, size - x.shape[1])))

  keep = jnp.any(k_valid.reshape(batch, nk, block_k), axis=-1)[:, None, :]  # [B, 1, nk]
  keep = keep & jnp.any(q_valid.reshape(batch, nq, block_q), axis=-1)[:, :, None]
  if m.q_positions is not None:
    q_lo, q_hi = _block_range(pad(m.q_positions, nq * block_q), q_valid, block_q)
    k_lo, k_hi = _block_range(pad(m.kv_positions, nk * block_k), k_valid, block_k)
    q_lo, q_hi = q_lo[:, :, None], q_hi[:, :, None]
    k_lo, k_hi = k_lo[:, None, :], k_hi[:, None, :]
    rule: Optional[jax.Array] = None

    def conj(a, b):
      return b if a is None else a & b

    if m.is_causal:
      rule = k_lo <= q_hi
    if m.window is not None:
      left, right = m.window
      if left is not None:
        rule = conj(rule, k_hi >= q_lo - left)
      if right is not None:
        rule = conj(rule, k_lo <= q_hi + right)
    if m.chunk_size is not None:
      c = m.chunk_size
      rule = conj(rule, (k_lo // c <= q_hi // c) & (k_hi // c >= q_lo // c))
    if m.prefix_lengths is not None and rule is not None:
      rule = rule | (k_lo < m.prefix_lengths[:, None, None])
    if rule is not None:
      keep = keep & rule
  if m.q_segment_ids is not None:
    qs_lo, qs_hi = _block_range(pad(m.q_segment_ids, nq * block_q), q_valid, block_q)
    ks_lo, ks_hi = _block_range(pad(m.kv_segment_ids, nk * block_k), k_valid, block_k)
    keep = keep & (ks_lo[:, None, :] <= qs_hi[:, :, None]) & (ks_hi[:, None, :] >= qs_lo[:, :, None])
  return keep[:, None]
