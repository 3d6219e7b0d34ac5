"""The decoder block with cross-attention (a captioner's / encoder-decoder's text decoder):

    h = x + SelfAttn(Norm(x))                  causal over x (any registered family)
    h = h + CrossAttn(Norm(h), C)              full over the real positions of the context C
    y = h + MLP(Norm(h))

pre-norm, as `TransformerBlock` (layers/block.py), whose pieces it reuses: it is
a `TransformerBlock` (same parameter names `attn_norm`, `attention`, `mlp_norm`,
`mlp`, so a pretrained decoder's weights load into it unchanged) plus
`cross_norm` and `cross_attention` (layers/attention/cross_attention.py), the
standard decoder layer of "Attention Is All You Need" in pre-norm form, as used
by the text decoders of "Show, Attend and Tell"-style captioners and "HATFormer:
Historic Handwritten Arabic Text Recognition with Transformers". With
`gate="tanh"` the cross-attention residual is tanh-gated and starts closed
(Flamingo-style adapters; XC-Cache / CEPE add such layers to a frozen decoder).

The context C [B, S, d_context] (e.g. ViT patch features) is given per call, or
projected once with `block.context_kv(C, ...)` and passed as `kv=` (the K/V of
the context are then not recomputed at every decoding step).

Self-attention runs through the family's own fast path; cross-attention
through `flash_attention` (layers/attention/cross_attention.py). An example
whose context has no real position gets a zero cross-attention update (the
sublayer is skipped: y = h + MLP(Norm(h)) with h = x + SelfAttn(Norm(x))).

Generation: `block.init_cache(batch, capacity)` is the self-attention's KV
cache (layers/attention/kv_cache.py); the context side is cached once per
example (`context_kv`). `block.prefill(x, cache, kv=)` runs the parallel form over
the prompt and fills the cache; `block.decode(x_t, cache, kv=)` runs a step: the
self-attention over its cache and `cross_attention.decode(x_t, kv)` over the
context, both through `decode_attention`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
from flax import nnx

from layers.attention.config import AttentionConfig
from layers.attention.cross_attention import ContextKV, CrossAttention
from layers.attention.kv_cache import KVCache
from layers.attention.masks import Mask
from layers.block import TransformerBlock
from layers.norms import make_norm


def cross_config(attn_cfg: AttentionConfig) -> AttentionConfig:
  """The cross-attention config derived from the self-attention one: same head layout, bias,
  dtypes and implementation; not causal, no positional encoding, no window, no options."""
  return dataclasses.replace(attn_cfg, causal=False, positional="nope", window=None, options={},
                             positional_schedule=None, rope_window=None)


class CrossAttentionBlock(TransformerBlock):
  """`TransformerBlock` + a pre-norm cross-attention sublayer between attention and MLP.

  attention / attn_cfg: the self-attention family (registry id) and its config
  (attn_cfg.causal should be True for a decoder). cross_cfg: the cross-attention's config
  (None: `cross_config(attn_cfg)`); d_context: the context width (None: d_model);
  gate: None | "tanh" | "sigmoid" on the cross-attention output.
  """

  def __init__(self, *, attention: str, attn_cfg: AttentionConfig, mlp_dim: int,
               d_context: Optional[int] = None, cross_cfg: Optional[AttentionConfig] = None,
               gate: Optional[str] = None, mlp_kind: str = "swiglu", norm: str = "rmsnorm",
               norm_eps: float = 1e-6, rngs: nnx.Rngs):
    super().__init__(attention=attention, attn_cfg=attn_cfg, mlp_dim=mlp_dim, mlp_kind=mlp_kind,
                     norm=norm, norm_eps=norm_eps, rngs=rngs)
    cross_cfg = cross_config(attn_cfg) if cross_cfg is None else cross_cfg
    if cross_cfg.d_model != attn_cfg.d_model:
      raise ValueError(f"cross_cfg.d_model={cross_cfg.d_model} differs from the block's "
                       f"d_model={attn_cfg.d_model}")
    self.cross_norm = make_norm(norm, attn_cfg.d_model, eps=norm_eps,
                                param_dtype=attn_cfg.param_dtype)
    self.cross_attention = CrossAttention(cross_cfg, d_context=d_context, gate=gate, rngs=rngs)

  def context_kv(self, context: jax.Array, *, context_lengths: Optional[jax.Array] = None,
                 context_mask: Optional[jax.Array] = None) -> ContextKV:
    """This block's K/V of the context, computed once (pass as `kv=`)."""
    return self.cross_attention.context_kv(context, context_lengths=context_lengths,
                                           context_mask=context_mask)

  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None, *,
               kv: Optional[ContextKV] = None, context_lengths: Optional[jax.Array] = None,
               context_mask: Optional[jax.Array] = None, mask: Optional[Mask] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    """x [B, T, d_model], context [B, S, d_context] (or kv) -> [B, T, d_model].

    mask / positions: the self-attention's (None: its own causal mask, positions 0..T-1)."""
    h = x + self.attention(self.attn_norm(x), mask=mask, positions=positions)
    h = h + self.cross_attention(self.cross_norm(h), context, kv=kv,
                                 context_lengths=context_lengths, context_mask=context_mask)
    return h + self.mlp(self.mlp_norm(h))

  # Decoding ------------------------------------------------------------------
  def _cross_and_mlp(self, h: jax.Array, kv: ContextKV, *, step: bool) -> jax.Array:
    c = self.cross_norm(h)
    h = h + (self.cross_attention.decode(c, kv) if step else self.cross_attention(c, kv=kv))
    return h + self.mlp(self.mlp_norm(h))

  def prefill(self, x: jax.Array, cache: KVCache, *, kv: ContextKV,
              lengths: Optional[jax.Array] = None, mask: Optional[Mask] = None,
              positions: Optional[jax.Array] = None) -> Tuple[jax.Array, KVCache]:
    """The parallel forward over prompts x [B, T, d] against the cached context `kv`
    -> (y, the self-attention cache holding their K/V)."""
    a, cache = self.attention.prefill(self.attn_norm(x), cache, lengths=lengths, mask=mask,
                                      positions=positions)
    return self._cross_and_mlp(x + a, kv, step=False), cache

  def decode(self, x: jax.Array, cache: KVCache, *, kv: ContextKV
             ) -> Tuple[jax.Array, KVCache]:
    """New tokens x [B, Tq, d] at the cache's next positions -> (y, cache + them)."""
    a, cache = self.attention.decode(self.attn_norm(x), cache)
    return self._cross_and_mlp(x + a, kv, step=True), cache
