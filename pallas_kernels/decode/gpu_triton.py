"""GPU-style decode kernel (Pallas Triton), and its interpret-mode twin for CPU tests.

Equations: `reference.py`; the online softmax and the split merge:
`online_softmax.py`.

Grid (B, Hkv, num_splits). Program (b, g, i) owns kv head g of sequence b and
the i-th contiguous range of its logical pages. It loads the Tq * G query rows
of kv head g once, as one [rows, D] matrix (`cache_layout.group_queries`, rows
padded to a power of two >= 16), so GQA costs one pass over the cache, then
runs a `lax.fori_loop` over its pages that stops at the last page holding
anything below the length (pages past it are never loaded):

    for p in [i * pages_per_split, min((i + 1) * pages_per_split, cdiv(L, page_size))):
      K, V = k_pages[page_table[b, p], :, g], v_pages[...]       [page_size, D] each
      online-softmax step with the causal rule s <= L - Tq + t

and writes its partial (acc, m, l); the splits are merged in XLA. Splits keep
the GPU busy when B * Hkv is small (flash-decoding). A contiguous cache is seen
as pages of a power-of-two block dividing S (a free reshape).

On a GPU (`pallas_triton`) it supports: q and cache of one dtype in
{float16, bfloat16, float32}; head_dim a power of two >= 16 (no padding of the
cache, which would copy it every step); page_size (or, contiguous, some
power-of-two block dividing S) a power of two >= 16, the Triton dot's minimum;
and a JAX whose Pallas still has the Triton backend (deprecated upstream in
JAX 0.11 in favour of Mosaic GPU; `is_supported` checks that it imports).
`pallas_interpret` runs the same kernel with interpret=True on any platform
and any shape (tests only; slow).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.decode import cache_layout
from pallas_kernels.triton_backend import triton_backend
from pallas_kernels.decode import online_softmax

DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
MIN_DOT = 16  # Triton's tl.dot wants every dimension >= 16
MAX_CONTIGUOUS_BLOCK = 64
TARGET_PROGRAMS = 256  # splits are added until B * Hkv * splits reaches this (about 2 per SM)


@functools.lru_cache(maxsize=None)
def _is_power_of_two(n: int) -> bool:
  return n > 0 and not n & (n - 1)


def _kernel(lengths_ref, page_table_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *,
            scale, logits_soft_cap, q_len, group, page_size, pages_per_seq, pages_per_split):
  b, g, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = jnp.minimum(lengths_ref[b, g], pages_per_seq * page_size)
  first = split * pages_per_split
  end = jnp.minimum(first + pages_per_split, (length + page_size - 1) // page_size)
  q = q_ref[...]
  rows_n, d = q.shape
  rows = lax.broadcasted_iota(jnp.int32, (rows_n, page_size), 0)
  cols = lax.broadcasted_iota(jnp.int32, (rows_n, page_size), 1)
  v_rows = lax.broadcasted_iota(jnp.int32, (page_size, d), 0)

  def body(p, carry):
    m, l, acc = carry
    page = page_table_ref[b, p]
    k = k_ref[page, :, g, :]
    v = v_ref[page, :, g, :]
    start = p * page_size
    s = online_softmax.block_scores(q, k, scale=scale, logits_soft_cap=logits_soft_cap)
    s = jnp.where(online_softmax.visible(start + cols, rows, length, q_len, group), s, -jnp.inf)
    v = jnp.where(start + v_rows < length, v, jnp.zeros((), v.dtype))
    return online_softmax.step(s, v, m, l, acc)

  init = (jnp.full((rows_n, 1), -jnp.inf, jnp.float32), jnp.zeros((rows_n, 1), jnp.float32),
          jnp.zeros((rows_n, d), jnp.float32))
  m, l, acc = lax.fori_loop(first, jnp.maximum(end, first), body, init)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def decode_attention(q, k_cache, v_cache, *, lengths, page_table=None, scale=None,
                     logits_soft_cap=None, sinks=None, return_lse=False, interpret=False,
                     block_kv=None, num_splits=None, num_warps=4, num_stages=2):
  """The kernel above; arguments as in `api.py`. `block_kv`: the page size a contiguous cache
  is viewed with (default: the largest power of two <= 64 dividing S); `num_splits`: kv
  splits (default: enough for about TARGET_PROGRAMS programs)."""
  b, tq, hq, d = q.shape
  hkv = k_cache.shape[2]
  group = hq // hkv
  scale = d ** -0.5 if scale is None else scale
  if page_table is None:
    block_kv = block_kv or cache_layout.pick_block(k_cache.shape[1], cap=MAX_CONTIGUOUS_BLOCK,
                                                   power_of_two=True)
  rows = max(MIN_DOT, 1 << max(0, math.ceil(math.log2(tq * group))))
  k_pages, v_pages, page_table, qg, num_splits, pages_per_split = (
      cache_layout.split_kernel_inputs(q, k_cache, v_cache, page_table, block_kv, rows=rows,
                                       target=TARGET_PROGRAMS, num_splits=num_splits))
  page_size = k_pages.shape[1]
  pages_per_seq = page_table.shape[1]

  kernel = functools.partial(
      _kernel, scale=scale, logits_soft_cap=logits_soft_cap, q_len=tq, group=group,
      page_size=page_size, pages_per_seq=pages_per_seq, pages_per_split=pages_per_split)
  plgpu, _ = triton_backend()
  params = {} if plgpu is None else dict(
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages))
  state = lambda *tail: jax.ShapeDtypeStruct((num_splits, b, hkv, rows, *tail), jnp.float32)
  out_block = lambda *tail: pl.BlockSpec((None, None, None, rows, *tail),
                                         lambda bi, gi, si: (si, bi, gi, 0, 0))
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(b, hkv, num_splits),
      in_specs=[
          pl.BlockSpec((b, hkv), lambda bi, gi, si: (0, 0)),
          pl.BlockSpec((b, pages_per_seq), lambda bi, gi, si: (0, 0)),
          pl.BlockSpec((None, None, rows, d), lambda bi, gi, si: (bi, gi, 0, 0)),
          pl.BlockSpec(k_pages.shape, lambda bi, gi, si: (0, 0, 0, 0)),
          pl.BlockSpec(v_pages.shape, lambda bi, gi, si: (0, 0, 0, 0)),
      ],
      out_specs=[out_block(d), out_block(1), out_block(1)],
      out_shape=[state(d), state(1), state(1)],
      interpret=interpret,
      name="decode_attention_triton",
      **params,
  )(cache_layout.lengths_per_kv_head(lengths, hkv), page_table, qg, k_pages, v_pages)

  return online_softmax.finish_grouped(acc, m[..., 0], l[..., 0], sinks=sinks, q_len=tq,
                                       num_q_heads=hq, dtype=q.dtype, return_lse=return_lse)


class TritonBackend:
  """`pallas_triton` (GPU) or, with interpret=True, `pallas_interpret` (any platform)."""

  def __init__(self, *, interpret: bool = False, block_kv: Optional[int] = None,
               num_splits: Optional[int] = None):
    self.interpret = interpret
    self.block_kv = block_kv
    self.num_splits = num_splits
    self.name = "pallas_interpret" if interpret else "pallas_triton"

  def is_supported(self, call) -> Tuple[bool, str]:
    reason = cache_layout.call_refusal(call, DTYPES, self.block_kv)
    if reason:
      return False, reason
    if self.interpret:
      return True, ""
    if call.platform != "gpu":
      return False, f"the Triton kernel runs on a GPU, not on {call.platform!r}"
    plgpu, why = triton_backend()
    if plgpu is None:
      return False, why
    if not _is_power_of_two(call.head_dim) or call.head_dim < MIN_DOT:
      return False, f"head_dim {call.head_dim} is not a power of two >= {MIN_DOT}"
    if call.paged:
      if not _is_power_of_two(call.page_size) or call.page_size < MIN_DOT:
        return False, f"page_size {call.page_size} is not a power of two >= {MIN_DOT}"
    else:
      block = self.block_kv or cache_layout.pick_block(
          call.capacity, cap=MAX_CONTIGUOUS_BLOCK, power_of_two=True)
      if not block or block < MIN_DOT or not _is_power_of_two(block):
        return False, (f"the cache length {call.capacity} has no power-of-two block >= {MIN_DOT}"
                       " dividing it")
    return True, ""

  def __call__(self, q, k_cache, v_cache, *, call, lengths, page_table, scale, logits_soft_cap,
               sinks, return_lse):
    return decode_attention(q, k_cache, v_cache, lengths=lengths, page_table=page_table,
                            scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
                            return_lse=return_lse, interpret=self.interpret,
                            block_kv=self.block_kv, num_splits=self.num_splits)
