"""The transformer block every model shares, pre-norm (Llama, GPT-2, ViT, ModernBERT) or
post-norm (the original Transformer and BERT):

    pre:   h = x + Attn(Norm(x));   y = h + MLP(Norm(h))
    post:  h = Norm(x + Attn(x));   y = Norm(h + MLP(h))

parameterised by attention family (registry id), norm, MLP kind and activation,
and positional encoding (inside the attention config). `attn_norm=False` makes
the pre-norm before attention the identity (ModernBERT's first layer, whose
input the embedding norm has already normalised).
"""

from __future__ import annotations

from typing import Optional

import jax
from flax import nnx

from layers.attention import registry
from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.mlp import MLP
from layers.norms import make_norm

NORM_POSITIONS = ("pre", "post")


class TransformerBlock(nnx.Module):

  def __init__(self, *, attention: str, attn_cfg: AttentionConfig, mlp_dim: int,
               mlp_kind: str = "swiglu", mlp_activation: Optional[str] = None,
               norm: str = "rmsnorm", norm_eps: float = 1e-6, norm_position: str = "pre",
               attn_norm: bool = True, rngs: nnx.Rngs):
    if norm_position not in NORM_POSITIONS:
      raise ValueError(f"norm_position={norm_position!r} is not one of {NORM_POSITIONS}")
    if not attn_norm and norm_position != "pre":
      raise ValueError("attn_norm=False (no norm before attention) needs norm_position='pre'")
    d = attn_cfg.d_model
    self.norm_position = norm_position
    self.attn_norm = (make_norm(norm, d, eps=norm_eps, param_dtype=attn_cfg.param_dtype)
                      if attn_norm else None)
    self.attention = registry.get(attention)(attn_cfg, rngs=rngs)
    self.mlp_norm = make_norm(norm, d, eps=norm_eps, param_dtype=attn_cfg.param_dtype)
    self.mlp = MLP(d, mlp_dim, kind=mlp_kind, activation=mlp_activation,
                   use_bias=attn_cfg.use_bias, dtype=attn_cfg.dtype,
                   param_dtype=attn_cfg.param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, mask: Optional[Mask] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    if self.norm_position == "post":
      x = self.attn_norm(x + self.attention(x, mask=mask, positions=positions))
      return self.mlp_norm(x + self.mlp(x))
    h = x if self.attn_norm is None else self.attn_norm(x)
    x = x + self.attention(h, mask=mask, positions=positions)
    return x + self.mlp(self.mlp_norm(x))
