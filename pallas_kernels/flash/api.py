"""`flash_attention`: softmax attention with one validation and explicit dispatch.

    out = softmax(cap * tanh(scale Q K^T / cap) + bias, masked, [+ sink]) V

(the equations are in `reference.py`; which pairs are visible in `masking.py`).
Every call is validated once, described by an `AttentionCall`, and handed to
one backend:

  * implementation="auto" walks `BACKENDS[platform]` in order and runs the
    first backend whose `is_supported(call)` says yes. A skipped backend is
    logged once per reason (never a silent fallback). Every list ends at the
    XLA path, which supports every call.
  * implementation="<name>" runs that backend or raises: a registered backend
    that does not support the call raises ValueError with its reason; a
    backend that is planned but not written ("pallas", "pallas_interpret",
    "cudnn") raises NotImplementedError; any other name raises ValueError.

A new backend is an object with `name`, `is_supported(call) -> (bool, reason)`
and `__call__(q, k, v, call=, mask_args=, bias=, scale=, logits_soft_cap=,
sinks=, return_lse=, block_q=, block_k=)`, added with `register_backend`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, FrozenSet, List, Optional, Protocol, Tuple

import jax
import jax.numpy as jnp

from pallas_kernels.flash import masking
from pallas_kernels.flash import reference
from pallas_kernels.flash import xla

_log = logging.getLogger(__name__)

# Backends named by the architecture but not written yet: asking for one by
# name must fail loudly rather than run something else.
PLANNED_IMPLEMENTATIONS = ("pallas", "pallas_interpret", "cudnn")

MASK_KINDS = ("causal", "window", "chunk", "prefix", "segments", "padding", "positions", "dense")


@dataclasses.dataclass(frozen=True)
class AttentionCall:
  """The static facts of one call, all a backend needs to decide if it supports it.

  `mask_kinds` is a subset of MASK_KINDS: "positions" means the caller passed
  its own q/kv positions (rather than the default bottom-right 0..Tk-1),
  "padding" means kv_lengths, "dense" an explicit boolean mask.
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

  @property
  def group_size(self) -> int:
    return self.num_q_heads // self.num_kv_heads


class Backend(Protocol):
  name: str

  def is_supported(self, call: AttentionCall) -> Tuple[bool, str]:
    ...

  def __call__(self, q, k, v, *, call: AttentionCall, mask_args: masking.MaskArgs, bias, scale,
               logits_soft_cap, sinks, return_lse: bool, block_q, block_k):
    ...


class XlaBackend:
  """The memory-efficient path in plain XLA (`xla.py`); supports every call on every platform."""

  name = "xla"

  def is_supported(self, call):
    return True, ""

  def __call__(self, q, k, v, *, call, mask_args, bias, scale, logits_soft_cap, sinks, return_lse,
               block_q, block_k):
    return xla.attention(q, k, v, mask_args=mask_args, bias=bias, scale=scale,
                         logits_soft_cap=logits_soft_cap, sinks=sinks, return_lse=return_lse,
                         block_q=block_q, block_k=block_k)


class ReferenceBackend:
  """The dense specification (`reference.py`): quadratic memory; for tests, never chosen by "auto"."""

  name = "reference"

  def is_supported(self, call):
    return True, ""

  def __call__(self, q, k, v, *, call, mask_args, bias, scale, logits_soft_cap, sinks, return_lse,
               block_q, block_k):
    return reference.attention(q, k, v, mask_args=mask_args, bias=bias, scale=scale,
                               logits_soft_cap=logits_soft_cap, sinks=sinks, return_lse=return_lse)


XLA = XlaBackend()
REFERENCE = ReferenceBackend()

# "auto" order per platform (jax.default_backend()). Faster, narrower
# backends go in front of XLA with `register_backend`.
BACKENDS: Dict[str, List[Backend]] = {"cpu": [XLA], "gpu": [XLA], "tpu": [XLA]}


