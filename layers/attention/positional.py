"""Positional encodings, chosen by id with `model.positional`.

A positional encoding is an `nnx.Module` owned by the attention layer (so the
parameters of learned encodings train and are checkpointed with it), built by
`make_positional(cfg, rngs=...)`. It may do any of:

  (a) transform q and k: `enc(q, k, q_positions, kv_positions) -> (q, k)`
      (rotations, scales, norms; identity by default);
  (b) add a score bias that is a function of the position difference,
      described by `enc.distance_bias()` -> float32 [Hq, 3] rows (slope,
      power, center) meaning -slope_h |i - j - center_h|^power_h, or None
      (the default). It is added to the logits after the 1/sqrt(d) scale and
      before the mask; `MultiHeadAttention.core` passes it to
      `flash_attention(distance_bias=...)`, which differentiates through it.
      Every fast path (the Pallas kernels and the XLA path) evaluates it
      inside each tile, O(T) memory, with parameter gradients. `enc.has_bias`
      says statically whether an encoding makes one.
  (c) own the whole score computation, for encodings whose logit term needs
      q and k jointly and so is neither a (q, k) transform nor a function of
      i - j (CoPE: gates sigmoid(q_i . k_j), positions from a reverse cumsum
      over keys): `enc.owns_attention` (static, default False) is True and
      `enc.attention(q, k, v, mask, implementation=...) -> out [B, Tq, Hq, D]`
      replaces the flash kernel call in `MultiHeadAttention.core` (after (a)).
      The encoding then owns its reference and fast paths. Its (a) may return
      q and k in whatever layout its own `attention` reads (rope_buckets: a
      leading axis of one rotated copy per RoPE base).
  (d) widen the heads: `enc.heads_per_query = m` (static, default 1) means
      (a) returns q with m * Hq heads, the m heads made from query head h
      adjacent (h*m .. h*m + m - 1, so they share h's KV head under GQA);
      `MultiHeadAttention` then builds its out projection over m * Hq heads
      (RoPE++, layers/attention/rope_imag.py).
Families that override `MultiHeadAttention.core` (or `__call__`) refuse
encodings with (b) unless they declare `applies_positional_bias`, and always
refuse (c) and (d), which only the `mha` core runs.

Registered here: `rope` (rotary; linear, NTK, YaRN, Llama-3 scaling and
Giraffe's truncated basis, layers/attention/rope.py),
`nope` (no positional information: "Length Generalization of Causal
Transformers without Position Encoding" shows causal masks alone let a model
infer order), `alibi` (layers/attention/alibi.py), `bam`
(layers/attention/bam.py), `nope_hybrid` (layers/attention/nope_hybrid.py),
`cope` (layers/attention/cope.py), `rope_imag` (layers/attention/rope_imag.py)
and `rope_buckets` (layers/attention/rope_buckets.py).

RoPE options (`model.attention_options.<name>`), read only with
rope_scaling_type="truncated" (the truncated basis, layers/attention/rope.py):
  rope_truncate_zero_ratio (float >= 1, 8): b / a, frequencies at or below
      a = b / ratio are zeroed (b = 2 pi / rope_original_max_len);
  rope_truncate_rho_ratio (float > 0, 16): b / rho, the value rho = b / ratio
      given to the middle band a < theta < b.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import jax
from flax import nnx

from layers.attention.config import AttentionConfig
from layers.attention.registry import registrar
from layers.attention.rope import (TRUNCATE_RHO_RATIO, TRUNCATE_ZERO_RATIO, apply_rope,
                                   rope_frequencies)


class PositionalEncoding(nnx.Module):
  """Base: identity on (q, k), no bias, the kernel's attention. Subclasses override (a)-(d)."""

  has_bias = False  # static: whether `distance_bias` returns an array
  owns_attention = False  # static: whether `attention` replaces the kernel call
  heads_per_query = 1  # static: attention heads made from each projected query head

  def __call__(self, q: jax.Array, k: jax.Array, q_positions, kv_positions):
    return q, k

  def distance_bias(self) -> Optional[jax.Array]:
    """[Hq, 3] (slope, power, center) of -slope |i - j - center|^power, or None."""
    return None

  def attention(self, q: jax.Array, k: jax.Array, v: jax.Array, mask, *,
                implementation: str = "auto") -> jax.Array:
    """Per-head outputs [B, Tq, Hq, D] when `owns_attention`; q, k already through (a)."""
    raise NotImplementedError(f"{type(self).__name__} does not own the attention computation")


def _float_option(cfg: AttentionConfig, name: str, default: float) -> float:
  value = cfg.option(name, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"model.attention_options.{name} must be a number, got {value!r}")
  return float(value)


def rope_settings(cfg: AttentionConfig) -> Dict[str, object]:
  """`apply_rope` keyword arguments of the layer's RoPE settings (model.rope_* fields, and the
  truncated basis' options), validated here so errors name the setting."""
  kwargs = dict(base=cfg.rope_base, scaling=cfg.rope_scaling,
                scaling_type=cfg.rope_scaling_type,
                original_max_len=cfg.rope_original_max_len)
  if cfg.rope_scaling_type == "truncated":
    zero = _float_option(cfg, "rope_truncate_zero_ratio", TRUNCATE_ZERO_RATIO)
    rho = _float_option(cfg, "rope_truncate_rho_ratio", TRUNCATE_RHO_RATIO)
    if not zero >= 1:
      raise ValueError(f"model.attention_options.rope_truncate_zero_ratio must be >= 1 "
                       f"(a = b / ratio <= b), got {zero}")
    if not rho > 0:
      raise ValueError(f"model.attention_options.rope_truncate_rho_ratio must be positive, "
                       f"got {rho}")
    kwargs.update(truncate_zero_ratio=zero, truncate_rho_ratio=rho)
  rope_frequencies(cfg.head_dim, **kwargs)  # its errors name the model.rope_* field at fault
  return kwargs


class RoPE(PositionalEncoding):
  def __init__(self, cfg: AttentionConfig, *, rngs: Optional[nnx.Rngs] = None):
    del rngs
    if cfg.head_dim % 2:
      raise ValueError(f"positional='rope' needs an even head_dim, got {cfg.head_dim}")
    self.kwargs = rope_settings(cfg)

  def __call__(self, q: jax.Array, k: jax.Array, q_positions, kv_positions):
    return apply_rope(q, q_positions, **self.kwargs), apply_rope(k, kv_positions, **self.kwargs)


class NoPE(PositionalEncoding):
  def __init__(self, cfg: AttentionConfig, *, rngs: Optional[nnx.Rngs] = None):
    del cfg, rngs


POSITIONAL: Dict[str, Callable[..., PositionalEncoding]] = {"rope": RoPE, "nope": NoPE}


# Class decorator: `positional=name` builds `cls(cfg, rngs=rngs)`.
register_positional = registrar(POSITIONAL, "positional encoding", "positional_id")


def make_positional(cfg: AttentionConfig, *, rngs: Optional[nnx.Rngs] = None) -> PositionalEncoding:
  """The encoding module of `cfg.positional`. Learned encodings (bam, nope_hybrid) need rngs
  only for the module's construction; their initial values are deterministic."""
  if cfg.positional not in POSITIONAL:
    raise ValueError(
        f"unknown positional encoding {cfg.positional!r} (model.positional); "
        f"choose one of {sorted(POSITIONAL)}")
  return POSITIONAL[cfg.positional](cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))


# The modules below register themselves with `register_positional`.
from layers.attention import (  # noqa: E402,F401
    alibi, bam, cope, nope_hybrid, rope_buckets, rope_imag)
