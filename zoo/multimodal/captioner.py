"""`captioner`: image-conditioned text decoders, two ways.

variant="cross": an encoder-decoder in the manner of "Show, Attend and Tell: Neural Image
Caption Generation with Visual Attention" (soft attention over image regions at every word)
and "HATFormer: Historic Handwritten Arabic Text Recognition with Transformers" (a ViT
encoder and a transformer text decoder with cross-attention):

    C   = ViT.encode(image)                  [B, N, d_img]   (optionally Resampler(C) -> [B, n, d])
    h_0 = Embed(text)
    h_l = CrossAttentionBlock_l(h_{l-1}, C)   causal self-attention, cross-attention to C, MLP
    logits = Norm(h_L) . Embed^T

variant="prefix": a decoder-only VLM in the PaliGemma style: the image tokens, projected to
the decoder's width, form a prefix the decoder attends to bidirectionally, the text after it
causally (a prefix-LM mask: `Mask.prefix_lm`); logits are read at the text positions.

    z   = [W_img C ; Embed(text)]            [B, N + L, d]
    h_l = Block_l(h_{l-1}),  mask: prefix (N image tokens) bidirectional, text causal

The vision encoder is the zoo's ViT (`model.image.*`, its tokens after the final norm, no
classifier); the decoder is Llama-style (RMSNorm, SwiGLU, RoPE over the whole sequence in
the prefix variant, over the text in the cross variant) with any registered causal
self-attention family (`model.attention`). `resampler_latents > 0` inserts a Perceiver
Resampler (Flamingo-style; layers/attention/perceiver_resampler.py) that compresses the
image tokens to that many latents first, in either variant. Text padding (`pad_id`) is
masked by the task's loss weights; real tokens never attend to padding that follows them
because attention is causal over the text.

Generation (zoo/generation): `init_cache(batch, capacity)` (capacity in text tokens),
`prefill(tokens, cache, images=, lengths=)` and `decode_step(tokens, cache)`, the
protocol of `DecoderLM`. The cross variant caches each layer's self-attention K/V
and its projection of the image tokens (`ContextKV`, computed once at prefill);
the prefix variant's cache holds the N image tokens then the text (positions
N + t), so a decode step is plain causal attention over it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention.config import AttentionConfig
from layers.attention.cross_attention import ContextKV
from layers.attention.masks import Mask
from layers.attention.perceiver_resampler import PerceiverResampler
from layers.cross_block import CrossAttentionBlock
from layers.embeddings import Embed
from layers.linear import Linear
from layers.norms import make_norm
from zoo.model_config import (attention_config, from_model_config, parse_dtype, parse_pattern,
                               transformer_blocks)
from zoo.vision.vit import ViT, ViTConfig

VARIANTS = ("cross", "prefix")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CaptionerCache:
  """Per layer: the self-attention's KV cache and (cross variant, after prefill) the image
  tokens' K/V; `context` is None in the prefix variant and before prefill."""

  layers: Tuple
  context: Optional[Tuple[ContextKV, ...]] = None


@dataclasses.dataclass(frozen=True)
class CaptionerConfig:
  vocab_size: Optional[int] = None  # the loop fills it from the captions' tokenizer
  variant: str = "cross"  # cross (encoder-decoder) | prefix (PaliGemma-style prefix LM)
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  mlp_dim: int = 344
  mlp_kind: str = "swiglu"
  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  attention: str = "mha"  # the decoder's self-attention family (or a per-layer pattern)
  positional: str = "rope"
  max_seq_len: int = 512
  resampler_latents: int = 0  # > 0: a Perceiver Resampler to this many latents
  resampler_layers: int = 2
  pad_id: int = 0
  dtype: str = "float32"
  param_dtype: str = "float32"
  implementation: str = "auto"
  image: Tuple[Tuple[str, object], ...] = ()  # ViT fields (zoo/vision/vit.py)

  @classmethod
  def from_config(cls, model_cfg) -> "CaptionerConfig":
    return from_model_config(cls, model_cfg, model="captioner", required=("vocab_size",))

  def __post_init__(self):
    object.__setattr__(self, "image", tuple(sorted(dict(self.image or {}).items())))
    if self.variant not in VARIANTS:
      raise ValueError(f"model.variant={self.variant!r} is not one of {VARIANTS}")
    if self.resampler_latents < 0 or self.resampler_layers < 1:
      raise ValueError(f"model.resampler_latents={self.resampler_latents} must be >= 0 and "
                       f"model.resampler_layers={self.resampler_layers} >= 1")

  def image_config(self) -> ViTConfig:
    try:
      return ViTConfig.from_config(dict(self.image, num_classes=0))
    except ValueError as e:
      msg = str(e).replace("model.", "model.image.").replace("model:", "model.image:")
      raise ValueError(msg) from None

  def attention_config(self, layer: int, *, causal: bool = True) -> AttentionConfig:
    return attention_config(self, layer, causal=causal)


