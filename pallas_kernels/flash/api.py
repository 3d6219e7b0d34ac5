"""`flash_attention`: softmax attention with one validation and explicit dispatch.

    out = softmax(cap * tanh(scale Q K^T / cap) + bias, masked, [+ sink]) V

(the equations are in `reference.py`; which pairs are visible in `masking.py`).
Every call is validated once, described by an `AttentionCall`, and handed to
one backend:

  * implementation="auto" walks `BACKENDS[platform]` in order and runs the
    first backend whose `is_supported(call)` says yes: "pallas_tpu" on TPU,
    "pallas_triton" on GPU, then "xla" everywhere. A skipped backend is
    logged once per reason (never a silent fallback). Every list ends at the
    XLA path, which supports every call.
  * implementation="pallas" runs the platform's Pallas kernel (on CPU the
    interpret-mode twin "pallas_interpret"); "pallas_tpu_interpret" runs the
    TPU kernel's logic on CPU; "cudnn" jax.nn's cuDNN call on GPU;
    "pallas_mosaic_gpu" the Mosaic GPU (Hopper) kernels.
  * implementation="<name>" runs that backend or raises: a registered backend
    that does not support the call raises ValueError with its reason; any
    other name raises ValueError.
The rules live in `pallas_kernels/dispatch.py`; the backends in xla.py,
pallas.py (tpu.py, gpu_triton.py, gpu_mosaic.py) and cudnn.py.

A new backend is an object with `name`, `is_supported(call) -> (bool, reason)`
and `__call__(q, k, v, call=, mask_args=, bias=, scale=, logits_soft_cap=,
sinks=, distance_bias=, return_lse=, block_q=, block_k=)`, added with
`register_backend`.
"""

from __future__ import annotations

import dataclasses
from typing import FrozenSet, Optional, Protocol, Tuple

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.flash import masking
from pallas_kernels.flash import reference
from pallas_kernels.flash import xla

MASK_KINDS = ("causal", "window", "chunk", "prefix", "segments", "padding", "positions", "dense",
              "blocks")


@dataclasses.dataclass(frozen=True)
class AttentionCall:
  """The static facts of one call, all a backend needs to decide if it supports it.

  `mask_kinds` is a subset of MASK_KINDS: "positions" means the caller passed
  its own q/kv positions (rather than the default bottom-right 0..Tk-1),
  "padding" means kv_lengths, "dense" an explicit boolean mask, "blocks" a
  block mask over `block_shape` tiles (block-sparse attention).
  """

  platform: str
  batch: int
  q_len: int
  kv_len: int
  num_q_heads: int
  num_kv_heads: int
  head_dim: int
  v_head_dim: int
  q_dtype: jnp.dtype
  kv_dtype: jnp.dtype
  mask_kinds: FrozenSet[str]
  window: Optional[Tuple[Optional[int], Optional[int]]]
  chunk_size: Optional[int]
  bias_shape: Optional[Tuple[int, ...]]  # left-padded to 4-D
  logits_soft_cap: Optional[float]
  has_sinks: bool
  return_lse: bool
  block_q: Optional[int]
  block_k: Optional[int]
  has_distance_bias: bool = False
  block_shape: Optional[Tuple[int, int]] = None

  @property
  def group_size(self) -> int:
    return self.num_q_heads // self.num_kv_heads


class Backend(Protocol):
  name: str

  def is_supported(self, call: AttentionCall) -> Tuple[bool, str]:
    ...

  def __call__(self, q, k, v, *, call: AttentionCall, mask_args: masking.MaskArgs, bias, scale,
               logits_soft_cap, sinks, distance_bias, return_lse: bool, block_q, block_k):
    ...


class XlaBackend:
  """The memory-efficient path in plain XLA (`xla.py`); supports every call on every platform."""

  name = "xla"

  def is_supported(self, call):
    return True, ""

  def __call__(self, q, k, v, *, call, mask_args, bias, scale, logits_soft_cap, sinks,
               distance_bias, return_lse, block_q, block_k):
    return xla.attention(q, k, v, mask_args=mask_args, bias=bias, scale=scale,
                         logits_soft_cap=logits_soft_cap, sinks=sinks,
                         distance_bias=distance_bias, return_lse=return_lse,
                         block_q=block_q, block_k=block_k)


