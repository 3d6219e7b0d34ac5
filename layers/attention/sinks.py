"""`sinks`: attention sinks that every query can always see.

Sources (FAMILIES.md): "Attention Entropy is a Key Factor: An Analysis of
Parallel Context Encoding with Full-attention-based Pre-trained Language
Models" (S4), "Gated Attention for Large Language Models: Non-linearity,
Sparsity, and Attention-Sink-Free" (S2), "DuoAttention: Efficient Long-Context
LLM Inference with Retrieval and Streaming Heads" (S1), hidden sinks / ACT
(S1, S2). The seeds only describe sinks; the two learnable forms below are the
standard ones (Std, as FAMILIES.md says; a per-head sink logit as in gpt-oss,
learned sink tokens as in StreamingLLM's "sink token" pre-training).
Option `model.attention_options.sink`:

  "logit" (default): a learned per-query-head logit s_h joins the softmax
  denominator and carries no value,

      p_ij = exp(l_ij) / (exp(s_h) + sum_{j visible} exp(l_ij)),   O_h = sum_j p_ij V_j

  computed by `flash_attention(..., sinks=s)`. s_h -> -inf gives plain softmax.
  Parameter `sink_logits` [H_q], initialised to `sink_init` (default 0.0).

  "tokens": n = `num_sink_tokens` (default 1) learned key/value rows per KV
  head, K_s, V_s [n, H_kv, d], prepended to every query's keys and visible to
  it under any mask (causal, sliding window, chunks, segment ids, padding):

      O_h = softmax([Q_h K_s^T, Q_h K^T] / sqrt(d) + [0, M]) [V_s; V]

  Implemented as two `flash_attention` calls merged by log-sum-exp (not by
  giving the sink rows a position/segment every query sees, which no single
  position can be under a sliding window):

      (O_x, L_x) = attention over the sequence with the mask M   (return_lse)
      (O_s, L_s) = attention over the n sink rows, all visible     (return_lse)
      O = (e^{L_x - m} O_x + e^{L_s - m} O_s) / (e^{L_x - m} + e^{L_s - m}),  m = max(L_x, L_s)

  A query row with no visible sequence key (L_x = -inf) attends only to the
  sinks, so it stays finite. Sink keys are not rotated by RoPE, which is the
  same as placing them at position 0 for every query (rotation at 0 is the
  identity); they are shared across the batch. K_s and V_s are initialised to
  zero, so at initialisation each sink token acts as a logit sink with s = 0
  (exp(0) in the denominator, no value); gradients reach both from step one.

Open (choices above): sink form, count, initialisation, sink positions.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import registry
from layers.attention.config import AttentionConfig
from layers.attention.kv_cache import KVCache, attend_cache
from layers.attention.masks import Mask
from layers.attention.mha import MultiHeadAttention
from pallas_kernels.flash import api as flash_api

SINKS = ("logit", "tokens")


def sink_logit_attention(q: jax.Array, k: jax.Array, v: jax.Array, sink_logits: jax.Array,
                         mask: Optional[Mask] = None, *, scale: Optional[float] = None,
                         implementation: str = "auto") -> jax.Array:
  """Softmax with a per-head sink logit: q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], sink_logits [Hq]."""
  mask = Mask.bidirectional() if mask is None else mask
  return flash_api.flash_attention(q, k, v, sinks=sink_logits, scale=scale,
                                   implementation=implementation, **mask.kernel_args())


def sink_token_attention(q: jax.Array, k: jax.Array, v: jax.Array, sink_k: jax.Array,
                         sink_v: jax.Array, mask: Optional[Mask] = None, *,
                         scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
  """Softmax over [sink rows; keys], the sink rows visible to every query whatever the mask.

  q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], sink_k/sink_v [n, Hkv, D] -> [B,Tq,Hq,D].
  """
  mask = Mask.bidirectional() if mask is None else mask
  b = q.shape[0]
  if sink_k.ndim != 3 or sink_k.shape != sink_v.shape or sink_k.shape[1:] != k.shape[2:]:
    raise ValueError(
        f"sink_k and sink_v must both be [n, Hkv={k.shape[2]}, D={k.shape[3]}], got"
        f" {sink_k.shape} and {sink_v.shape}")
  o_x, lse_x = flash_api.flash_attention(q, k, v, scale=scale, return_lse=True,
                                         implementation=implementation, **mask.kernel_args())
  sk = jnp.broadcast_to(sink_k.astype(k.dtype)[None], (b,) + sink_k.shape)
  sv = jnp.broadcast_to(sink_v.astype(v.dtype)[None], (b,) + sink_v.shape)
  o_s, lse_s = flash_api.flash_attention(q, sk, sv, scale=scale, return_lse=True,
                                         implementation=implementation)  # no mask: all visible
  lse_x = jnp.swapaxes(lse_x, 1, 2)[..., None]  # [B, Tq, Hq, 1]
  lse_s = jnp.swapaxes(lse_s, 1, 2)[..., None]
  m = jax.lax.stop_gradient(jnp.maximum(lse_x, lse_s))  # finite: lse_s always is
  w_x, w_s = jnp.exp(lse_x - m), jnp.exp(lse_s - m)
  out = (w_x * o_x.astype(jnp.float32) + w_s * o_s.astype(jnp.float32)) / (w_x + w_s)
  return out.astype(q.dtype)


@registry.register("sinks")
class SinkAttention(MultiHeadAttention):
  """`mha` projections + learned sinks. Options: sink, sink_init, num_sink_tokens."""

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    kind = cfg.option("sink", "logit")
    if kind not in SINKS:
      raise ValueError(f"model.attention_options.sink={kind!r} is not one of {SINKS}")
    self.kind = kind
    if kind == "logit":
      init = float(cfg.option("sink_init", 0.0))
      self.sink_logits = nnx.Param(jnp.full((cfg.num_heads,), init, cfg.param_dtype),
                                   logical_axes=("heads",))
    else:
      n = cfg.option("num_sink_tokens", 1)
      if isinstance(n, bool) or int(n) != n or int(n) < 1:
        raise ValueError(
            f"model.attention_options.num_sink_tokens={n!r} must be a positive integer")
      shape = (int(n), cfg.num_kv_heads, cfg.head_dim)
      axes = (None, "kv_heads", "head_dim")
      self.sink_k = nnx.Param(jnp.zeros(shape, cfg.param_dtype), logical_axes=axes)
      self.sink_v = nnx.Param(jnp.zeros(shape, cfg.param_dtype), logical_axes=axes)

  def decode_refusal(self) -> Optional[str]:
    if self.kind == "tokens":
      return ("model.attention_options.sink='tokens' has no KV-cache decode path (the sink"
              " tokens are not in the cache); use sink='logit' to generate")
    return super().decode_refusal()

  def attend_cached(self, x: jax.Array, q: jax.Array, cache: KVCache) -> jax.Array:
    """Decoding with sink logits: every new token's softmax includes s_h, as in `attend`."""
    return attend_cache(q, cache, window=self.cfg.window, sinks=self.sink_logits[...],
                        implementation=self.cfg.implementation)

  def attend(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
             mask: Mask) -> jax.Array:
    cfg = self.cfg
    if self.kind == "logit":
      return sink_logit_attention(q, k, v, self.sink_logits[...], mask,
                                  implementation=cfg.implementation)
    return sink_token_attention(q, k, v, self.sink_k[...], self.sink_v[...], mask,
                                implementation=cfg.implementation)
