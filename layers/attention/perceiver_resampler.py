"""`perceiver_resampler`: N learned latents read a variable-length input, giving N tokens.

Named in "User-LLM: Efficient LLM Contextualization with User Embeddings"
("Perceiver layers") and "MotionRAG: Motion Retrieval-Augmented Image-to-Video
Generation" ("specialized resamplers"); neither seed gives the mechanism. This
is the standard formulation, the Perceiver Resampler of "Flamingo: a Visual
Language Model for Few-Shot Learning" (its Fig. 4 pseudo-code), with the
norms of its open re-implementations (open_flamingo / lucidrains'
flamingo-pytorch): latents L in R^{N x d} (learned, shared over the batch),
inputs x [B, T, d] (optionally x W_in from d_input, plus a learned position
embedding E_t if `num_positions`; none by default):

    L_0 = L
    per layer i:
      Z   = concat[LN_l(L_i); LN_x(x)]                     [B, N + T, d]
      L_i = L_i + W_O softmax(Q K^T / sqrt(D) + pad) V     Q = LN_l(L_i) W_Q, K = Z W_K, V = Z W_V
      L_i = L_i + FFN(LN_f(L_i))                           FFN = W_2 GELU(W_1 .), width mlp_dim
    y = LN_out(L_num_layers)                               [B, N, d]   (final_norm=True)

so the latents attend to the inputs and to themselves (Flamingo: "keys and
values ... concatenated with the learned latents"). The output has N tokens
whatever T is. The keys are ordered [latents; inputs] rather than Flamingo's
[inputs; latents]: softmax attention without positions is invariant to the
order of its keys, and latents first keep input padding a length
(context_lengths = N + lengths). Padded inputs (`lengths` [B] and/or boolean
`mask` [B, T], True = real) are invisible; an example with no real input
still has the N latents as keys, so its output is defined (the latents
attending to themselves). Without position embeddings the output is invariant
to any permutation of the input tokens.

Attention runs through `layers.attention.cross_attention.CrossAttention`
(GQA head layout from the AttentionConfig; `cross_attention` ->
`pallas_kernels.flash_attention`, not causal, padding as kv_lengths / segment
ids; cfg.implementation="reference" runs the plain-jnp reference).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from layers import pooling
from layers.attention.config import AttentionConfig
from layers.attention.cross_attention import CrossAttention, check_context_padding
from layers.linear import Linear
from layers.mlp import MLP
from layers.norms import make_norm


class ResamplerLayer(nnx.Module):
  """One resampler layer: latents += CrossAttn(LN_l(L), [LN_l(L); LN_x(x)]); L += FFN(LN_f(L))."""

  def __init__(self, cfg: AttentionConfig, *, mlp_dim: int, mlp_kind: str, norm: str,
               norm_eps: float, rngs: nnx.Rngs):
    d = cfg.d_model
    self.latent_norm = make_norm(norm, d, eps=norm_eps, param_dtype=cfg.param_dtype)
    self.input_norm = make_norm(norm, d, eps=norm_eps, param_dtype=cfg.param_dtype)
    self.attention = CrossAttention(cfg, rngs=rngs)
    self.mlp_norm = make_norm(norm, d, eps=norm_eps, param_dtype=cfg.param_dtype)
    self.mlp = MLP(d, mlp_dim, kind=mlp_kind, use_bias=cfg.use_bias, dtype=cfg.dtype,
                   param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, latents: jax.Array, x: jax.Array, context_lengths: Optional[jax.Array],
               context_mask: Optional[jax.Array]) -> jax.Array:
    q_in = self.latent_norm(latents)
    context = jnp.concatenate([q_in, self.input_norm(x).astype(q_in.dtype)], axis=1)
    latents = latents + self.attention(q_in, context, context_lengths=context_lengths,
                                       context_mask=context_mask)
    return latents + self.mlp(self.mlp_norm(latents))


class PerceiverResampler(nnx.Module):
  """x [B, T, d_input] (any T) -> [B, num_latents, d_model] (equations in the module docstring).

  cfg: d_model (the latent width) and the attention head layout / implementation / dtypes.
  Options: num_latents (N), num_layers, mlp_dim (default 4 d_model), mlp_kind ("gelu", as
  Flamingo), d_input (input width; a projection W_in when it differs from d_model),
  num_positions (a learned position embedding over input index t < num_positions; None: no
  positions, permutation-invariant), norm ("layernorm"), final_norm.
  Parameters: latents [N, d] ("latents", "embed"), per layer norms, W_Q/W_K/W_V/W_O, FFN.
  """

  def __init__(self, cfg: AttentionConfig, *, num_latents: int = 64, num_layers: int = 2,
               mlp_dim: Optional[int] = None, mlp_kind: str = "gelu",
               d_input: Optional[int] = None, num_positions: Optional[int] = None,
               norm: str = "layernorm", norm_eps: float = 1e-5, final_norm: bool = True,
               rngs: nnx.Rngs):
    d = cfg.d_model
    pooling.check_positive("num_latents", num_latents)
    pooling.check_positive("num_layers", num_layers)
    mlp_dim = 4 * d if mlp_dim is None else pooling.check_positive("mlp_dim", mlp_dim)
    d_input = d if d_input is None else pooling.check_positive("d_input", d_input)
    if num_positions is not None:
      pooling.check_positive("num_positions", num_positions)
    self.cfg, self.num_latents, self.d_input = cfg, num_latents, d_input
    self.num_positions = num_positions
    self.latents = nnx.Param(jax.random.normal(rngs.params(), (num_latents, d), cfg.param_dtype),
                             logical_axes=("latents", "embed"))
    self.input_proj = (None if d_input == d else
                       Linear(d_input, d, axes=(None, "embed"), use_bias=cfg.use_bias,
                              dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs))
    self.position_embedding = (
        None if num_positions is None else
        nnx.Param(0.02 * jax.random.normal(rngs.params(), (num_positions, d), cfg.param_dtype),
                  logical_axes=(None, "embed")))
    self.layers = nnx.List([
        ResamplerLayer(cfg, mlp_dim=mlp_dim, mlp_kind=mlp_kind, norm=norm, norm_eps=norm_eps,
                       rngs=rngs) for _ in range(num_layers)])
    self.final_norm = (make_norm(norm, d, eps=norm_eps, param_dtype=cfg.param_dtype)
                       if final_norm else None)

  def __call__(self, x: jax.Array, *, lengths: Optional[jax.Array] = None,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """x [B, T, d_input]; lengths [B] (inputs 0..len-1 real) and/or mask [B, T] (True = real)
    -> [B, num_latents, d_model]."""
    if x.ndim != 3 or x.shape[-1] != self.d_input:
      raise ValueError(f"x must be [batch, tokens, d_input={self.d_input}], got {tuple(x.shape)}")
    b, t = x.shape[:2]
    if t == 0:
      raise ValueError("x has no tokens (T = 0)")
    check_context_padding(lengths, mask, b, t, names=("lengths", "mask", "tokens"))
    if self.num_positions is not None and t > self.num_positions:
      raise ValueError(f"x has {t} tokens, more than num_positions={self.num_positions}")
    cfg, n = self.cfg, self.num_latents
    x = x.astype(cfg.dtype)
    if self.input_proj is not None:
      x = self.input_proj(x)
    if self.position_embedding is not None:
      x = x + self.position_embedding[...][:t].astype(x.dtype)
    # Keys are [latents; inputs]: the latents are always real, the input padding stays a length.
    context_lengths = None if lengths is None else lengths.astype(jnp.int32) + n
    context_mask = None if mask is None else jnp.concatenate(
        [jnp.ones((b, n), bool), mask], axis=1)
    latents = jnp.broadcast_to(self.latents[...].astype(cfg.dtype)[None], (b, n, cfg.d_model))
    for layer in self.layers:
      latents = layer(latents, x, context_lengths, context_mask)
    return latents if self.final_norm is None else self.final_norm(latents)
