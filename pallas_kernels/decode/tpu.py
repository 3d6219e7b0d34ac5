"""TPU-style decode kernel (Pallas Mosaic TPU), and its interpret-mode twin for CPU tests.

Equations: `reference.py`; the online softmax: `online_softmax.py`.

Grid (B, Hkv, pages_per_seq), the page axis "arbitrary" (sequential, state
carried in VMEM scratch), the others "parallel". The page table and the
per-kv-head lengths are scalar-prefetched into SMEM (`PrefetchScalarGridSpec`,
flattened to 1-D), so the BlockSpec index maps read them and the pipeline DMAs
exactly one page of one kv head per step:

    K block (page_size, D) = k_pages.reshape(N, page_size, Hkv * D)
                             [page_table[b, p'], :, g * D : (g + 1) * D]
    p' = min(p, last page holding anything below L)

Pages past the length keep the previous block index (p' is clamped), so the
pipeline issues no new DMA for them, and their compute is skipped with
`pl.when`. The query block is the Tq * G rows of kv head g
(`cache_layout.group_queries`, padded to the sublane tile), so GQA costs one
pass over the cache. Step 0 initialises the scratch (m = -inf, l = 0,
acc = 0), the last step writes (acc, m, l); the sinks, the normalisation and
the lse are applied in XLA (`online_softmax.finalize`). m and l are stored
lane-dense, [rows, 128]. A contiguous cache is viewed as pages of a block
dividing S (a free reshape).

On a TPU (`pallas_tpu`) it supports: q and cache of one dtype in {float32,
bfloat16}; head_dim a multiple of 128 (the lane width); page_size (or,
contiguous, some block <= 512 dividing S) a multiple of the sublane tile (8
for float32, 16 for bfloat16). The whole page table and lengths live in SMEM,
so batch * pages_per_seq is bounded by SMEM (tens of thousands of entries).
`pallas_tpu_interpret` runs the same kernel with interpret=True on any
platform and any shape (tests only; slow).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode import cache_layout
from pallas_kernels.decode import online_softmax

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
LANES = 128
MAX_CONTIGUOUS_BLOCK = 512


def sublane_tile(dtype) -> int:
  """Rows of one (sublane, 128) tile: 8 for 32-bit types, 16 for 16-bit ones."""
  return 8 * (4 // jnp.dtype(dtype).itemsize)


def _kernel(page_table_ref, lengths_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref,
            m_scratch, l_scratch, acc_scratch, *, scale, logits_soft_cap, q_len, group,
            page_size, pages_per_seq, num_kv_heads):
  b, g, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = jnp.minimum(lengths_ref[b * num_kv_heads + g], pages_per_seq * page_size)

  @pl.when(p == 0)
  def _init():
    m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  @pl.when(p * page_size < length)
  def _compute():
    q = q_ref[...]
    k = k_ref[...]
    v = v_ref[...]
    rows_n, d = q.shape
    start = p * page_size
    rows = lax.broadcasted_iota(jnp.int32, (rows_n, page_size), 0)
    cols = lax.broadcasted_iota(jnp.int32, (rows_n, page_size), 1)
    s = online_softmax.block_scores(q, k, scale=scale, logits_soft_cap=logits_soft_cap)
    s = jnp.where(online_softmax.visible(start + cols, rows, length, q_len, group), s, -jnp.inf)
    v_rows = lax.broadcasted_iota(jnp.int32, (page_size, d), 0)
    v = jnp.where(start + v_rows < length, v, jnp.zeros((), v.dtype))
    m, l, acc = online_softmax.step(s, v, m_scratch[:, :1], l_scratch[:, :1], acc_scratch[...])
    m_scratch[...] = jnp.broadcast_to(m, m_scratch.shape)
    l_scratch[...] = jnp.broadcast_to(l, l_scratch.shape)
    acc_scratch[...] = acc

  @pl.when(p == pages_per_seq - 1)
  def _store():
    acc_ref[...] = acc_scratch[...]
    m_ref[...] = m_scratch[...]
    l_ref[...] = l_scratch[...]


def decode_attention(q, k_cache, v_cache, *, lengths, page_table=None, scale=None,
                     logits_soft_cap=None, sinks=None, return_lse=False, interpret=False,
                     block_kv=None):
  """The kernel above; arguments as in `api.py`. `block_kv`: the page size a contiguous cache
  is viewed with (default: the largest divisor of S <= 512 that is a multiple of the sublane
  tile, else the largest divisor <= 512)."""
  b, tq, hq, d = q.shape
  hkv = k_cache.shape[2]
  group = hq // hkv
  scale = d ** -0.5 if scale is None else scale
  tile = sublane_tile(k_cache.dtype)
  if page_table is None:
    block_kv = block_kv or (
        cache_layout.pick_block(k_cache.shape[1], cap=MAX_CONTIGUOUS_BLOCK, multiple_of=tile)
        or cache_layout.pick_block(k_cache.shape[1], cap=MAX_CONTIGUOUS_BLOCK))
  k_pages, v_pages, page_table = cache_layout.as_pages(k_cache, v_cache, page_table, block_kv)
  num_pages, page_size = k_pages.shape[:2]
  pages_per_seq = page_table.shape[1]
  # [N, page_size, Hkv, D] -> [N, page_size, Hkv * D] (free): kv head g is block g of the last axis.
  k_pages = k_pages.reshape(num_pages, page_size, hkv * d)
  v_pages = v_pages.reshape(num_pages, page_size, hkv * d)
  rows = -(-tq * group // tile) * tile
  qg = cache_layout.group_queries(q.astype(k_pages.dtype), hkv, rows)
  flat_table = page_table.reshape(-1)
  flat_lengths = cache_layout.lengths_per_kv_head(lengths, hkv).reshape(-1)

  def kv_index(bi, gi, pi, table_ref, lengths_ref):
    length = jnp.minimum(lengths_ref[bi * hkv + gi], pages_per_seq * page_size)
    last = jnp.maximum((length + page_size - 1) // page_size - 1, 0)
    return table_ref[bi * pages_per_seq + jnp.minimum(pi, last)], 0, gi

  def row_index(bi, gi, pi, table_ref, lengths_ref):
    return bi, gi, 0, 0

  kernel = functools.partial(
      _kernel, scale=scale, logits_soft_cap=logits_soft_cap, q_len=tq, group=group,
      page_size=page_size, pages_per_seq=pages_per_seq, num_kv_heads=hkv)
  state = lambda last: jax.ShapeDtypeStruct((b, hkv, rows, last), jnp.float32)
  row_block = lambda last: pl.BlockSpec((None, None, rows, last), row_index)
  acc, m, l = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, hkv, pages_per_seq),
          in_specs=[
              row_block(d),
              pl.BlockSpec((None, page_size, d), kv_index),
              pl.BlockSpec((None, page_size, d), kv_index),
          ],
          out_specs=[row_block(d), row_block(LANES), row_block(LANES)],
          scratch_shapes=[
              pltpu.VMEM((rows, LANES), jnp.float32),
              pltpu.VMEM((rows, LANES), jnp.float32),
              pltpu.VMEM((rows, d), jnp.float32),
          ],
      ),
      out_shape=[state(d), state(LANES), state(LANES)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="decode_attention_tpu",
  )(flat_table, flat_lengths, qg, k_pages, v_pages)

  return online_softmax.finish_grouped(acc[None], m[None, ..., 0], l[None, ..., 0], sinks=sinks,
                                       q_len=tq, num_q_heads=hq, dtype=q.dtype,
                                       return_lse=return_lse)


class TpuBackend:
  """`pallas_tpu` (TPU) or, with interpret=True, `pallas_tpu_interpret` (any platform)."""

  def __init__(self, *, interpret: bool = False, block_kv: Optional[int] = None):
    self.interpret = interpret
    self.block_kv = block_kv
    self.name = "pallas_tpu_interpret" if interpret else "pallas_tpu"

  def is_supported(self, call) -> Tuple[bool, str]:
    reason = cache_layout.call_refusal(call, DTYPES, self.block_kv)
    if reason:
      return False, reason
    if self.interpret:
      return True, ""
    if call.platform != "tpu":
      return False, f"the Mosaic TPU kernel runs on a TPU, not on {call.platform!r}"
    tile = sublane_tile(call.kv_dtype)
    if call.head_dim % LANES:
      return False, f"head_dim {call.head_dim} is not a multiple of {LANES}"
    if call.paged:
      if call.page_size % tile:
        return False, f"page_size {call.page_size} is not a multiple of {tile} for {call.kv_dtype}"
    else:
      block = self.block_kv or cache_layout.pick_block(
          call.capacity, cap=MAX_CONTIGUOUS_BLOCK, multiple_of=tile)
      if not block or block % tile:
        return False, (f"the cache length {call.capacity} has no block <= {MAX_CONTIGUOUS_BLOCK}"
                       f" that divides it and is a multiple of {tile}")
    return True, ""

  def __call__(self, q, k_cache, v_cache, *, call, lengths, page_table, scale, logits_soft_cap,
               sinks, return_lse):
    return decode_attention(q, k_cache, v_cache, lengths=lengths, page_table=page_table,
                            scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
                            return_lse=return_lse, interpret=self.interpret,
                            block_kv=self.block_kv)
