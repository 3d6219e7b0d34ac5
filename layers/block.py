"""The transformer block every model shares, pre-norm (Llama, GPT-2, ViT, ModernBERT) or
post-norm (the original Transformer and BERT):

    pre:   h = x + Attn(Norm(x));   y = h + MLP(Norm(h))
    post:  h = Norm(x + Attn(x));   y = Norm(h + MLP(h))

parameterised by attention family (registry id), norm, MLP kind and activation,
and positional encoding (inside the attention config). `attn_norm=False` makes
the pre-norm before attention the identity (ModernBERT's first layer, whose
input the embedding norm has already normalised).

Decoding: `init_cache`, `prefill` and `decode` run the same sublayers with the
attention's KV-cache methods (layers/attention/mha.py) in place of its call,
returning (y, cache).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

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
    y, _ = self._residual(x, lambda h: (self.attention(h, mask=mask, positions=positions), None))
    return y

  def _residual(self, x: jax.Array, attend: Callable[[jax.Array], Tuple[jax.Array, Any]]
                ) -> Tuple[jax.Array, Any]:
    """The block (pre- or post-norm) with `attend(h) -> (attention output, aux)` as its
    attention sublayer: the plain call, prefill and decode share it."""
    if self.norm_position == "post":
      a, aux = attend(x)
      x = self.attn_norm(x + a)
      return self.mlp_norm(x + self.mlp(x)), aux
    a, aux = attend(x if self.attn_norm is None else self.attn_norm(x))
    x = x + a
    return x + self.mlp(self.mlp_norm(x)), aux

  # Decoding ------------------------------------------------------------------
  def init_cache(self, batch: int, capacity: int, dtype=None):
    return self.attention.init_cache(batch, capacity, dtype)

  def prefill(self, x: jax.Array, cache, *, lengths: Optional[jax.Array] = None,
              mask: Optional[Mask] = None, positions: Optional[jax.Array] = None):
    """The parallel forward over prompts x [B, T, d] -> (y, cache with their K/V)."""
    return self._residual(x, lambda h: self.attention.prefill(
        h, cache, lengths=lengths, mask=mask, positions=positions))

  def decode(self, x: jax.Array, cache):
    """New tokens x [B, Tq, d] at the cache's next positions -> (y, cache + them)."""
    return self._residual(x, lambda h: self.attention.decode(h, cache))