class Captioner(nnx.Module):
  """(images [B, H, W, C], text [B, L]) -> next-token logits [B, L, vocab] (float32)."""

  def __init__(self, cfg: CaptionerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = parse_dtype(cfg.dtype, "model.dtype")
    param_dtype = parse_dtype(cfg.param_dtype, "model.param_dtype")
    families = parse_pattern(cfg.attention, cfg.num_layers)
    self.encoder = ViT(cfg.image_config(), rngs=rngs)
    d_img = self.encoder.cfg.d_model
    if not cfg.resampler_latents:
      self.resampler = None
    else:
      self.resampler = PerceiverResampler(
          dataclasses.replace(cfg.attention_config(0, causal=False), positional="nope",
                              d_model=d_img, num_heads=self.encoder.cfg.num_heads,
                              num_kv_heads=None, head_dim=None),
          num_latents=cfg.resampler_latents, num_layers=cfg.resampler_layers, rngs=rngs)
    self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
    if cfg.variant == "cross":
      self.image_proj = None  # the cross-attention projects the image tokens itself
      self.blocks = nnx.List([
          CrossAttentionBlock(attention=families[l], attn_cfg=cfg.attention_config(l),
                              mlp_dim=cfg.mlp_dim, d_context=d_img, mlp_kind=cfg.mlp_kind,
                              norm=cfg.norm, norm_eps=cfg.norm_eps, rngs=rngs)
          for l in range(cfg.num_layers)])
    else:
      self.image_proj = Linear(d_img, cfg.d_model, axes=(None, "embed"), use_bias=True,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      self.blocks = transformer_blocks(cfg, rngs)
    self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)

  def image_tokens(self, images: jax.Array) -> jax.Array:
    """images -> the context the decoder reads: [B, N, d_img] (or [B, latents, d_img])."""
    c = self.encoder.encode(images)
    return c if self.resampler is None else self.resampler(c)

  def __call__(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    b, t = tokens.shape
    c = self.image_tokens(images)
    if self.cfg.variant == "cross":
      if t > self.cfg.max_seq_len:
        raise ValueError(f"text length {t} exceeds model.max_seq_len={self.cfg.max_seq_len}")
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      x = self.embed(tokens)
      for block in self.blocks:
        x = block(x, c, mask=Mask(causal=True), positions=positions)
    else:
      n = c.shape[1]
      if n + t > self.cfg.max_seq_len:
        raise ValueError(f"{n} image tokens + text length {t} exceed "
                         f"model.max_seq_len={self.cfg.max_seq_len}")
      text = self.embed(tokens)
      x = jnp.concatenate([self.image_proj(c).astype(text.dtype), text], axis=1)
      positions = jnp.broadcast_to(jnp.arange(n + t, dtype=jnp.int32), (b, n + t))
      mask = Mask.prefix_lm(jnp.full((b,), n, jnp.int32))
      for block in self.blocks:
        x = block(x, mask=mask, positions=positions)
      x = x[:, n:]
    return self.logits(x)

  def logits(self, x: jax.Array) -> jax.Array:
    """The last block's output at the text positions -> logits [B, T, vocab] in float32."""
    return self.embed.attend(self.final_norm(x)).astype(jnp.float32)

  # Generation ------------------------------------------------------------------
  def num_context_tokens(self) -> int:
    """The image tokens the decoder reads (after the resampler, if any)."""
    return self.cfg.resampler_latents or self.encoder.cfg.token_counts()[-1][1]

  def init_cache(self, batch: int, capacity: int, dtype=None) -> CaptionerCache:
    """Empty caches for `capacity` text tokens per caption (the prefix variant adds room for
    the image tokens in front)."""
    n = self.num_context_tokens() if self.cfg.variant == "prefix" else 0
    if n + capacity > self.cfg.max_seq_len:
      what = f"{n} image tokens + " if n else ""
      raise ValueError(f"{what}a KV cache of {capacity} text positions exceed "
                       f"model.max_seq_len={self.cfg.max_seq_len}")
    return CaptionerCache(tuple(block.init_cache(batch, n + capacity, dtype)
                                for block in self.blocks))

  def prefill(self, tokens: jax.Array, cache: CaptionerCache, *, images: jax.Array,
              lengths: Optional[jax.Array] = None) -> Tuple[jax.Array, CaptionerCache]:
    """Prompts tokens [B, T] (right-padded; lengths [B] real tokens, T by default) for
    `images` -> (logits [B, T, vocab] float32 at the text positions, the filled caches)."""
    b, t = tokens.shape
    c = self.image_tokens(images)
    x = self.embed(tokens)
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths
    new_layers = []
    if self.cfg.variant == "cross":
      context = tuple(block.context_kv(c) for block in self.blocks)
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      for block, layer_cache, kv in zip(self.blocks, cache.layers, context):
        x, layer_cache = block.prefill(x, layer_cache, kv=kv, lengths=lengths,
                                       mask=Mask(causal=True), positions=positions)
        new_layers.append(layer_cache)
      return self.logits(x), CaptionerCache(tuple(new_layers), context)
    n = c.shape[1]
    x = jnp.concatenate([self.image_proj(c).astype(x.dtype), x], axis=1)
    positions = jnp.broadcast_to(jnp.arange(n + t, dtype=jnp.int32), (b, n + t))
    mask = Mask.prefix_lm(jnp.full((b,), n, jnp.int32))
    for block, layer_cache in zip(self.blocks, cache.layers):
      x, layer_cache = block.prefill(x, layer_cache, lengths=n + lengths, mask=mask,
                                     positions=positions)
      new_layers.append(layer_cache)
    return self.logits(x[:, n:]), CaptionerCache(tuple(new_layers))

  def decode_step(self, tokens: jax.Array, cache: CaptionerCache
                  ) -> Tuple[jax.Array, CaptionerCache]:
    """New text tokens [B, Tq] at the caches' next positions -> (logits [B, Tq, vocab], caches)."""
    if self.cfg.variant == "cross" and cache.context is None:
      raise ValueError("the cross captioner's cache holds no image context yet; call prefill "
                       "(with the images) before decode_step")
    x = self.embed(tokens)
    new_layers = []
    for l, (block, layer_cache) in enumerate(zip(self.blocks, cache.layers)):
      if self.cfg.variant == "cross":
        x, layer_cache = block.decode(x, layer_cache, kv=cache.context[l])
      else:
        x, layer_cache = block.decode(x, layer_cache)
      new_layers.append(layer_cache)
    return self.logits(x), CaptionerCache(tuple(new_layers), cache.context)

  def train_flops_per_example(self, text_len: int) -> float:
    """The encoder's per-example FLOPs + 6 x decoder matmul parameters x the tokens they act
    on + the decoder's attention score/value FLOPs (cross: over the image tokens)."""
    cfg = self.cfg
    n_img = self.encoder.cfg.token_counts()[-1][1]
    n_ctx = cfg.resampler_latents or n_img
    seq = text_len + (n_ctx if cfg.variant == "prefix" else 0)
    n = 0
    for path, p in nnx.iter_graph(self.blocks):
      if isinstance(p, nnx.Param) and len(p.shape) >= 2:
        n += math.prod(p.shape)
    flops = self.encoder.train_flops_per_example() + 6.0 * (n + cfg.vocab_size * cfg.d_model) * seq
    for block in self.blocks:
      flops += seq * block.attention.train_flops_per_token(seq)
      if cfg.variant == "cross":
        flops += text_len * block.cross_attention.train_flops_per_token(n_ctx)
    return flops


def build(model_cfg, rngs: nnx.Rngs) -> Captioner:
  return Captioner(CaptionerConfig.from_config(model_cfg), rngs=rngs)
