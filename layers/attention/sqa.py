"""`sqa`: Sparse Query Attention -- fewer query heads, so fewer score FLOPs.

From "Sparse Query Attention (SQA): A Computationally Efficient Attention
Mechanism with Query Heads Reduction" (S2). With H = cfg.num_heads the
baseline head count and d = cfg.head_dim (d_model / H by default):

    Q = x W_Q   [B, T, H_q,  d]     H_q < H query heads
    K = x W_K,  V = x W_V   [B, T, H_kv, d],   H_kv <= H_q, H_kv | H_q
    O_h = softmax(Q_h K_{g(h)}^T / sqrt(d) + M) V_{g(h)},   g(h) = floor(h * H_kv / H_q)
    y   = concat_h(O_h) W_O,     W_O: H_q * d -> d_model

so the score and value matmuls cost 2 * H_q * T^2 * d each (`score_flops`):
H_q / H of MHA's, whereas GQA/MQA (fewer KV heads) leave them unchanged.
The core is `mha` (one layer, a head preset): the layer is `MultiHeadAttention`
built on the derived config `sqa_config(cfg)`.

Variants, option `model.attention_options.variant` (confirmed from the
author's RxNN write-up, docs/research/sparse_query_attention.md, whose
H = 16 experiments use 8 query / 4 KV heads for SQA, 8 / 8 for sSQA, 4 / 4 for
xSQA, 4 / 1 for xSMQA; the paper calls them a "family of architectural variants"):

    "sqa"   (default) H_q = H/2, H_kv = min(cfg.num_kv_heads, H_q)  -- a GQA with half the queries
    "ssqa"  symmetric:  H_q = H_kv = H/2
    "xsqa"  extreme:    H_q = H/4, H_kv = min(cfg.num_kv_heads, H_q)
    "xsmqa" extreme multi-query: H_q = H/4, H_kv = 1

Open in the paper (choices made here): head ratios are presets, overridable
by `query_heads` and `kv_heads` options (then `variant` only fills what is not
given); d stays the baseline head size (the paper keeps d_head = d_model / H,
so W_Q and W_O shrink); H/2 or H/4 must divide exactly (an error names the
option otherwise). Quality claims are not tested here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax

from layers.attention import registry
from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.attention.mha import MultiHeadAttention, mha

VARIANTS = ("sqa", "ssqa", "xsqa", "xsmqa")
_DIVISOR = {"sqa": 2, "ssqa": 2, "xsqa": 4, "xsmqa": 4}


def _positive_int(cfg: AttentionConfig, name: str) -> Optional[int]:
  value = cfg.option(name)
  if value is None:
    return None
  if isinstance(value, bool) or int(value) != value or int(value) <= 0:
    raise ValueError(f"model.attention_options.{name}={value!r} must be a positive integer")
  return int(value)


def sqa_heads(cfg: AttentionConfig) -> Tuple[int, int]:
  """(H_q, H_kv) of an `sqa` layer whose baseline head count is cfg.num_heads."""
  variant = cfg.option("variant", "sqa")
  if variant not in VARIANTS:
    raise ValueError(f"model.attention_options.variant={variant!r} is not one of {VARIANTS}")
  h = cfg.num_heads
  hq = _positive_int(cfg, "query_heads")
  if hq is None:
    div = _DIVISOR[variant]
    if h % div:
      raise ValueError(
          f"model.attention_options.variant={variant!r} needs num_heads divisible by {div}, got"
          f" {h}; set model.attention_options.query_heads explicitly")
    hq = h // div
  hkv = _positive_int(cfg, "kv_heads")
  if hkv is None:
    hkv = {"ssqa": hq, "xsmqa": 1}.get(variant, min(cfg.num_kv_heads, hq))
  if hkv > hq or hq % hkv:
    raise ValueError(
        f"sqa needs kv heads ({hkv}) <= query heads ({hq}) and dividing them; check"
        f" model.attention_options.query_heads / kv_heads / variant")
  return hq, hkv


def sqa_config(cfg: AttentionConfig) -> AttentionConfig:
  """The config of the layer actually built: H_q query heads, H_kv KV heads, baseline head_dim."""
  hq, hkv = sqa_heads(cfg)
  return dataclasses.replace(cfg, num_heads=hq, num_kv_heads=hkv, head_dim=cfg.head_dim)


def score_flops(cfg: AttentionConfig, seq_len: int, *, batch: int = 1) -> int:
  """FLOPs of the score matmul Q K^T of one `sqa` layer (bidirectional, no causal halving):
  2 * B * H_q * T^2 * d. (The value matmul P V costs the same; both scale with H_q.)"""
  hq, _ = sqa_heads(cfg)
  return 2 * batch * hq * seq_len * seq_len * cfg.head_dim


def sqa(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[Mask] = None, *,
        scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
  """The pure function: q [B,T,H_q,d], k/v [B,T,H_kv,d] -> [B,T,H_q,d]; the head layout is the family."""
  return mha(q, k, v, mask, scale=scale, implementation=implementation)


@registry.register("sqa")
class SparseQueryAttention(MultiHeadAttention):
  """`MultiHeadAttention` on `sqa_config(cfg)`. Options: variant, query_heads, kv_heads.

  `self.cfg` is the derived config (H_q, H_kv heads); `self.base_cfg` the one given.
  """

  def __init__(self, cfg: AttentionConfig, *, rngs):
    self.base_cfg = cfg
    super().__init__(sqa_config(cfg), rngs=rngs)
