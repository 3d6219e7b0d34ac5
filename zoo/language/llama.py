"""`llama_lm`: a decoder-only LM in the style of "LLaMA: Open and Efficient Foundation Language Models".

    h_0 = Embed(tokens)
    h_l = Block_l(h_{l-1})   (pre-norm RMSNorm, attention family of layer l, SwiGLU MLP)
    logits = Norm(h_L) . W_out      (W_out = Embed^T when embeddings are tied)

Positions come from the positional encoding inside each attention layer
(`model.positional`: rope, nope, alibi, bam, nope_hybrid); heads are GQA
when num_kv_heads < num_heads. The attention family is chosen per layer by id
(`model.attention`: one id, or a comma-separated pattern cycled over layers,
e.g. "mha,mha,mha,sliding" style patterns once more families are registered).
Packed batches pass `segment_ids` and per-document `positions`: tokens then
see only their own document.

GPT-2 ("Language Models are Unsupervised Multitask Learners") is the same
stack with `position_embedding="learned"` (a table added to the token
embeddings, `positional="nope"` inside attention), LayerNorm, biases and a
tanh-GELU MLP: h_0 = Embed(tokens) + P[positions].

Generation (zoo/generation): `init_cache(batch, capacity)` holds one KV cache per
layer; `prefill(tokens, cache, lengths=)` runs the parallel forward over
right-padded prompts and fills it; `decode_step(tokens, cache)` embeds the new
tokens at their positions L_b + t (the learned table too) and runs every
block's cached step. Both return float32 logits and the new cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.attention.positional import POSITIONAL
from layers.embeddings import Embed, PositionEmbed
from layers.linear import Linear
from layers.norms import make_norm
from zoo.model_config import attention_config, from_model_config, parse_dtype, transformer_blocks

@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  mlp_dim: int = 688
  mlp_kind: str = "swiglu"
  mlp_activation: Optional[str] = None  # overrides mlp_kind's activation (layers/mlp.py)
  use_bias: bool = False  # biases in the attention and MLP projections (GPT-2)
  position_embedding: Optional[str] = None  # "learned": absolute table of max_seq_len rows
  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  attention: str = "mha"
  positional: str = "rope"
  rope_base: float = 10_000.0
  rope_scaling: float = 1.0
  rope_scaling_type: str = "linear"
  rope_original_max_len: Optional[int] = None
  positional_schedule: Optional[str] = None  # nope_hybrid: "rope,rope,rope,nope" cycled over layers
  rope_window: Optional[int] = None  # nope_hybrid: sliding window of the RoPE layers
  window: Optional[int] = None
  tie_embeddings: bool = True
  max_seq_len: int = 2048
  dtype: str = "float32"
  param_dtype: str = "float32"
  implementation: str = "auto"
  remat: bool = False
  attention_options: Tuple[Tuple[str, object], ...] = ()

  def __post_init__(self):
    if self.position_embedding not in (None, "learned"):
      raise ValueError(f"model.position_embedding={self.position_embedding!r} is not one of "
                       "(None, 'learned')")

  @classmethod
  def from_config(cls, model_cfg) -> "LMConfig":
    """From the `config.model` ConfigDict; unknown fields are an error naming them."""
    return from_model_config(cls, model_cfg, model="llama_lm", required=("vocab_size",))

  def attention_config(self, layer: int) -> AttentionConfig:
    """Every layer shares the head layout; the family, and under positional="nope_hybrid" the
    encoding and window (`positional_schedule`, `rope_window`), may differ per layer."""
    if self.positional not in POSITIONAL:
      raise ValueError(
          f"unknown positional encoding {self.positional!r} (model.positional); "
          f"choose one of {sorted(POSITIONAL)}")
    return attention_config(
        self, layer, causal=True, rope_base=self.rope_base, rope_scaling=self.rope_scaling,
        rope_scaling_type=self.rope_scaling_type,
        rope_original_max_len=self.rope_original_max_len, window=self.window,
        positional_schedule=self.positional_schedule, rope_window=self.rope_window)


class DecoderLM(nnx.Module):

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = parse_dtype(cfg.dtype, "model.dtype")
    param_dtype = parse_dtype(cfg.param_dtype, "model.param_dtype")
    self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
    self.position_embed = (PositionEmbed(cfg.max_seq_len, cfg.d_model, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)
                           if cfg.position_embedding == "learned" else None)
    self.blocks = transformer_blocks(cfg, rngs)
    self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.head = None if cfg.tie_embeddings else Linear(
        cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)

  def embed_tokens(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """tokens [B, T] at positions [B, T] -> the first block's input [B, T, d_model]."""
    x = self.embed(tokens)
    return x if self.position_embed is None else x + self.position_embed(positions)

  def logits(self, x: jax.Array) -> jax.Array:
    """The last block's output [B, T, d_model] -> logits [B, T, vocab] in float32."""
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.head is None else self.head(x)
    return logits.astype(jnp.float32)

  def __call__(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    """tokens [B, T] int -> logits [B, T, vocab] in float32."""
    b, t = tokens.shape
    if t > self.cfg.max_seq_len:
      raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.cfg.max_seq_len}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = Mask(causal=True)
    if segment_ids is not None:
      mask = mask.with_segments(segment_ids, positions)
    x = self.embed_tokens(tokens, positions)
    for block in self.blocks:
      if self.cfg.remat:
        x = nnx.remat(lambda blk, h: blk(h, mask=mask, positions=positions))(block, x)
      else:
        x = block(x, mask=mask, positions=positions)
    return self.logits(x)

  # Generation ------------------------------------------------------------------
  def init_cache(self, batch: int, capacity: int, dtype=None) -> Tuple:
    """One empty KV cache per layer, `capacity` positions per sequence."""
    if capacity > self.cfg.max_seq_len:
      raise ValueError(f"a KV cache of {capacity} positions exceeds "
                       f"model.max_seq_len={self.cfg.max_seq_len}")
    return tuple(block.init_cache(batch, capacity, dtype) for block in self.blocks)

  def prefill(self, tokens: jax.Array, cache: Tuple, *,
              lengths: Optional[jax.Array] = None) -> Tuple[jax.Array, Tuple]:
    """Prompts tokens [B, T] (right-padded, lengths [B] real tokens; T by default)
    -> (logits [B, T, vocab] float32, the caches holding their K/V)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self.embed_tokens(tokens, positions)
    new_cache = []
    for block, c in zip(self.blocks, cache):
      x, c = block.prefill(x, c, lengths=lengths, mask=Mask(causal=True), positions=positions)
      new_cache.append(c)
    return self.logits(x), tuple(new_cache)

  def decode_step(self, tokens: jax.Array, cache: Tuple) -> Tuple[jax.Array, Tuple]:
    """New tokens [B, Tq] at positions L_b + t -> (logits [B, Tq, vocab] float32, caches)."""
    x = self.embed_tokens(tokens, cache[0].positions(tokens.shape[1]))
    new_cache = []
    for block, c in zip(self.blocks, cache):
      x, c = block.decode(x, c)
      new_cache.append(c)
    return self.logits(x), tuple(new_cache)

  def train_flops_per_token(self, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward), as in the PaLM paper's MFU:
    6 * N_matmul + sum over layers of 12 * Hq * Dh * T (score and value matmuls, causal
    not halved)."""
    cfg = self.cfg
    n = 0
    for path, p in nnx.iter_graph(self):
      if isinstance(p, nnx.Param) and len(p.shape) >= 2 and "embedding" not in path:
        n += math.prod(p.shape)
    if cfg.tie_embeddings:  # the tied table is a matmul at the head
      n += cfg.vocab_size * cfg.d_model
    # Each layer's own head layout: families such as `sqa` change the query heads.
    return 6.0 * n + sum(b.attention.train_flops_per_token(seq_len) for b in self.blocks)
