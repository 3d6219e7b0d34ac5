"""`block_sparse_attention`: each query block attends only the key blocks its list names.

For batch b, head h and query block I (rows I*bq .. I*bq + bq - 1), the first
`block_counts[b, h, I]` entries of `block_indices[b, h, I, :]` name the key
blocks (columns J*bk .. J*bk + bk - 1) it reads; everything else is masked.
Inside those tiles the usual modifications apply (causal, window, segments,
prefix, padding, soft cap, sinks, distance bias, per-query scale), exactly as
in `flash_attention`: the result equals dense attention under the expanded
mask (`reference.py`). This is the kernel every sparse family runs on
(sliding windows at long lengths, routing, BiFormer, landmark, HiP ...).

Duplicates, entries past the count and out-of-range indices are ignored.
The call is validated and dispatched as `flash_attention` is, with the lists
as a block mask:
  * the Pallas backends scalar-prefetch the canonical lists and touch only
    the listed blocks, forward and backward;
  * when the backend is XLA and the lists are narrower than the key blocks
    (n < nk), the gather path (`xla.py`) attends over the listed blocks only,
    so its cost is n / nk of dense attention whatever differs between heads;
    with full-width lists the tiled XLA path skips unlisted tiles instead;
  * "reference" renders the mask dense.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse import xla
from pallas_kernels.flash import api as flash_api
from pallas_kernels.flash import schedule


def lists_from_block_mask(block_mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """A boolean block mask [B, H, nq, nk] -> (block_indices [B, H, nq, nk], block_counts [B, H, nq])."""
  if block_mask.ndim != 4:
    raise ValueError(f"block_mask must be [B, H, nq, nk], got shape {tuple(block_mask.shape)}")
  sched = schedule.from_block_mask(block_mask.astype(bool))
  return sched.indices, sched.counts


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_indices: jax.Array,
    block_counts: jax.Array,
    *,
    block_shape: Tuple[int, int],
    scale: Optional[float] = None,
    is_causal: bool = False,
    local_window_size=None,
    segment_ids=None,
    q_positions: Optional[jax.Array] = None,
    kv_positions: Optional[jax.Array] = None,
    prefix_lengths: Optional[jax.Array] = None,
    kv_lengths: Optional[jax.Array] = None,
    logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None,
    distance_bias: Optional[jax.Array] = None,
    query_scale: Optional[jax.Array] = None,
    return_lse: bool = False,
    implementation: str = "auto",
):
  """Block-sparse softmax attention, [batch, seq, heads, head_dim] layout.

  Args:
    q, k, v: as in `flash_attention` (GQA: Hq a multiple of Hkv).
    block_indices: int [B|1, Hq|1, nq, n], key-block indices per query block,
      nq = ceil(Tq / block_q), entries in [0, ceil(Tk / block_k)).
    block_counts: int [B|1, Hq|1, nq], how many leading entries are used.
    block_shape: (block_q, block_k), the tile the lists refer to; the Pallas
      kernels use it as their tile size.
    The rest: as in `flash_attention`.
  """
  if (not isinstance(block_shape, (tuple, list)) or len(block_shape) != 2
      or not all(isinstance(x, int) and x > 0 for x in block_shape)):
    raise ValueError(f"block_shape must be a pair of positive ints, got {block_shape!r}")
  bq, bk = block_shape
  b, tq, hq, _ = q.shape
  nq, nk = -(-tq // bq), -(-k.shape[1] // bk)
  if block_indices.ndim != 4 or block_indices.shape[2] != nq:
    raise ValueError(f"block_indices must be [B|1, Hq|1, nq={nq}, n], got"
                     f" {tuple(block_indices.shape)}")
  if tuple(block_counts.shape) != tuple(block_indices.shape[:3]):
    raise ValueError(f"block_counts must have shape {tuple(block_indices.shape[:3])} (the first"
                     f" three axes of block_indices), got {tuple(block_counts.shape)}")
  for name, x in (("block_indices", block_indices), ("block_counts", block_counts)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array, got {x.dtype}")
  block_mask = schedule.block_mask_from_lists(block_indices, block_counts, nk)
  q, call, mask_args, backend = flash_api.prepare(
      q, k, v, bias=None, mask=None, is_causal=is_causal, local_window_size=local_window_size,
      segment_ids=segment_ids, q_positions=q_positions, kv_positions=kv_positions,
      prefix_lengths=prefix_lengths, kv_lengths=kv_lengths, chunk_size=None,
      logits_soft_cap=logits_soft_cap, sinks=sinks, distance_bias=distance_bias,
      query_scale=query_scale, block_mask=block_mask, block_shape=(bq, bk),
      return_lse=return_lse, implementation=implementation, block_q=bq, block_k=bk)
  if backend.name == flash_api.XLA.name and block_indices.shape[-1] < nk:
    return xla.attention(
        q, k, v, block_indices, block_counts, block_shape=(bq, bk),
        mask_args=dataclasses.replace(mask_args, block_mask=None, block_shape=None), scale=scale,
        logits_soft_cap=logits_soft_cap, sinks=sinks, distance_bias=distance_bias,
        return_lse=return_lse)
  return backend(q, k, v, call=call, mask_args=mask_args, bias=None, scale=scale,
                 logits_soft_cap=logits_soft_cap, sinks=sinks, distance_bias=distance_bias,
                 return_lse=return_lse, block_q=bq, block_k=bk)