def register_backend(backend: Backend, platforms, *, before: str = "xla") -> None:
  """Puts `backend` into the "auto" list of each platform, just ahead of `before`."""
  for platform in platforms:
    order = BACKENDS.setdefault(platform, [XLA])
    order[:] = [b for b in order if b.name != backend.name]
    names = [b.name for b in order]
    order.insert(names.index(before) if before in names else len(order), backend)


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
    return_lse: also return the log-sum-exp [B, Hq, Tq] (float32; -inf for a
      row with nothing visible and no sink).
    implementation: "auto", "xla", "reference", or a registered backend name.
    block_q, block_k: tile sizes for tiled backends (None: the backend's choice).

  Returns:
    out [B, Tq, Hq, Dv] in q.dtype, or (out, lse) with return_lse.
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
      prefix_lengths=prefix_lengths, kv_lengths=kv_lengths, mask=mask, num_heads=hq)
  if bias is not None:
    reference.check_bias(bias, q, k)
  if sinks is not None:
    reference.check_sinks(sinks, q)
  if logits_soft_cap is not None and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
  call = describe_call(q, k, v, mask_args=mask_args, bias=bias, logits_soft_cap=logits_soft_cap,
                       sinks=sinks, return_lse=return_lse, block_q=block_q, block_k=block_k,
                       user_positions=q_positions is not None or kv_positions is not None)
  backend = select_backend(call, implementation)
  return backend(q, k, v, call=call, mask_args=mask_args, bias=bias, scale=scale,
                 logits_soft_cap=logits_soft_cap, sinks=sinks, return_lse=return_lse,
                 block_q=block_q, block_k=block_k)


def describe_call(q, k, v, *, mask_args, bias=None, logits_soft_cap=None, sinks=None,
                  return_lse=False, block_q=None, block_k=None, user_positions=False,
                  platform: Optional[str] = None) -> AttentionCall:
  """The `AttentionCall` of validated arguments."""
  m = mask_args
  kinds = {
      "causal": m.is_causal, "window": m.window is not None, "chunk": m.chunk_size is not None,
      "prefix": m.prefix_lengths is not None, "segments": m.q_segment_ids is not None,
      "padding": m.kv_lengths is not None, "positions": user_positions,
      "dense": m.dense is not None}
  return AttentionCall(
      platform=platform or jax.default_backend(),
      batch=q.shape[0], q_len=q.shape[1], kv_len=k.shape[1],
      num_q_heads=q.shape[2], num_kv_heads=k.shape[2], head_dim=q.shape[3], v_head_dim=v.shape[3],
      q_dtype=jnp.dtype(q.dtype), kv_dtype=jnp.dtype(k.dtype),
      mask_kinds=frozenset(kind for kind, present in kinds.items() if present),
      window=m.window, chunk_size=m.chunk_size,
      bias_shape=None if bias is None else (1,) * (4 - bias.ndim) + tuple(bias.shape),
      logits_soft_cap=logits_soft_cap, has_sinks=sinks is not None, return_lse=return_lse,
      block_q=block_q, block_k=block_k)


def select_backend(call: AttentionCall, implementation: str = "auto") -> Backend:
  """The backend that runs `call` (see the module docstring for the rules)."""
  _check_implementation_name(implementation)
  order = BACKENDS.get(call.platform, [XLA])
  if implementation == "auto":
    for backend in order:
      ok, reason = backend.is_supported(call)
      if ok:
        return backend
      _log_skip_once(call.platform, backend.name, reason)
    raise AssertionError(f"no backend in {[b.name for b in order]} supports {call}")  # XLA always does
  backend = _find(implementation, call.platform)
  ok, reason = backend.is_supported(call)
  if not ok:
    raise ValueError(f"implementation={implementation!r} does not support this call: {reason}")
  return backend


def available_implementations() -> Tuple[str, ...]:
  names = {"auto", REFERENCE.name} | {b.name for order in BACKENDS.values() for b in order}
  return tuple(sorted(names))


def _find(name, platform) -> Backend:
  if name == REFERENCE.name:
    return REFERENCE
  for backend in BACKENDS.get(platform, []):
    if backend.name == name:
      return backend
  for platform_name, order in BACKENDS.items():
    for backend in order:
      if backend.name == name:
        raise ValueError(
            f"implementation={name!r} is registered for platform {platform_name!r}, not for the"
            f" current platform {platform!r}")
  raise NotImplementedError(
      f"implementation={name!r}: the {name} attention backend is not written yet; use"
      f" implementation='auto' or 'xla'")


def _check_implementation_name(name):
  valid = set(available_implementations()) | set(PLANNED_IMPLEMENTATIONS)
  if name not in valid:
    raise ValueError(f"implementation must be one of {sorted(valid)}, got implementation={name!r}")


_logged_skips = set()


def _log_skip_once(platform, name, reason):
  if (platform, name, reason) not in _logged_skips:
    _logged_skips.add((platform, name, reason))
    _log.warning("flash_attention: skipping backend %r on %s: %s", name, platform, reason)
