"""`modernbert`: a bidirectional text encoder in the style of "Smarter, Better, Faster, Longer:
A Modern Bidirectional Encoder for Fast, Memory Efficient, and Long Context Finetuning and
Inference" (ModernBERT), trained with masked language modelling.

    h_0 = Norm(Embed(tokens))
    h_l = Block_l(h_{l-1})      pre-norm, bidirectional attention, GeGLU MLP
    x   = Norm(h_L)                                   (features: `encode`)
    logits = Norm(GELU(x W_h)) . Embed^T + b          (the MLM head)

Layer l attends globally when l % global_every == 0 and otherwise within a
local window of `local_window` tokens centred on the query: key j is visible
from query i when |i - j| <= local_window // 2 (ModernBERT: every third layer
global, windows of 128, i.e. 64 each side; the Hugging Face implementation
masks |i - j| > local_attention // 2, the same rule); RoPE uses base
`rope_base` (160k) in global layers and `local_rope_base` (10k) in local
ones. Batches are unpadded the way the paper's are: several documents packed
per row with segment ids, each token seeing only its own document, and
per-document positions.

What the paper states and what is standard here: alternating global/local
attention, RoPE, GeGLU, packed ("unpadded") batches and the 30% masking rate
are ModernBERT's; pre-norm LayerNorm, the embedding norm and the
Dense-GELU-Norm prediction head follow its released architecture, and so does
the first block, whose attention norm is the identity since the embeddings are
already normalised (`first_attn_norm=False`). Two differences from the released
checkpoints: our LayerNorms always carry a bias (ModernBERT's have none; zero
biases are the same function), and the GeGLU's GELU is the tanh form by default
(layers/mlp.py) where ModernBERT's is exact (`mlp_activation="gelu_exact"`, which
zoo/hub/modernbert.py sets). The sequence vector for retrieval/contrastive use is the mean
over real tokens (`pool`), or the first token's features (`pool="first"`, a
[CLS] slot); "last", "argmax" and "eos" (below) read one position too, the last
two chosen from the token ids (`pool(features, tokens=...)`).

Other encoders are the same stack with these knobs (all default to ModernBERT):

  * BERT ("BERT: Pre-training of Deep Bidirectional Transformers"):
    `norm_position="post"` (h = Norm(x + Attn(x)), y = Norm(h + MLP(h))),
    `final_norm=False` (the last block already ends in a norm),
    `position_embedding="learned"` (a table of `max_seq_len` rows added to the
    token embeddings, with `positional="nope"` inside attention),
    `type_vocab_size=2` (segment A/B embeddings, also added; `token_type_ids`
    None means all zeros), `mlp_kind="gelu"` with `mlp_activation="gelu_exact"`,
    `use_bias=True` (attention and MLP projections), `head_bias=True` (the
    MLM head's dense layer), `head_activation` (the head's activation,
    "gelu_exact"; BERT uses its `hidden_act` there too).
  * CLIP's text tower ("Learning Transferable Visual Models From Natural
    Language Supervision"): `causal=True`, learned positions,
    `embed_norm=False`, pre-norm with a final norm, quick-GELU MLP, biases,
    no MLM head, pooled at the end-of-text token: `pool="argmax"` (the
    position of the largest token id in each row, Hugging Face CLIP's rule
    when eos_token_id == 2) or `pool="eos"` with `eos_id` (its first
    occurrence, the newer rule).
  * SigLIP's text tower ("Sigmoid Loss for Language Image Pre-Training"): as
    CLIP's but bidirectional, tanh-GELU, `pool="last"` (the last position:
    SigLIP pads to a fixed length and reads the final slot).

`first_attn_norm` None (the default) resolves to False under pre-norm and to
True under post-norm, where every block's norms follow its sublayers.
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
from layers.block import NORM_POSITIONS
from layers.embeddings import Embed, PositionEmbed
from layers.linear import Linear
from layers.mlp import ACTIVATIONS, MLP_KINDS
from layers.norms import make_norm
from zoo.model_config import attention_config, from_model_config, parse_dtype, transformer_blocks

POOLS = ("mean", "first", "last", "argmax", "eos")


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
  mlp_activation: Optional[str] = None  # overrides mlp_kind's activation (layers/mlp.py)
  use_bias: bool = False  # biases in the attention and MLP projections (BERT, CLIP)
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  norm_position: str = "pre"  # pre | post (BERT)
  first_attn_norm: Optional[bool] = None  # None: False under pre-norm (ModernBERT), True under post
  embed_norm: bool = True  # a norm on the embeddings (ModernBERT, BERT; not CLIP)
  final_norm: bool = True  # a norm after the last block (not BERT: post-norm ends in one)
  position_embedding: Optional[str] = None  # "learned": a table of max_seq_len rows, added
  type_vocab_size: int = 0  # > 0: BERT's token-type (segment) embeddings, added
  causal: bool = False  # CLIP's text tower
  attention: str = "mha"
  positional: str = "rope"
  rope_base: float = 160_000.0  # global layers
  local_rope_base: float = 10_000.0  # local layers
  global_every: int = 3
  local_window: int = 128  # tokens a local layer sees around each query (half each side)
  max_seq_len: int = 8192
  pool: str = "mean"  # mean | first | last | argmax | eos
  eos_id: Optional[int] = None  # pool="eos": the end-of-text token id
  mlm_head: bool = True  # False for a tower (CLIP's text encoder): no prediction head
  head_bias: bool = False  # bias of the MLM head's dense layer (BERT)
  head_activation: str = "gelu_exact"  # activation of the MLM head (layers/mlp.py names)
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
    if self.pool == "eos" and self.eos_id is None:
      raise ValueError("model.pool='eos' needs model.eos_id (the end-of-text token id)")
    if self.norm_position not in NORM_POSITIONS:
      raise ValueError(f"model.norm_position={self.norm_position!r} is not one of "
                       f"{NORM_POSITIONS}")
    if self.first_attn_norm is None:
      object.__setattr__(self, "first_attn_norm", self.norm_position == "post")
    if not self.first_attn_norm and self.norm_position == "post":
      raise ValueError("model.first_attn_norm=False (no norm before layer 0's attention) needs "
                       "model.norm_position='pre'")
    if self.position_embedding not in (None, "learned"):
      raise ValueError(f"model.position_embedding={self.position_embedding!r} is not one of "
                       "(None, 'learned')")
    if self.type_vocab_size < 0:
      raise ValueError(f"model.type_vocab_size={self.type_vocab_size} must be >= 0")
    if self.head_activation not in ACTIVATIONS:
      raise ValueError(f"model.head_activation={self.head_activation!r} is not one of "
                       f"{sorted(ACTIVATIONS)}")

  def activation(self) -> str:
    """The MLP's activation: `mlp_activation`, or `mlp_kind`'s own (layers/mlp.py)."""
    return self.mlp_activation or MLP_KINDS.get(self.mlp_kind, (self.mlp_kind,))[0]

  def is_global(self, layer: int) -> bool:
    return layer % self.global_every == 0

  def attention_config(self, layer: int) -> AttentionConfig:
    glob = self.is_global(layer)
    half = self.local_window // 2
    return attention_config(self, layer, causal=self.causal,
                            rope_base=self.rope_base if glob else self.local_rope_base,
                            window=None if glob else (half, half))


class TextEncoder(nnx.Module):
  """Bidirectional (or causal) encoder; `__call__` gives MLM logits, `encode` features, `pool` a
  vector."""

  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = parse_dtype(cfg.dtype, "model.dtype")
    param_dtype = parse_dtype(cfg.param_dtype, "model.param_dtype")
    self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
    self.position_embed = (PositionEmbed(cfg.max_seq_len, cfg.d_model, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)
                           if cfg.position_embedding == "learned" else None)
    self.type_embed = (PositionEmbed(cfg.type_vocab_size, cfg.d_model, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
                       if cfg.type_vocab_size else None)
    self.embed_norm = (make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
                       if cfg.embed_norm else None)
    self.blocks = transformer_blocks(cfg, rngs)
    self.final_norm = (make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
                       if cfg.final_norm else None)
    if not cfg.mlm_head:
      self.head_dense = self.head_norm = self.head_bias = None
    else:
      self.head_dense = Linear(cfg.d_model, cfg.d_model, axes=("embed", "mlp"),
                               use_bias=cfg.head_bias, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
      self.head_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps,
                                 param_dtype=param_dtype)
      # The decoder's bias over the vocabulary (the head_bias *field* is the dense layer's).
      self.head_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), param_dtype),
                                 logical_axes=("vocab",))

  @property
  def mask_token_id(self) -> int:
    """[MASK] is the last id: the loop sizes the vocabulary as the data's plus one."""
    return self.cfg.vocab_size - 1

  def embed_tokens(self, tokens: jax.Array, positions: jax.Array,
                   token_type_ids: Optional[jax.Array] = None) -> jax.Array:
    """tokens [B, T] at positions [B, T] -> the first block's input [B, T, d_model]."""
    x = self.embed(tokens)
    if self.position_embed is not None:
      x = x + self.position_embed(positions)
    if self.type_embed is not None:
      types = jnp.zeros_like(tokens) if token_type_ids is None else token_type_ids
      x = x + self.type_embed(types)
    elif token_type_ids is not None:
      raise ValueError("token_type_ids given but model.type_vocab_size=0 (no token-type table)")
    return x if self.embed_norm is None else self.embed_norm(x)

  def encode(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
             positions: Optional[jax.Array] = None,
             token_type_ids: Optional[jax.Array] = None) -> jax.Array:
    """tokens [B, T] -> features [B, T, d_model] (after the final norm, if any)."""
    b, t = tokens.shape
    if t > self.cfg.max_seq_len:
      raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.cfg.max_seq_len}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = Mask(causal=self.cfg.causal)
    if segment_ids is not None:
      mask = mask.with_segments(segment_ids, positions)
    x = self.embed_tokens(tokens, positions, token_type_ids)
    for block in self.blocks:
      if self.cfg.remat:
        x = nnx.remat(lambda blk, h: blk(h, mask=mask, positions=positions))(block, x)
      else:
        x = block(x, mask=mask, positions=positions)
    return x if self.final_norm is None else self.final_norm(x)

  def __call__(self, tokens: jax.Array, *, segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None,
               token_type_ids: Optional[jax.Array] = None) -> jax.Array:
    """tokens [B, T] -> MLM logits [B, T, vocab] (float32)."""
    if self.head_dense is None:
      raise ValueError("this encoder was built with model.mlm_head=False (a tower): use encode/pool")
    x = self.encode(tokens, segment_ids=segment_ids, positions=positions,
                    token_type_ids=token_type_ids)
    h = self.head_norm(ACTIVATIONS[self.cfg.head_activation](self.head_dense(x)))
    logits = self.embed.attend(h).astype(jnp.float32)
    return logits + self.head_bias[...].astype(jnp.float32)

  def pool(self, features: jax.Array, valid: Optional[jax.Array] = None,
           tokens: Optional[jax.Array] = None) -> jax.Array:
    """features [B, T, d], valid [B, T] bool (real tokens), tokens [B, T] (needed by
    pool="argmax" and "eos") -> [B, d]."""
    kind = self.cfg.pool
    if kind == "first":
      return features[:, 0]
    if kind == "last":
      return features[:, -1]
    if kind in ("argmax", "eos"):
      if tokens is None:
        raise ValueError(f"model.pool={kind!r} picks a position from the token ids: pass tokens")
      # argmax returns the first maximum, so "eos" finds the first occurrence of eos_id.
      where = (jnp.argmax(tokens, axis=-1) if kind == "argmax"
               else jnp.argmax(tokens == self.cfg.eos_id, axis=-1))
      return jnp.take_along_axis(features, where[:, None, None], axis=1)[:, 0]
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
