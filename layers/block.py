"""The transformer block every model shares (pre-norm, as in Llama and GPT-2):

    h = x + Attn(Norm(x));   y = h + MLP(Norm(h))

parameterised by attention family (registry id), norm, MLP kind and
positional encoding (inside the attention config).
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


class TransformerBlock(nnx.Module):

  def __init__(self, *, attention: str, attn_cfg: AttentionConfig, mlp_dim: int,
               mlp_kind: str = "swiglu", norm: str = "rmsnorm", norm_eps: float = 1e-6,
               rngs: nnx.Rngs):
    d = attn_cfg.d_model
    self.attn_norm = make_norm(norm, d, eps=norm_eps, param_dtype=attn_cfg.param_dtype)
    self.attention = registry.get(attention)(attn_cfg, rngs=rngs)
    self.mlp_norm = make_norm(norm, d, eps=norm_eps, param_dtype=attn_cfg.param_dtype)
    self.mlp = MLP(d, mlp_dim, kind=mlp_kind, use_bias=attn_cfg.use_bias, dtype=attn_cfg.dtype,
                   param_dtype=attn_cfg.param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, mask: Optional[Mask] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    x = x + self.attention(self.attn_norm(x), mask=mask, positions=positions)
    return x + self.mlp(self.mlp_norm(x))