class ReferenceBackend:
  """The dense specification (`reference.py`): quadratic memory; for tests, never chosen by "auto"."""

  name = "reference"

  def is_supported(self, call):
    return True, ""

  def __call__(self, q, k, v, *, call, mask_args, bias, scale, logits_soft_cap, sinks,
               distance_bias, return_lse, block_q, block_k):
    return reference.attention(q, k, v, mask_args=mask_args, bias=bias, scale=scale,
                               logits_soft_cap=logits_soft_cap, sinks=sinks,
                               distance_bias=distance_bias, return_lse=return_lse)


XLA = XlaBackend()
REFERENCE = ReferenceBackend()

# "auto" order per platform (jax.default_backend()), ending at XLA. The Pallas
# and cuDNN backends put themselves in front when their modules are imported
# (`pallas_kernels/flash/__init__.py`).
DISPATCH = dispatch.Dispatcher("flash_attention", XLA, extra=[REFERENCE])
BACKENDS = DISPATCH.backends


def register_backend(backend: Backend, platforms, *, before: str = "xla") -> None:
  """Puts `backend` into the "auto" list of each platform, just ahead of `before`."""
  DISPATCH.register(backend, platforms, before=before)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    bias: Optional[jax.Array] = None,
    mask: Optional[jax.Array] = None,
    scale: Optional[float] = None,
    is_causal: bool = False,
    local_window_size: masking.Window = None,
    segment_ids=None,
    q_positions: Optional[jax.Array] = None,
    kv_positions: Optional[jax.Array] = None,
    prefix_lengths: Optional[jax.Array] = None,
    kv_lengths: Optional[jax.Array] = None,
    chunk_size: Optional[int] = None,
    logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None,
    distance_bias: Optional[jax.Array] = None,
    query_scale: Optional[jax.Array] = None,
    block_mask: Optional[jax.Array] = None,
    block_shape: Optional[Tuple[int, int]] = None,
    return_lse: bool = False,
    implementation: str = "auto",
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
):
  """Softmax attention, [batch, seq, heads, head_dim] layout (as jax.nn.dot_product_attention).

  Args:
    q: [B, Tq, Hq, D]. k: [B, Tk, Hkv, D]. v: [B, Tk, Hkv, Dv]. Hq % Hkv == 0
      (MHA, GQA, MQA); query head h reads kv head h // (Hq // Hkv).
    bias: additive logits broadcasting to [B, Hq, Tq, Tk]; differentiable.
    mask: boolean [B|1, Hq|1, Tq, Tk], True = may attend (dense; prefer the
      structured options below, which never build a [Tq, Tk] array).
    scale: logit scale, default D ** -0.5.
    is_causal, local_window_size, segment_ids, q_positions, kv_positions,
      prefix_lengths, kv_lengths, chunk_size: the structured mask, see
      `masking.py`. Queries default to the last Tq key positions.
    logits_soft_cap: cap * tanh(logits / cap), before bias and mask.
    sinks: [Hq] learned logits that join the softmax denominator with no value.
    distance_bias: [Hq, 3] rows (slope, power, center): adds
      -slope_h |q_pos - k_pos - center_h|^power_h to the logits (ALiBi, BAM),
      computed inside the tiles by the Pallas kernels; differentiable.
    query_scale: [B, Tq, Hq] per-query logit multipliers (learned or
      length-dependent temperatures). Logits are linear in q, so it is folded
      into q before dispatch: every backend supports it, gradients included.
    block_mask, block_shape: block-sparse attention, a boolean
      [B|1, Hq|1, ceil(Tq/bq), ceil(Tk/bk)] over (bq, bk) = block_shape tiles,
      AND-ed with the other mask settings (see `block_sparse_attention`).
    return_lse: also return the log-sum-exp [B, Hq, Tq] (float32; -inf for a
      row with nothing visible and no sink).
    implementation: "auto", "xla", "reference", or a registered backend name.
    block_q, block_k: tile sizes for tiled backends (None: the backend's choice).

  Returns:
    out [B, Tq, Hq, Dv] in q.dtype, or (out, lse) with return_lse.
  """
  q, call, mask_args, backend = prepare(
      q, k, v, bias=bias, mask=mask, is_causal=is_causal, local_window_size=local_window_size,
      segment_ids=segment_ids, q_positions=q_positions, kv_positions=kv_positions,
      prefix_lengths=prefix_lengths, kv_lengths=kv_lengths, chunk_size=chunk_size,
      logits_soft_cap=logits_soft_cap, sinks=sinks, distance_bias=distance_bias,
      query_scale=query_scale, block_mask=block_mask, block_shape=block_shape,
      return_lse=return_lse, implementation=implementation, block_q=block_q, block_k=block_k)
  return backend(q, k, v, call=call, mask_args=mask_args, bias=bias, scale=scale,
                 logits_soft_cap=logits_soft_cap, sinks=sinks, distance_bias=distance_bias,
                 return_lse=return_lse, block_q=block_q, block_k=block_k)


