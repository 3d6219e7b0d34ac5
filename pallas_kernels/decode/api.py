"""`decode_attention`: a few query tokens per sequence against a (paged) KV cache, dispatched.

    out_t = softmax_{s <= L - Tq + t}(cap * tanh(scale q_t K^T / cap) [+ sink]) V

(the equations are in `reference.py`). Every call is validated once, described
by a `DecodeCall`, and handed to one backend (`pallas_kernels/dispatch.py`):

  platform   "auto" order                      "pallas"
  gpu        pallas_triton, xla                pallas_triton, pallas_mosaic_gpu
  tpu        pallas_tpu, xla                   pallas_tpu
  cpu        xla                               pallas_interpret, pallas_tpu_interpret

"pallas_mosaic_gpu" (the Hopper kernel, `gpu_mosaic.py`) runs when named: it
is not in "auto" until an H100 has run its tests and benchmark. "reference" and
the interpret-mode twins "pallas_interpret" (the Triton
kernel) and "pallas_tpu_interpret" (the TPU kernel) run by name on every
platform; they are for tests (interpret mode is slow) and never chosen by
"auto". A backend that does not support a call says why
(`is_supported`); "auto" logs it once and moves on, ending at XLA.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.decode import gpu_mosaic
from pallas_kernels.decode import gpu_triton
from pallas_kernels.decode import reference
from pallas_kernels.decode import tpu
from pallas_kernels.decode import xla


@dataclasses.dataclass(frozen=True)
class DecodeCall:
  """The static facts of one call, all a backend needs to decide if it supports it.

  `capacity` is the positions a sequence can hold: S, or pages_per_seq * page_size.
  `page_size`, `pages_per_seq`, `num_pages` are None for a contiguous cache.
  """

  platform: str
  batch: int
  q_len: int
  num_q_heads: int
  num_kv_heads: int
  head_dim: int
  q_dtype: jnp.dtype
  kv_dtype: jnp.dtype
  paged: bool
  capacity: int
  page_size: Optional[int]
  pages_per_seq: Optional[int]
  num_pages: Optional[int]
  per_head_lengths: bool
  logits_soft_cap: Optional[float]
  has_sinks: bool
  return_lse: bool

  @property
  def group_size(self) -> int:
    return self.num_q_heads // self.num_kv_heads


class XlaBackend:
  """Grouped-query XLA (`xla.py`); supports every call on every platform."""

  name = "xla"

  def is_supported(self, call):
    return True, ""

  def __call__(self, q, k_cache, v_cache, *, call, lengths, page_table, scale, logits_soft_cap,
               sinks, return_lse):
    return xla.decode_attention(q, k_cache, v_cache, lengths=lengths, page_table=page_table,
                                scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
                                return_lse=return_lse)


class ReferenceBackend:
  """The dense specification (`reference.py`); for tests, never chosen by "auto"."""

  name = "reference"

  def is_supported(self, call):
    return True, ""

  def __call__(self, q, k_cache, v_cache, *, call, lengths, page_table, scale, logits_soft_cap,
               sinks, return_lse):
    return reference.decode_attention(q, k_cache, v_cache, lengths=lengths,
                                      page_table=page_table, scale=scale,
                                      logits_soft_cap=logits_soft_cap, sinks=sinks,
                                      return_lse=return_lse)


XLA_BACKEND = XlaBackend()
REFERENCE_BACKEND = ReferenceBackend()
TRITON_BACKEND = gpu_triton.TritonBackend()
TRITON_INTERPRET_BACKEND = gpu_triton.TritonBackend(interpret=True)
TPU_BACKEND = tpu.TpuBackend()
TPU_INTERPRET_BACKEND = tpu.TpuBackend(interpret=True)
MOSAIC_GPU_BACKEND = gpu_mosaic.MosaicGpuBackend()

# The interpret twins run by name on every platform (tests, debugging a kernel on a GPU host);
# implementation="pallas" reaches them only on CPU (the Triton twin first); "auto" never does.
DISPATCH = dispatch.Dispatcher(
    "decode_attention", XLA_BACKEND,
    extra=[REFERENCE_BACKEND, TRITON_INTERPRET_BACKEND, TPU_INTERPRET_BACKEND])
DISPATCH.register(TRITON_BACKEND, ["gpu"])
DISPATCH.register(TPU_BACKEND, ["tpu"])
DISPATCH.register(MOSAIC_GPU_BACKEND, ["gpu"], auto=False)
DISPATCH.register(TRITON_INTERPRET_BACKEND, ["cpu"], auto=False)
DISPATCH.register(TPU_INTERPRET_BACKEND, ["cpu"], auto=False)
BACKENDS = DISPATCH.backends


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
    implementation: str = "auto",
):
  """Decode attention over a KV cache, [batch, seq, heads, head_dim] layout.

  Args:
    q: [B, Tq, Hq, D], Tq small (1 for a decode step, more to verify speculated
      tokens). Query t sits at position L - Tq + t; the new tokens are already
      in the cache.
    k_cache, v_cache: contiguous [B, S, Hkv, D], or with `page_table` the
      pages [num_pages, page_size, Hkv, D]. Hq % Hkv == 0 (MHA, GQA, MQA);
      query head h reads kv head h // (Hq // Hkv).
    lengths: int [B] (per sequence) or [B, Hkv] (per kv head) cache lengths L,
      each in [0, capacity]. Positions >= L are never read.
    page_table: int [B, pages_per_seq]; logical page p of sequence b is
      physical page page_table[b, p]. None: the cache is contiguous.
    scale: logit scale, default D ** -0.5.
    logits_soft_cap: cap * tanh(logits / cap).
    sinks: [Hq] learned logits that join the softmax denominator with no value.
    return_lse: also return the log-sum-exp [B, Hq, Tq] (float32; -inf for a
      row with nothing visible and no sink).
    implementation: "auto", "xla", "reference", "pallas" or a backend name
      ("pallas_triton", "pallas_mosaic_gpu", "pallas_tpu", "pallas_interpret",
      "pallas_tpu_interpret").

  Returns:
    out [B, Tq, Hq, D] in q.dtype, or (out, lse) with return_lse. A row with
    nothing visible (L = 0) is zeros.
  """
  DISPATCH.check_name(implementation)
  lengths = jnp.asarray(lengths)
  page_table = None if page_table is None else jnp.asarray(page_table)
  reference.check_args(q, k_cache, v_cache, lengths, page_table, sinks, logits_soft_cap)
  call = describe_call(q, k_cache, lengths=lengths, page_table=page_table,
                       logits_soft_cap=logits_soft_cap, sinks=sinks, return_lse=return_lse)
  backend = select_backend(call, implementation)
  return backend(q, k_cache, v_cache, call=call, lengths=lengths, page_table=page_table,
                 scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
                 return_lse=return_lse)


def describe_call(q, k_cache, *, lengths, page_table=None, logits_soft_cap=None, sinks=None,
                  return_lse=False, platform: Optional[str] = None) -> DecodeCall:
  """The `DecodeCall` of validated arguments."""
  paged = page_table is not None
  page_size = k_cache.shape[1] if paged else None
  pages_per_seq = page_table.shape[1] if paged else None
  return DecodeCall(
      platform=platform or jax.default_backend(),
      batch=q.shape[0], q_len=q.shape[1], num_q_heads=q.shape[2], num_kv_heads=k_cache.shape[2],
      head_dim=q.shape[3], q_dtype=jnp.dtype(q.dtype), kv_dtype=jnp.dtype(k_cache.dtype),
      paged=paged, capacity=page_size * pages_per_seq if paged else k_cache.shape[1],
      page_size=page_size, pages_per_seq=pages_per_seq,
      num_pages=k_cache.shape[0] if paged else None,
      per_head_lengths=lengths.ndim == 2, logits_soft_cap=logits_soft_cap,
      has_sinks=sinks is not None, return_lse=return_lse)


def select_backend(call: DecodeCall, implementation: str = "auto"):
  """The backend that runs `call` (see `pallas_kernels/dispatch.py` for the rules)."""
  return DISPATCH.select(call, implementation, platform=call.platform)


def available_implementations() -> Tuple[str, ...]:
  return DISPATCH.names()
