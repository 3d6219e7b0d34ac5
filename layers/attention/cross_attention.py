"""`cross_attention`: queries from a sequence X, keys and values from a context C.

From "Show, Attend and Tell: Neural Image Caption Generation with Visual
Attention" and "HATFormer: Historic Handwritten Arabic Text Recognition with
Transformers" (a text decoder attending to image features), "Long-Context
Language Modeling with Parallel Context Encoding" (CEPE: a small encoder reads
the context chunk by chunk and a frozen decoder cross-attends to it) and
"XC-Cache: Cross-Attending to Cached Context for Efficient LLM Inference"
(the context's keys and values are computed once and cached). The standard
multi-head form, with the head layout of `AttentionConfig` (Hq query heads,
Hkv | Hq KV heads of size D, so MHA / GQA / MQA are one layer):

    Q = X W_Q   [B, T, Hq, D]        X: [B, T, d_model]
    K = C W_K,  V = C W_V   [B, S, Hkv, D]     C: [B, S, d_context] (d_context may differ)
    O_h = softmax(Q_h K_{g(h)}^T / sqrt(D) + pad_C) V_{g(h)},   g(h) = floor(h Hkv / Hq)
    y   = gate * concat_h(O_h) W_O

pad_C is 0 on real context positions and -inf on padding. Attention is not
causal over C: every query sees every real context position. Padding is
`context_lengths` [B] (positions 0..len-1 are real) and/or a boolean
`context_mask` [B, S] (True = real); both given means both apply.
A row whose context has no real position (length 0, or a mask row of all
False) has O = 0 (the rule of every kernel here, pallas_kernels/flash/masking.py),
so y = 0 (plus W_O's bias if use_bias) and a residual block passes its input
through unchanged; its gradients are zero, never NaN.

Gate (`gate=`, optional): Flamingo-style tanh gating ("Flamingo: a Visual
Language Model for Few-Shot Learning", not a FAMILIES.md seed):
gate = tanh(alpha) with one learned scalar alpha initialised to 0, so a new
cross-attention layer inserted into a pretrained decoder starts as the identity
of the residual stream (the XC-Cache / CEPE setting of training only added
layers); `gate="sigmoid"` uses sigmoid(alpha) (0.5 at init). None (the
default): gate = 1.

Kernel paths:
  * `cross_attention` -> `pallas_kernels.flash_attention` with Tq = T, Tk = S,
    is_causal=False, the padding as `kv_lengths` (context_lengths) and as a
    (query, key) segment-id pair (context_mask: every query in segment 1, a real
    context position in 1, padding in 0): structured mask arguments every
    backend reads per tile, never a dense [T, S] mask. `implementation` is
    `cfg.implementation` ("auto": the Pallas kernel on TPU / GPU, the XLA path
    on CPU); "reference" runs `cross_attention_reference`, the plain-jnp
    specification (dense scores, explicit GQA grouping, masked softmax).
  * `cross_attention_decode` -> `pallas_kernels.decode_attention` over the
    cached context K/V with lengths = context_lengths (S when absent). The
    decode kernels are causal among their Tq query steps; cross-attention is
    not, so the Tq query tokens are folded into the GQA group axis (one query
    step of Tq * Hq / Hkv heads per KV head), which sees the whole cached
    context. With a `context_mask` (which decode_attention cannot express) it
    runs the flash path instead, as the docstring of that function says.

Caching (CEPE, XC-Cache): `layer.context_kv(C, context_lengths=, context_mask=)`
projects the context once into a `ContextKV` (K, V and the padding, a pytree
that passes through jit); `layer(x, kv=cache)` and `layer.decode(x_t, cache)`
reuse it, equal to `layer(x, C)` recomputed.

Not in the self-attention registry: the registry's contract is
`Family(cfg, *, rngs)` called as `module(x, *, mask, positions)`, a
self-attention over x. A cross-attention layer needs a second input (the
context, or its cached K/V), which that call cannot carry, so registering it
under `cross_attention` would give `model.attention="cross_attention"` a layer
that cannot run in `TransformerBlock`. Models use it through
`layers.cross_block.CrossAttentionBlock` (or directly). For the same reason
the layer reads no positional encoding: `cfg.positional` (and `cfg.causal`)
are not used; queries and context carry their own positions from their own
embeddings / encoders. A `cfg.window` or `cfg.options` is an error.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import pooling
from layers.attention.config import AttentionConfig
from layers.attention.projection import OutProjection
from layers.linear import Linear
from pallas_kernels.decode import api as decode_api
from pallas_kernels.flash import api as flash_api

GATES = ("tanh", "sigmoid")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ContextKV:
  """The context projected once (CEPE / XC-Cache): k, v [B, S, Hkv, D] and its padding."""

  k: jax.Array
  v: jax.Array
  lengths: Optional[jax.Array] = None  # [B] int, positions 0..len-1 are real
  mask: Optional[jax.Array] = None  # [B, S] bool, True = real


# ----------------------------------------------------------------------------- validation


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


PADDING_NAMES = ("context_lengths", "context_mask", "context length")


def check_context_padding(context_lengths: Optional[jax.Array], context_mask: Optional[jax.Array],
                          batch: int, context_len: int, *,
                          names: Tuple[str, str, str] = PADDING_NAMES) -> None:
  """Shapes and dtypes of the padding arguments (and the range of concrete lengths).

  names: how the errors call (lengths, mask, the sequence axis), for callers with their own."""
  lengths_name, mask_name, axis = names
  if context_lengths is not None:
    if tuple(context_lengths.shape) != (batch,):
      raise ValueError(f"{lengths_name} must be [batch] = ({batch},), got "
                       f"{tuple(context_lengths.shape)}")
    if not jnp.issubdtype(context_lengths.dtype, jnp.integer):
      raise ValueError(f"{lengths_name} must be integers, got {context_lengths.dtype}")
    if _is_concrete(context_lengths):
      host = np.asarray(context_lengths)
      lo, hi = (int(host.min()), int(host.max())) if host.size else (0, 0)
      if lo < 0 or hi > context_len:
        raise ValueError(f"{lengths_name} must lie in [0, {axis} {context_len}], "
                         f"got values in [{lo}, {hi}]")
  if context_mask is not None:
    if tuple(context_mask.shape) != (batch, context_len):
      raise ValueError(f"{mask_name} must be [batch, {axis}] = {(batch, context_len)} "
                       f"(True = real position), got {tuple(context_mask.shape)}")
    if context_mask.dtype != jnp.bool_:
      raise ValueError(f"{mask_name} must be boolean (True = real position), got "
                       f"{context_mask.dtype}")


def _check_qkv(q, k, v) -> Tuple[int, int, int]:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim], got shapes "
                     f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
  b, t, hq, d = q.shape
  if k.shape[0] != b or v.shape[0] != b:
    raise ValueError(f"the context batch ({k.shape[0]}) differs from the query batch ({b})")
  if tuple(v.shape[:3]) != tuple(k.shape[:3]):
    raise ValueError(f"k and v must agree on [batch, context length, kv_heads], got "
                     f"{tuple(k.shape)} and {tuple(v.shape)}")
  if k.shape[3] != d:
    raise ValueError(f"k head_dim {k.shape[3]} differs from q head_dim {d}")
  if hq % k.shape[2]:
    raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[2]})")
  if k.shape[1] == 0:
    raise ValueError("the context is empty (S = 0); give at least one (possibly padded) position")
  return b, t, k.shape[1]


# ----------------------------------------------------------------------------- pure functions


def cross_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                              context_lengths: Optional[jax.Array] = None,
                              context_mask: Optional[jax.Array] = None,
                              scale: Optional[float] = None, return_probs: bool = False):
  """The specification in plain jnp: q [B,T,Hq,D], k/v [B,S,Hkv,D] -> [B,T,Hq,Dv].

  Dense float32 scores [B, Hkv, G, T, S] (G = Hq / Hkv query heads per KV
  head), padding set to -inf, softmax over S; a row with no real position is 0.
  return_probs: also return the attention probabilities [B, Hq, T, S].
  """
  b, t, s = _check_qkv(q, k, v)
  check_context_padding(context_lengths, context_mask, b, s)
  hq, d, hkv, dv = q.shape[2], q.shape[3], k.shape[2], v.shape[3]
  g = hq // hkv
  scale = d ** -0.5 if scale is None else scale
  qf = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
  scores = scale * jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32))
  valid = pooling.valid_tokens(context_mask, context_lengths, b, s)
  p = pooling.masked_softmax(scores, None if valid is None else valid[:, None, None, None, :])
  out = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
  out = out.reshape(b, t, hq, dv).astype(q.dtype)
  return (out, p.reshape(b, hq, t, s)) if return_probs else out


def cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    context_lengths: Optional[jax.Array] = None,
                    context_mask: Optional[jax.Array] = None, scale: Optional[float] = None,
                    implementation: str = "auto") -> jax.Array:
  """The pure function of the family: q [B,T,Hq,D] against k/v [B,S,Hkv,D] -> [B,T,Hq,Dv],
  not causal, padded context positions invisible. Runs `flash_attention` (structured mask
  arguments: kv_lengths / a segment-id pair); implementation="reference" runs
  `cross_attention_reference`."""
  b, t, s = _check_qkv(q, k, v)
  check_context_padding(context_lengths, context_mask, b, s)
  if implementation == "reference":
    return cross_attention_reference(q, k, v, context_lengths=context_lengths,
                                     context_mask=context_mask, scale=scale)
  return flash_api.flash_attention(
      q, k, v, scale=scale, implementation=implementation,
      **pooling.flash_mask_kwargs(context_mask, context_lengths, b, t, s))


def cross_attention_decode(q: jax.Array, k: jax.Array, v: jax.Array, *,
                           context_lengths: Optional[jax.Array] = None,
                           context_mask: Optional[jax.Array] = None,
                           scale: Optional[float] = None, implementation: str = "auto"):
  """A few new query tokens (Tq = 1 for a decode step) against the cached context K/V through
  `decode_attention`; equals `cross_attention` on the same arguments.

  The Tq queries are folded into the GQA group axis (query head h of step t becomes head
  (h // G) * G * Tq + (h % G) * Tq + t of one step), so the decode kernel's causality
  among query steps does not apply: each query sees all real context positions.
  With `context_mask` (decode_attention takes lengths only) this runs the flash path
  (`cross_attention`) with the same `implementation`.
  """
  b, tq, s = _check_qkv(q, k, v)
  check_context_padding(context_lengths, context_mask, b, s)
  if implementation == "reference" or context_mask is not None:
    return cross_attention(q, k, v, context_lengths=context_lengths, context_mask=context_mask,
                           scale=scale, implementation=implementation)
  hq, d, hkv = q.shape[2], q.shape[3], k.shape[2]
  g = hq // hkv
  if v.shape[3] != d:
    raise ValueError(f"decode needs v head_dim == k head_dim ({d}), got {v.shape[3]}")
  folded = jnp.transpose(q.reshape(b, tq, hkv, g, d), (0, 2, 3, 1, 4)).reshape(
      b, 1, hkv * g * tq, d)
  lengths = (jnp.full((b,), s, jnp.int32) if context_lengths is None
             else jnp.clip(context_lengths.astype(jnp.int32), 0, s))
  out = decode_api.decode_attention(folded, k, v, lengths=lengths, scale=scale,
                                    implementation=implementation)
  return jnp.transpose(out.reshape(b, hkv, g, tq, d), (0, 3, 1, 2, 4)).reshape(b, tq, hq, d)


# ----------------------------------------------------------------------------- the layer


class CrossAttention(nnx.Module):
  """Projections (W_Q from d_model, W_K / W_V from d_context, W_O), the optional gate, and the
  `cross_attention` core. Built as `CrossAttention(cfg, d_context=, gate=, rngs=)`.

  cfg supplies d_model, num_heads, num_kv_heads, head_dim, use_bias, implementation, dtype,
  param_dtype. Parameters: q.kernel [d_model, Hq, D] ("embed", "heads", "head_dim"),
  k/v.kernel [d_context, Hkv, D] ("embed", "kv_heads", "head_dim"), out.o.kernel,
  alpha [] (with a gate).
  """

  def __init__(self, cfg: AttentionConfig, *, d_context: Optional[int] = None,
               gate: Optional[str] = None, gate_init: float = 0.0, rngs: nnx.Rngs):
    if cfg.window is not None:
      raise ValueError(f"cross_attention sees the whole context; window={cfg.window!r} "
                       "(the attention config's window) is not supported")
    if cfg.options:
      raise ValueError(f"cross_attention takes no attention_options, got {dict(cfg.options)}; "
                       "pass d_context / gate as arguments")
    d_context = cfg.d_model if d_context is None else d_context
    pooling.check_positive("d_context", d_context)
    if gate is not None and gate not in GATES:
      raise ValueError(f"gate={gate!r} is not one of {GATES} (or None)")
    self.cfg, self.d_context, self.gate = cfg, d_context, gate
    kw = dict(use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.q = Linear(cfg.d_model, (cfg.num_heads, cfg.head_dim),
                    axes=("embed", "heads", "head_dim"), **kw)
    self.k = Linear(d_context, (cfg.num_kv_heads, cfg.head_dim),
                    axes=("embed", "kv_heads", "head_dim"), **kw)
    self.v = Linear(d_context, (cfg.num_kv_heads, cfg.head_dim),
                    axes=("embed", "kv_heads", "head_dim"), **kw)
    self.out = OutProjection(cfg, rngs=rngs)
    self.alpha = (None if gate is None else
                  nnx.Param(jnp.full((), gate_init, cfg.param_dtype), logical_axes=()))

  # ------------------------------------------------------------------ checks
  def _check_x(self, x: jax.Array) -> None:
    if x.ndim != 3 or x.shape[-1] != self.cfg.d_model:
      raise ValueError(f"x must be [batch, seq, d_model={self.cfg.d_model}], got "
                       f"{tuple(x.shape)}")

  def _check_kv(self, x: jax.Array, kv: ContextKV) -> None:
    cfg = self.cfg
    want = (cfg.num_kv_heads, cfg.head_dim)
    if kv.k.ndim != 4 or tuple(kv.k.shape[2:]) != want:
      raise ValueError(f"kv.k must be [batch, context length, kv_heads={want[0]}, "
                       f"head_dim={want[1]}] (from this layer's context_kv), got "
                       f"{tuple(kv.k.shape)}")
    if kv.k.shape[0] != x.shape[0]:
      raise ValueError(f"the context batch ({kv.k.shape[0]}) differs from the x batch "
                       f"({x.shape[0]})")

  # ------------------------------------------------------------------ API
  def context_kv(self, context: jax.Array, *, context_lengths: Optional[jax.Array] = None,
                 context_mask: Optional[jax.Array] = None) -> ContextKV:
    """K, V of the context, computed once: context [B, S, d_context] -> ContextKV."""
    if context.ndim != 3 or context.shape[-1] != self.d_context:
      raise ValueError(f"context must be [batch, context length, d_context={self.d_context}], "
                       f"got {tuple(context.shape)}")
    check_context_padding(context_lengths, context_mask, context.shape[0], context.shape[1])
    return ContextKV(self.k(context), self.v(context), context_lengths, context_mask)

  def _resolve(self, x, context, kv, context_lengths, context_mask) -> ContextKV:
    self._check_x(x)
    if (context is None) == (kv is None):
      raise ValueError("give exactly one of context (the [B, S, d_context] features) and kv "
                       "(their cached ContextKV)")
    if kv is None:
      if context.ndim == 3 and context.shape[0] != x.shape[0]:
        raise ValueError(f"the context batch ({context.shape[0]}) differs from the x batch "
                         f"({x.shape[0]})")
      kv = self.context_kv(context, context_lengths=context_lengths, context_mask=context_mask)
    elif context_lengths is not None or context_mask is not None:
      raise ValueError("context_lengths / context_mask belong to context_kv(...) when a cached "
                       "kv is given (the cache carries its padding)")
    self._check_kv(x, kv)
    return kv

  def _finish(self, o: jax.Array) -> jax.Array:
    y = self.out(o)
    if self.gate is None:
      return y
    a = self.alpha[...].astype(jnp.float32)
    g = jnp.tanh(a) if self.gate == "tanh" else jax.nn.sigmoid(a)
    return y * g.astype(y.dtype)

  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None, *,
               kv: Optional[ContextKV] = None, context_lengths: Optional[jax.Array] = None,
               context_mask: Optional[jax.Array] = None) -> jax.Array:
    """x [B, T, d_model] attending to `context` [B, S, d_context] (or its cached `kv`)
    -> [B, T, d_model], through `cross_attention` with cfg.implementation."""
    kv = self._resolve(x, context, kv, context_lengths, context_mask)
    o = cross_attention(self.q(x), kv.k, kv.v, context_lengths=kv.lengths,
                        context_mask=kv.mask, implementation=self.cfg.implementation)
    return self._finish(o)

  def decode(self, x: jax.Array, kv: ContextKV, *,
             implementation: Optional[str] = None) -> jax.Array:
    """A generation step: the new token(s) x [B, Tq, d_model] (Tq = 1 usually) against the
    cached context, through `cross_attention_decode` (`decode_attention`).

    implementation: a decode backend (None: cfg.implementation; "cudnn", which has no
    decode backend, means "auto")."""
    kv = self._resolve(x, None, kv, None, None)
    if implementation is None:
      implementation = self.cfg.implementation
      if implementation not in decode_api.available_implementations():
        implementation = "auto"
    o = cross_attention_decode(self.q(x), kv.k, kv.v, context_lengths=kv.lengths,
                               context_mask=kv.mask, implementation=implementation)
    return self._finish(o)

  def train_flops_per_token(self, context_len: int) -> float:
    """Score and value matmul FLOPs per query token, forward + backward (12 Hq D S)."""
    return 12.0 * self.cfg.num_heads * self.cfg.head_dim * context_len
