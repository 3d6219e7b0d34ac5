"""`modernbert`: a bidirectional text encoder in the style of "Smarter, Better, Faster, Longer:
A Modern Bidirectional Encoder for Fast, Memory Efficient, and Long Context Finetuning and
Inference" (ModernBERT), trained with masked language modelling.

    h_0 = Norm(Embed(tokens))
    h_l = Block_l(h_{l-1})      pre-norm, bidirectional attention, GeGLU MLP
    x   = Norm(h_L)                                   (features: `encode`)
    logits = Norm(GELU(x W_h)) . Embed^T + b          (the MLM head)

Layer l attends globally when l % global_every == 0 and otherwise within a
local window of `local_window` tokens centred on the query (ModernBERT: every
third layer global, windows of 128, i.e. 64 each side); RoPE uses base
`rope_base` (160k) in global layers and `local_rope_base` (10k) in local
ones. Batches are unpadded the way the paper's are: several documents packed
per row with segment ids, each token seeing only its own document, and
per-document positions.

What the paper states and what is standard here: alternating global/local
attention, RoPE, GeGLU, packed ("unpadded") batches and the 30% masking rate
are ModernBERT's; pre-norm LayerNorm without bias, the embedding norm and the
Dense-GELU-Norm prediction head follow its released architecture. One
simplification: the first block keeps its attention norm (ModernBERT makes it
the identity since the embeddings are already normalised). The sequence
vector for retrieval/contrastive use is the mean over real tokens (`pool`),
or the first token's features (`pool="first"`, a [CLS] slot).
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
from layers.embeddings import Embed
from layers.linear import Linear
from layers.norms import make_norm
from zoo.model_config import attention_config, from_model_config, parse_dtype, transformer_blocks

POOLS = ("mean", "first")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  vocab_size: Optional[int] = None  # the loop fills it: data vocabulary + 1 ([MASK])
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  mlp_dim: int = 512
  mlp_kind: str = "geglu"
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  attention: str = "mha"
  positional: str = "rope"
  rope_base: float = 160_000.0  # global layers
  local_rope_base: float = 10_000.0  # local layers
  global_every: int = 3
  local_window: int = 128  # tokens a local layer sees around each query (half each side)
  max_seq_len: int = 8192
  pool: str = "mean"
  mlm_head: bool = True  # False for a tower (CLIP's text encoder): no prediction head
  dtype: str = "float32"
  param_dtype: str = "float32"
  implementation: str = "auto"
  remat: bool = False
  attention_options: Tuple[Tuple[str, object], ...] = ()

  @classmethod
  def from_config(cls, model_cfg) -> "EncoderConfig":
    return from_model_config(cls, model_cfg, model="modernbert", required=("vocab_size",))

  def __post_init__(self):
    if self.global_every < 1:
      raise ValueError(f"model.global_every={self.global_every} must be >= 1")
    if self.local_window < 2:
      raise ValueError(f"model.local_window={self.local_window} must be >= 2")
    if self.pool not in POOLS:
      raise ValueError(f"model.pool={self.pool!r} is not one of {POOLS}")

  def is_global(self, layer: int) -> bool:
    return layer % self.global_every == 0

  def attention_config(self, layer: int) -> AttentionConfig:
    glob = self.is_global(layer)
    half = self.local_window // 2
    return attention_config(self, layer, causal=False,
                            rope_base=self.rope_base if glob else self.local_rope_base,
                            window=None if glob else (half, half))


class TextEncoder(nnx.Module):
  """Bidirectional encoder; `__call__` gives MLM logits, `encode` features, `pool` a vector."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = parse_dtype(cfg.dtype, "model.dtype")
    param_dtype = parse_dtype(cfg.param_dtype, "model.param_dtype")
    self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
    self.embed_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.blocks = transformer_blocks(cfg, rngs)
    self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
    if not cfg.mlm_head:
      self.head_dense = self.head_norm = self.head_bias = None
    else:
      self.head_dense = Linear(cfg.d_model, cfg.d_model, axes=("embed", "mlp"), dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
      self.head_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps,
                                 param_dtype=param_dtype)
      self.head_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), param_dtype),
                                 logical_axes=("vocab",))

  @property
  def mask_token_id(self) -> int:
    """[MASK] is the last id: the loop sizes the vocabulary as the data's plus one."""
    return self.cfg.vocab_size - 1

  def encode(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
             positions: Optional[jax.Array] = None) -> jax.Array:
    """tokens [B, T] -> features [B, T, d_model] (after the final norm)."""
    b, t = tokens.shape
    if t > self.cfg.max_seq_len:
      raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.cfg.max_seq_len}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = Mask(causal=False)
    if segment_ids is not None:
      mask = mask.with_segments(segment_ids, positions)
    x = self.embed_norm(self.embed(tokens))
    for block in self.blocks:
      if self.cfg.remat:
        x = nnx.remat(lambda blk, h: blk(h, mask=mask, positions=positions))(block, x)
      else:
        x = block(x, mask=mask, positions=positions)
    return self.final_norm(x)

  def __call__(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    """tokens [B, T] -> MLM logits [B, T, vocab] (float32)."""
    if self.head_dense is None:
      raise ValueError("this encoder was built with model.mlm_head=False (a tower): use encode/pool")
    x = self.encode(tokens, segment_ids=segment_ids, positions=positions)
    h = self.head_norm(jax.nn.gelu(self.head_dense(x), approximate=False))
    logits = self.embed.attend(h).astype(jnp.float32)
    return logits + self.head_bias[...].astype(jnp.float32)

  def pool(self, features: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """features [B, T, d], valid [B, T] bool (real tokens) -> [B, d]."""
    if self.cfg.pool == "first":
      return features[:, 0]
    if valid is None:
      return jnp.mean(features, axis=1)
    w = valid.astype(features.dtype)[..., None]
    return jnp.sum(features * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)

  def train_flops_per_token(self, seq_len: int) -> float:
    """6 x matmul parameters (the tied decoder counted) + each layer's score/value FLOPs."""
    n = 0
    for path, p in nnx.iter_graph(self):
      if isinstance(p, nnx.Param) and len(p.shape) >= 2 and "embedding" not in path:
        n += math.prod(p.shape)
    if self.cfg.mlm_head:
      n += self.cfg.vocab_size * self.cfg.d_model  # the tied decoder
    return 6.0 * n + sum(
        blk.attention.train_flops_per_token(
            seq_len if self.cfg.is_global(l) else min(seq_len, self.cfg.local_window))
        for l, blk in enumerate(self.blocks))


def build(model_cfg, rngs: nnx.Rngs) -> TextEncoder:
  return TextEncoder(EncoderConfig.from_config(model_cfg), rngs=rngs)
