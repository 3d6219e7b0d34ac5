"""Decode attention on Mosaic GPU (Hopper): TMA page streaming, wgmma, a producer warpgroup.

Equations: `reference.py`; the online softmax and the split merge:
`online_softmax.py`.

Grid (Hkv, num_splits, B), as the Triton kernel's (`gpu_triton.py`): CTA
(g, i, b) owns kv head g of sequence b and the i-th contiguous range of its
logical pages, and serves all Tq * G query rows of that kv head at once
(`cache_layout.group_queries`, padded to the 64 rows of one wgmma tile), so
GQA costs one pass over the cache. Decode is bound by reading the cache, so
the CTA is built to keep TMA busy: a producer warpgroup walks the page table
and copies each page's K and V block [page_size, D] into a ring of `stages`
shared-memory slots; the compute warpgroup runs the online softmax over them
and releases each slot. Pages at or past the last one holding anything below
the length are never copied. Cache rows past the length inside the last page
are zeroed in shared memory before P V, so stale entries (NaN, inf) cannot
leak through 0 * NaN. Partial states (acc, m, l) per split are merged in XLA.

On a Hopper GPU (`pallas_mosaic_gpu`) it supports: q and cache of one dtype in
{float16, bfloat16} (wgmma's inputs); head_dim a multiple of 64 (one
128-byte swizzle row; the cache is never padded, which would copy it every
step); page_size (or, contiguous, a block dividing S) a multiple of 64 (the
wgmma row tile the stale-row zeroing loads) with page_size * head_dim <=
128 * 128 (two stages of K and V pages in shared memory); Tq * G <= 64 query
rows per kv head.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import mosaic_gpu
from pallas_kernels.decode import cache_layout
from pallas_kernels.decode import online_softmax

DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
ROWS = 64  # one wgmma tile of query rows
PAGE_MULTIPLE = 64
MAX_PAGE_ELEMENTS = 128 * 128  # page_size * head_dim: two stages of K and V pages fit SMEM
MAX_CONTIGUOUS_BLOCK = 128
TARGET_PROGRAMS = 264  # two CTAs per SM of an H100 (132 SMs)


def _kernel(lengths_ref, table_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, q_smem, k_ring,
            v_ring, acc_smem, ml_smem, q_bar, k_bars, v_bars, *, scale, logits_soft_cap, q_len,
            group, page_size, pages_per_seq, pages_per_split, stages):
  plgpu = mosaic_gpu.plgpu_module()
  g, split, b = (lax.axis_index(a) for a in ("heads", "split", "batch"))
  wg = lax.axis_index("wg")
  length = jnp.minimum(lengths_ref[b, g], pages_per_seq * page_size)
  first = split * pages_per_split
  end = jnp.minimum(first + pages_per_split, (length + page_size - 1) // page_size)
  count_of = lambda _: jnp.maximum(end - first, 0)  # noqa: E731
  page_of = lambda j: table_ref[b, first + j]  # noqa: E731
  layout = plgpu.Layout.WGMMA

  @pl.when(wg == 0)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    plgpu.copy_gmem_to_smem(q_ref.at[b, g], q_smem, q_bar.at[0])
    rows = plgpu.broadcasted_iota(jnp.int32, (ROWS, page_size), 0, layout=layout)
    cols = plgpu.broadcasted_iota(jnp.int32, (ROWS, page_size), 1, layout=layout)
    m0 = mosaic_gpu.rows_full(-jnp.inf, ROWS, layout.reduce(1))
    l0 = mosaic_gpu.rows_full(0.0, ROWS, layout.reduce(1))
    acc0 = mosaic_gpu.zeros((ROWS, q_ref.shape[-1]), layout)
    plgpu.barrier_wait(q_bar.at[0])

    def step(t, _, j, carry):
      m, l, acc = carry
      slot = lax.rem(t, stages)
      start = (first + j) * page_size
      plgpu.barrier_wait(k_bars[0].at[slot])
      s = mosaic_gpu.matmul(q_smem, mosaic_gpu.transposed(k_ring.at[slot]), (ROWS, page_size))
      plgpu.barrier_arrive(k_bars[1].at[slot])
      s = s * scale
      if logits_soft_cap is not None:
        s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
      pos = start + cols
      vis = online_softmax.visible(pos, rows, length, q_len, group) & (pos < length)
      m_new, l, acc, p = mosaic_gpu.softmax_step(m, l, acc, jnp.where(vis, s, -jnp.inf))
      plgpu.barrier_wait(v_bars[0].at[slot])

      @pl.when(start + page_size > length)
      def _zero_stale_rows():
        v = v_ring.at[slot][...]
        v_rows = plgpu.broadcasted_iota(jnp.int32, v.shape, 0, layout=layout)
        v_ring.at[slot][...] = jnp.where(start + v_rows < length, v, jnp.zeros((), v.dtype))
        plgpu.commit_smem()

      acc = mosaic_gpu.matmul(p.astype(v_ring.dtype), v_ring.at[slot], acc.shape, acc)
      plgpu.barrier_arrive(v_bars[1].at[slot])
      return m_new, l, acc

    m, l, acc = mosaic_gpu.walk(1, count_of, step, (m0, l0, acc0))
    acc_smem[...] = acc
    ml_smem.at[0][...] = m
    ml_smem.at[1][...] = l
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(acc_smem, acc_ref.at[split, b, g])
    plgpu.copy_smem_to_gmem(ml_smem.at[0], m_ref.at[split, b, g])
    plgpu.copy_smem_to_gmem(ml_smem.at[1], l_ref.at[split, b, g])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 1)
  def _produce():
    mosaic_gpu.producer(1, count_of, stages, [(k_ring, *k_bars), (v_ring, *v_bars)],
                        lambda _, j: [k_ref.at[page_of(j), :, g], v_ref.at[page_of(j), :, g]])


def decode_attention(q, k_cache, v_cache, *, lengths, page_table=None, scale=None,
                     logits_soft_cap=None, sinks=None, return_lse=False, block_kv=None,
                     num_splits=None, stages=2):
  """The kernel above; arguments as in `api.py`. `block_kv`: the page size a contiguous cache
  is viewed with (default: the largest multiple of 64 <= 128 dividing S); `num_splits`: kv
  splits (default: enough for about TARGET_PROGRAMS CTAs)."""
  plgpu = mosaic_gpu.plgpu_module()
  b, tq, hq, d = q.shape
  hkv = k_cache.shape[2]
  group = hq // hkv
  scale = d ** -0.5 if scale is None else scale
  if page_table is None:
    block_kv = block_kv or cache_layout.pick_block(k_cache.shape[1], cap=MAX_CONTIGUOUS_BLOCK,
                                                   multiple_of=PAGE_MULTIPLE)
  k_pages, v_pages, page_table, qg, num_splits, pages_per_split = (
      cache_layout.split_kernel_inputs(q, k_cache, v_cache, page_table, block_kv, rows=ROWS,
                                       target=TARGET_PROGRAMS, num_splits=num_splits))
  page_size = k_pages.shape[1]
  pages_per_seq = page_table.shape[1]
  dtype = k_pages.dtype
  tr = mosaic_gpu.smem_transforms(dtype)

  def body(*refs):
    ins, outs, scratch = refs[:5], refs[5:8], refs[8:]
    _kernel(*ins, *outs, *scratch, scale=scale, logits_soft_cap=logits_soft_cap, q_len=tq,
            group=group, page_size=page_size, pages_per_seq=pages_per_seq,
            pages_per_split=pages_per_split, stages=stages)

  state = lambda *tail: jax.ShapeDtypeStruct((num_splits, b, hkv, ROWS, *tail), jnp.float32)
  scratch = [plgpu.SMEM((ROWS, d), dtype, transforms=tr),
             plgpu.SMEM((stages, page_size, d), dtype, transforms=tr),
             plgpu.SMEM((stages, page_size, d), dtype, transforms=tr),
             plgpu.SMEM((ROWS, d), jnp.float32),
             plgpu.SMEM((2, ROWS), jnp.float32),
             plgpu.Barrier(num_barriers=1),
             mosaic_gpu.barriers(stages, 1), mosaic_gpu.barriers(stages, 1)]
  acc, m, l = mosaic_gpu.launch(body, scratch, [state(d), state(), state()], (hkv, num_splits, b),
                                ("heads", "split", "batch"), 1)(
      cache_layout.lengths_per_kv_head(lengths, hkv), page_table, qg, k_pages, v_pages)
  return online_softmax.finish_grouped(acc, m, l, sinks=sinks, q_len=tq, num_q_heads=hq,
                                       dtype=q.dtype, return_lse=return_lse)


class MosaicGpuBackend:
  """`pallas_mosaic_gpu`: the kernel above, on a Hopper GPU."""

  name = "pallas_mosaic_gpu"

  def __init__(self, *, block_kv: Optional[int] = None, num_splits: Optional[int] = None):
    self.block_kv = block_kv
    self.num_splits = num_splits

  def is_supported(self, call) -> Tuple[bool, str]:
    reason = cache_layout.call_refusal(call, DTYPES, self.block_kv)
    if reason:
      return False, reason
    if call.head_dim % 64:
      return False, f"head_dim {call.head_dim} is not a multiple of 64"
    if call.q_len * call.group_size > ROWS:
      return False, (f"{call.q_len} query tokens x {call.group_size} query heads per kv head"
                     f" exceed the {ROWS} rows of one tile")
    block = call.page_size if call.paged else (self.block_kv or cache_layout.pick_block(
        call.capacity, cap=MAX_CONTIGUOUS_BLOCK, multiple_of=PAGE_MULTIPLE))
    if not block or block % PAGE_MULTIPLE:
      what = f"page_size {call.page_size}" if call.paged else (
          f"the cache length {call.capacity} (no block dividing it)")
      return False, f"{what}: pages must be a multiple of {PAGE_MULTIPLE}"
    if block * call.head_dim > MAX_PAGE_ELEMENTS:
      return False, (f"pages of {block} x head_dim {call.head_dim} exceed shared memory"
                     f" (page_size * head_dim <= {MAX_PAGE_ELEMENTS})")
    if call.platform != "gpu":
      return False, f"the Mosaic GPU kernel runs on a GPU, not on {call.platform!r}"
    return mosaic_gpu.hopper()

  def __call__(self, q, k_cache, v_cache, *, call, lengths, page_table, scale, logits_soft_cap,
               sinks, return_lse):
    del call
    return decode_attention(q, k_cache, v_cache, lengths=lengths, page_table=page_table,
                            scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
                            return_lse=return_lse, block_kv=self.block_kv,
                            num_splits=self.num_splits)