def prepare(q, k, v, *, bias, mask, is_causal, local_window_size, segment_ids, q_positions,
            kv_positions, prefix_lengths, kv_lengths, chunk_size, logits_soft_cap, sinks,
            distance_bias, query_scale, block_mask, block_shape, return_lse, implementation,
            block_q, block_k):
  """Validates `flash_attention`'s arguments and picks the backend.

  Returns (q with query_scale folded in, AttentionCall, MaskArgs, backend).
  `block_sparse_attention` shares it, so both validate and dispatch alike.
  """
  _check_implementation_name(implementation)
  reference.check_qkv(q, k, v)
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating dtype, got {x.dtype}")
  b, tq, hq, _ = q.shape
  tk = k.shape[1]
  mask_args = masking.make_mask_args(
      b, tq, tk, is_causal=is_causal, local_window_size=local_window_size, chunk_size=chunk_size,
      segment_ids=segment_ids, q_positions=q_positions, kv_positions=kv_positions,
      prefix_lengths=prefix_lengths, kv_lengths=kv_lengths, mask=mask, num_heads=hq,
      block_mask=block_mask, block_shape=block_shape)
  if bias is not None:
    reference.check_bias(bias, q, k)
  if sinks is not None:
    reference.check_sinks(sinks, q)
  if logits_soft_cap is not None and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
  if distance_bias is not None:
    reference.check_distance_bias(distance_bias, q)
  if query_scale is not None:
    if tuple(query_scale.shape) != (b, tq, hq):
      raise ValueError(f"query_scale must have shape {(b, tq, hq)} ([B, Tq, Hq]), got"
                       f" {tuple(query_scale.shape)}")
    q = (q * query_scale[..., None]).astype(q.dtype)
  call = describe_call(q, k, v, mask_args=mask_args, bias=bias, logits_soft_cap=logits_soft_cap,
                       sinks=sinks, return_lse=return_lse, block_q=block_q, block_k=block_k,
                       user_positions=q_positions is not None or kv_positions is not None,
                       distance_bias=distance_bias)
  return q, call, mask_args, select_backend(call, implementation)


def describe_call(q, k, v, *, mask_args, bias=None, logits_soft_cap=None, sinks=None,
                  return_lse=False, block_q=None, block_k=None, user_positions=False,
                  distance_bias=None, platform: Optional[str] = None) -> AttentionCall:
  """The `AttentionCall` of validated arguments."""
  m = mask_args
  kinds = {
      "causal": m.is_causal, "window": m.window is not None, "chunk": m.chunk_size is not None,
      "prefix": m.prefix_lengths is not None, "segments": m.q_segment_ids is not None,
      "padding": m.kv_lengths is not None, "positions": user_positions,
      "dense": m.dense is not None, "blocks": m.block_mask is not None}
  return AttentionCall(
      platform=platform or jax.default_backend(),
      batch=q.shape[0], q_len=q.shape[1], kv_len=k.shape[1],
      num_q_heads=q.shape[2], num_kv_heads=k.shape[2], head_dim=q.shape[3], v_head_dim=v.shape[3],
      q_dtype=jnp.dtype(q.dtype), kv_dtype=jnp.dtype(k.dtype),
      mask_kinds=frozenset(kind for kind, present in kinds.items() if present),
      window=m.window, chunk_size=m.chunk_size,
      bias_shape=None if bias is None else (1,) * (4 - bias.ndim) + tuple(bias.shape),
      logits_soft_cap=logits_soft_cap, has_sinks=sinks is not None, return_lse=return_lse,
      block_q=block_q, block_k=block_k, has_distance_bias=distance_bias is not None,
      block_shape=m.block_shape)


def select_backend(call: AttentionCall, implementation: str = "auto") -> Backend:
  """The backend that runs `call` (see `pallas_kernels/dispatch.py` for the rules)."""
  return DISPATCH.select(call, implementation, platform=call.platform)


def available_implementations() -> Tuple[str, ...]:
  return DISPATCH.names()


def _check_implementation_name(name):
  DISPATCH.check_name(name)
