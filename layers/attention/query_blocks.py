"""The query-chunked XLA path shared by families whose scores break online-softmax tiling.

entmax (a per-row threshold), cope (a reverse cumulative sum over keys),
neural (MLP scores) and multi_token (a convolution over the logits) cannot
fold key tiles into a running softmax, so they have no flash kernel. Their
fast path instead walks the queries `block_q` rows at a time: each block
builds its full [block_q, Tk] rows, normalises them and multiplies by V. The
block body is under `jax.checkpoint`, so the backward recomputes one block at
a time and memory is O(block_q * Tk + T * D) per head, linear in T; masks
come per block from `masking.visible` (no [T, T] mask).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.flash import masking


def refuse_kernels(family: str, implementation: str, why: str) -> None:
  """The error for asking such a family for a kernel it does not have."""
  if implementation.startswith("pallas") or implementation == "cudnn":
    raise ValueError(
        f"{family} has no implementation={implementation!r} kernel ({why}); use"
        " implementation='auto', 'xla' (query-chunked XLA path, memory linear in T) or"
        " 'reference'")


def group_heads(vis: Optional[jax.Array], num_kv_heads: int, group: int) -> Optional[jax.Array]:
  """Visibility [B|1, Hq|1, bq, Tk] -> [B|1, Hkv|1, G|1, bq, Tk] (query head h = g_kv * G + r)."""
  if vis is None:
    return None
  if vis.shape[1] == 1:
    return vis[:, :, None]
  return vis.reshape(vis.shape[0], num_kv_heads, group, *vis.shape[2:])


def map_query_blocks(block_fn: Callable, x: jax.Array, block_q: int,
                     mask_args: masking.MaskArgs, tk: int) -> jax.Array:
  """Runs `block_fn` over query blocks of `x` [B, Tq, ...] and stitches the results.

  block_fn(x_block [B, bq, ...], vis [B|1, H|1, bq, Tk] or None) -> [B, bq, ...]:
  `vis` is the mask of the block's rows (padded rows past Tq see the clamped
  last row's mask and are dropped). Returns [B, Tq, ...].
  """
  b, tq = x.shape[:2]
  bq = max(1, min(block_q, tq))
  nb = -(-tq // bq)
  pad = [(0, 0), (0, nb * bq - tq)] + [(0, 0)] * (x.ndim - 2)
  blocks = jnp.moveaxis(jnp.pad(x, pad).reshape(b, nb, bq, *x.shape[2:]), 1, 0)
  kv_idx = jnp.arange(tk)

  @jax.checkpoint
  def block(args):
    xb, start = args
    return block_fn(xb, masking.visible(mask_args, start + jnp.arange(bq), kv_idx, tk))

  out = jax.lax.map(block, (blocks, jnp.arange(nb) * bq))  # [nb, B, bq, ...]
  out = jnp.moveaxis(out, 0, 1)
  return out.reshape(b, nb * bq, *out.shape[3:])[:, :tq]
