"""`clip`: a dual encoder trained contrastively, as in "Learning Transferable Visual Models From
Natural Language Supervision" (CLIP), with the sigmoid loss of "Sigmoid Loss for Language
Image Pre-Training" (SigLIP) as an option.

    u_i = normalize(W_img . ImagePool(ViT(image_i)))        [embed_dim]
    v_j = normalize(W_txt . TextPool(Encoder(text_j)))      [embed_dim]
    z_ij = t * u_i . v_j  (+ b with the sigmoid loss),  t = exp(log_t) learned (and b)

    softmax (CLIP, InfoNCE):  L = 1/2 [CE_rows(z, diag) + CE_cols(z, diag)], averaged over i
    sigmoid (SigLIP):          L = -1/|B| sum_i sum_j log sigmoid(y_ij z_ij),  y = 2 I - 1

The image tower is the zoo's ViT (`model.image.*`: any of its fields; no
classifier, its pooled vector), the text tower the zoo's encoder (`model.text.*`;
by default ModernBERT-style: bidirectional, mean over real tokens, no MLM head;
its knobs also give CLIP's causal tower pooled at the end token and SigLIP's
pooled at the last position). Initial temperature t: 1/0.07 for softmax (CLIP),
10 for sigmoid with bias -10 (SigLIP). Zero-shot classification embeds one
prompt per class ("a photo of a {name}." by default) and takes the nearest.

Knobs for the released models (zoo/hub/clip.py), defaults as above:
  * image_projection=False: no W_img, u_i = normalize(ImagePool(...)) (SigLIP, whose
    MAP-pooled vector is the embedding; embed_dim must equal its width);
  * text_projection_bias=True: W_txt has a bias (SigLIP's text `head`; CLIP's
    `text_projection` and `visual_projection` have none);
  * mask_padding=False: the text tower sees every token, pads included, and pools
    without a padding mask -- what HF computes when no attention_mask is given
    (SigLIP reads the last, padded, slot). The default True masks tokens equal to
    `pad_id` out of attention and pooling (packed-style segment ids).
`log_temperature` is HF's `logit_scale`, `bias` SigLIP's `logit_bias`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from layers.linear import Linear
from zoo.language.encoder import EncoderConfig, TextEncoder
from zoo.model_config import from_model_config
from zoo.vision.vit import ViT, ViTConfig

LOSSES = ("softmax", "sigmoid")


def _items(value) -> Tuple[Tuple[str, object], ...]:
  return tuple(sorted(dict(value or {}).items()))


def _in_tower(e: ValueError, tower: str) -> ValueError:
  """A tower's config error, naming the field under model.<tower>."""
  msg = str(e).replace("model.", f"model.{tower}.").replace("model:", f"model.{tower}:")
  return ValueError(msg)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vocab_size: Optional[int] = None  # the loop fills it from the captions' tokenizer
  embed_dim: int = 128
  loss: str = "softmax"  # softmax (CLIP) | sigmoid (SigLIP)
  temperature_init: Optional[float] = None  # None: 1/0.07 (softmax) or 10 (sigmoid)
  bias_init: float = -10.0  # sigmoid only
  pad_id: int = 0  # text tokens equal to it are padding
  mask_padding: bool = True  # False: pads are ordinary tokens (HF without attention_mask)
  image_projection: bool = True  # False: the image tower's pooled vector is the embedding
  text_projection_bias: bool = False  # a bias in W_txt (SigLIP's text head)
  image: Tuple[Tuple[str, object], ...] = ()  # ViT fields (zoo/vision/vit.py)
  text: Tuple[Tuple[str, object], ...] = ()  # encoder fields (zoo/language/encoder.py)

  @classmethod
  def from_config(cls, model_cfg) -> "CLIPConfig":
    return from_model_config(cls, model_cfg, model="clip", required=("vocab_size",))

  def __post_init__(self):
    object.__setattr__(self, "image", _items(self.image))
    object.__setattr__(self, "text", _items(self.text))
    if self.loss not in LOSSES:
      raise ValueError(f"model.loss={self.loss!r} is not one of {LOSSES}")
    if self.embed_dim <= 0:
      raise ValueError(f"model.embed_dim={self.embed_dim} must be positive")
    if self.temperature_init is not None and self.temperature_init <= 0:
      raise ValueError(f"model.temperature_init={self.temperature_init} must be positive")
    for name in ("mask_padding", "image_projection", "text_projection_bias"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"model.{name}={getattr(self, name)!r} must be true or false")

  def image_config(self) -> ViTConfig:
    try:
      return ViTConfig.from_config(dict(self.image, num_classes=0))
    except ValueError as e:
      raise _in_tower(e, "image") from None

  def text_config(self) -> EncoderConfig:
    try:
      return EncoderConfig.from_config(dict(self.text, vocab_size=self.vocab_size, mlm_head=False))
    except ValueError as e:
      raise _in_tower(e, "text") from None


class CLIP(nnx.Module):

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.image_tower = ViT(cfg.image_config(), rngs=rngs)
    self.text_tower = TextEncoder(cfg.text_config(), rngs=rngs)
    width = self.image_tower.features_dim
    if cfg.image_projection:
      self.image_proj = Linear(width, cfg.embed_dim, axes=("embed", "mlp"), rngs=rngs)
    elif width != cfg.embed_dim:
      raise ValueError(f"model.image_projection=False makes the image tower's pooled vector "
                       f"(width {width}) the embedding: model.embed_dim={cfg.embed_dim} must "
                       f"equal it")
    else:
      self.image_proj = None
    self.text_proj = Linear(cfg.text_config().d_model, cfg.embed_dim, axes=("embed", "mlp"),
                            use_bias=cfg.text_projection_bias, rngs=rngs)
    t0 = cfg.temperature_init or (1 / 0.07 if cfg.loss == "softmax" else 10.0)
    self.log_temperature = nnx.Param(jnp.array(math.log(t0), jnp.float32))
    self.bias = nnx.Param(jnp.array(cfg.bias_init, jnp.float32)) if cfg.loss == "sigmoid" else None

  def encode_image(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> unit vectors [B, embed_dim] (float32)."""
    pooled = self.image_tower(images)
    return _normalize(pooled if self.image_proj is None else self.image_proj(pooled))

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, L] (padding = pad_id, masked unless mask_padding=False) -> unit vectors
    [B, embed_dim] (float32)."""
    if self.cfg.mask_padding:
      valid = tokens != self.cfg.pad_id
      feats = self.text_tower.encode(tokens, segment_ids=valid.astype(jnp.int32))
    else:
      valid, feats = None, self.text_tower.encode(tokens)
    return _normalize(self.text_proj(self.text_tower.pool(feats, valid, tokens)))

  def logits(self, image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
    """z [B_img, B_txt] = t u . v (+ b)."""
    z = jnp.exp(self.log_temperature[...]) * image_emb @ text_emb.T
    return z if self.bias is None else z + self.bias[...]

  def __call__(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    return self.logits(self.encode_image(images), self.encode_text(tokens))

  def train_flops_per_example(self, text_len: int) -> float:
    """The image tower's per-example FLOPs plus the text tower's at `text_len` tokens (the
    B x B logits are negligible at these sizes)."""
    return (self.image_tower.train_flops_per_example()
            + self.text_tower.train_flops_per_token(text_len) * text_len)


def _normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def build(model_cfg, rngs: nnx.Rngs) -> CLIP:
  return CLIP(CLIPConfig.from_config(model_cfg), rngs=rngs)
