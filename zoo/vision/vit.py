"""`vit`: the Vision Transformer, with optional attention-guided token pruning (EET).

From "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale" (Dosovitskiy et al., 2021), in the form of big_vision's `vit.py`:

    x_p   = [patch_1 .. patch_N],  patch_i in R^{P*P*C}   (row-major over the grid,
                                                            each patch flattened (row, col, channel))
    z_0   = x_p E + b_E + E_pos                            E: [P, P, C, d], E_pos: [N, d]
    z_0   = [x_cls; z_0]                                   (optional class token, no E_pos of its own)
    z_0   = LN(z_0)                                        (pre_norm=True only: CLIP's pre_layrnorm)
    z_l   = Block_l(z_{l-1})      pre-norm: h = z + Attn(LN(z)),  z' = h + MLP(LN(h)),  non-causal
    y     = LN(z_L)                                        `encode` returns y  [B, 1 + N | N, d]
    logits = Head(y)   pool="cls": y_0 W_c + b_c;  "gap": (mean_i y_i) W_c + b_c;  "map":
                       attention pooling (big_vision's MAPHead: layers/pooling "attentive_probe",
                       variant="mha", one query, the encoder's heads, MLP width and
                       activation, LayerNorm eps: SigLIP's MultiheadAttentionPoolingHead);
                       "attentive_probe" (EP), "lowrank_pool": those heads' defaults
    (the pooling heads read the patch tokens only: a class token, if any, is left out;
    `model.pooling_options` override their options; they train with the encoder:
    stop_gradient=False unless set)

The patch embedding is a `Linear` whose kernel keeps the patch axes
([P, P, C] -> d, logical axes (None, None, None, "embed")): the same map as a
stride-P convolution with an HWIO kernel, so conv checkpoints load as they are.

Knobs outside checkpoints need (zoo/hub/vit.py), each off by default:
`patch_bias=False` drops b_E (CLIP's patch conv has none); `pre_norm=True`
normalises z_0, class token included, before the first block (CLIP's
`pre_layrnorm`; a LayerNorm with `norm_eps` whose parameters are `embed_norm`);
`mlp_activation` replaces the MLP kind's own activation ("gelu_exact" for HF
ViT, "quick_gelu" for OpenAI CLIP; layers/mlp.py).

Position embeddings are learned (`posemb="learn"`, N(0, 1/d), big_vision) or the
fixed 2-D sin-cos table (`posemb="sincos2d"`, "Better plain ViT baselines for
ImageNet-1k", big_vision `posemb_sincos_2d`): for the patch at grid (row y,
column x) and the d/4 frequencies w_k = 1 / 10000^(k / (d/4 - 1)),

    E_pos[y, x] = [sin(x w), cos(x w), sin(y w), cos(y w)]      (d divisible by 4, d >= 8)

As in big_vision, the class token (initialised to zeros) is prepended after the
position embeddings are added. The blocks are the shared `TransformerBlock`
(LayerNorm eps 1e-6, tanh-GELU MLP as flax's `nn.gelu`, biases everywhere),
the attention family chosen by id (`model.attention`, one id or a pattern
cycled over layers, as in `llama_lm`) with `causal=False` and no positional
encoding inside the attention (`positional="nope"`: positions enter at the input).
Token positions (0 for the class token, 1 + i for patch i) still go to the
attention layers, so a family that reads positions sees the original grid order
even after pruning.

Sizes by name (`variant`, the ViT / big_vision table: width, depth, MLP, heads):
Ti 192/12/768/3, S 384/12/1536/6, M 512/12/2048/8, B 768/12/3072/12,
L 1024/24/4096/16, H 1280/32/5120/16; `d_model`, `num_layers`, `mlp_dim`,
`num_heads` override them.

Token pruning, from "Rethinking Vision Transformer for Large-Scale Fine-Grained
Image Retrieval" (EET): background / low-discriminative patch
tokens are removed progressively at chosen layers, by their class-token
attention. The paper leaves the exact score and placement open here
(FAMILIES.md: "score open"); the standard choices taken, from EViT ("Not All
Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", Liang et al., 2022), are:
  * score: the class token's attention probability to each patch token in that
    layer, averaged over heads, s_j = (1/H) sum_h softmax_j(q_{cls,h} . k_{j,h} / sqrt(D));
    it is computed from the layer's own q/k projections and its positional
    transform with the reference path (`layers.attention.mha.mha_probs`), so
    it is exactly the attention the layer applied for `attention="mha"`; for a
    family with its own core (entmax, selective, ...) it is the softmax of the
    same dot products, a proxy of that family's weights. The class token's
    own column is excluded from the ranking. (Under jit XLA may share the
    recomputed key projection with the attention's own; the model FLOPs do not
    count it.)
  * placement: inside the block, after the attention residual and before the
    MLP (EViT): z' = z + Attn(LN(z)); z' <- [z'_cls; top-k_j(s) of z'_patches];
    z'' = z' + MLP(LN(z')). The MLP and every later layer run on the kept
    tokens only.
  * count: at a pruning layer with n patch tokens, k = max(1, ceil(r n))
    tokens are kept (r = keep_ratio of that layer; r n is rounded down by 1e-6
    first so 0.7 x 10 keeps 7). Counts are static, so shapes stay static under
    jit. With one keep_ratio every pruning layer keeps that fraction of what
    reaches it (progressive, as EViT); a tuple gives one ratio per layer.
  * the kept tokens stay in their original (grid) order, the class token
    first; the dropped tokens are discarded (EViT's fusion of the inattentive
    tokens into one extra token, and EET's transfer strategy, are not
    implemented).
Pruning needs pool="cls" (and so a class token). `encode(images,
return_indices=True)` also returns which tokens survived.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import nnx

from layers import pooling
from layers.attention.config import AttentionConfig, parse_options
from layers.attention.masks import Mask
from layers.attention.mha import MultiHeadAttention, mha_probs
from layers.linear import Linear
from layers.mlp import ACTIVATIONS
from layers.norms import make_norm
from zoo.model_config import (attention_config, from_model_config, parse_dtype, parse_pattern,
                               transformer_blocks)

# name -> (d_model, num_layers, mlp_dim, num_heads), the ViT paper / big_vision table.
VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}
POOLS = ("cls", "gap", "map", "attentive_probe", "lowrank_pool")
POSEMBS = ("learn", "sincos2d")
# pool -> the layers/pooling.py head it builds ("cls" is the class token + a linear classifier).
POOL_HEADS = {"gap": "mean", "map": "attentive_probe", "attentive_probe": "attentive_probe",
              "lowrank_pool": "lowrank_pool"}


def _int_tuple(value, field: str) -> Tuple[int, ...]:
  """3 | (3, 6) | "3,6,9" | "" -> a tuple of ints; anything else is an error naming `field`."""
  if value is None or value == "":
    return ()
  if isinstance(value, str):
    try:
      value = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
      raise ValueError(f"{field}={value!r} must be integers, e.g. '3,6,9'") from None
  if isinstance(value, int):
    value = (value,)
  out = tuple(value)
  if any(isinstance(v, bool) or not isinstance(v, int) for v in out):
    raise ValueError(f"{field}={value!r} must be integers")
  return out


def keep_count(num_patches: int, keep_ratio: float) -> int:
  """Patch tokens kept out of `num_patches`: max(1, ceil(keep_ratio n)), r n rounded down by 1e-6
  first (so float error in 0.7 x 10 does not keep 8)."""
  return max(1, math.ceil(keep_ratio * num_patches - 1e-6))


def posemb_sincos_2d(grid_h: int, grid_w: int, width: int, temperature: float = 10_000.0,
                     dtype=jnp.float32) -> jax.Array:
  """big_vision's fixed 2-D sin-cos table [grid_h * grid_w, width], row-major over the grid:
  [sin(x w), cos(x w), sin(y w), cos(y w)], w_k = temperature^(-k / (width/4 - 1))."""
  if width % 4 or width < 8:
    raise ValueError(f"posemb='sincos2d' needs d_model divisible by 4 and >= 8, got {width}")
  y, x = jnp.mgrid[:grid_h, :grid_w]
  omega = jnp.arange(width // 4) / (width // 4 - 1)
  omega = 1.0 / (temperature ** omega)
  y = jnp.einsum("m,d->md", y.reshape(-1).astype(jnp.float32), omega)
  x = jnp.einsum("m,d->md", x.reshape(-1).astype(jnp.float32), omega)
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1).astype(dtype)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/P * W/P, P, P, C]: patches row-major over the grid."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p, p, c)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """`config.model` of `vit`. Sizes left None come from `variant`; __post_init__ resolves
  them and validates every field (pooling_options are checked by the head, at build)."""
  num_classes: Optional[int] = None  # required; the loop fills it. 0: no classifier (a tower)
  image_size: Union[int, Tuple[int, int]] = 224
  num_channels: int = 3
  patch_size: int = 16
  variant: str = "B"
  d_model: Optional[int] = None
  num_layers: Optional[int] = None
  num_heads: Optional[int] = None
  mlp_dim: Optional[int] = None
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  mlp_kind: str = "gelu"
  norm: str = "layernorm"
  norm_eps: float = 1e-6
  use_bias: bool = True
  mlp_activation: Optional[str] = None  # None: mlp_kind's own (tanh GELU); layers/mlp.ACTIVATIONS
  patch_bias: bool = True  # b_E of the patch embedding (CLIP's patch conv has none)
  pre_norm: bool = False  # a norm on z_0 before the first block (CLIP's pre_layrnorm)
  attention: str = "mha"
  attention_options: Tuple[Tuple[str, object], ...] = ()
  posemb: str = "learn"
  class_token: Optional[bool] = None  # None: a class token exactly when pool="cls"
  pool: str = "cls"
  pooling_options: Tuple[Tuple[str, object], ...] = ()
  prune_layers: Tuple[int, ...] = ()
  keep_ratio: Union[float, Tuple[float, ...]] = 0.7
  dtype: str = "float32"
  param_dtype: str = "float32"
  implementation: str = "auto"
  remat: bool = False

  def __post_init__(self):
    s = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    if self.num_classes is None:
      raise ValueError("model.num_classes is not set (the loop fills it from the dataset)")
    if self.num_classes != 0:  # 0: no classifier, the model gives the pooled vector
      pooling.check_positive("model.num_classes", self.num_classes)
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown model.variant={self.variant!r}; choose one of {list(VARIANTS)}")
    for name, value in zip(("d_model", "num_layers", "mlp_dim", "num_heads"),
                           VARIANTS[self.variant]):
      if getattr(self, name) is None:
        s(name, value)
      pooling.check_positive(f"model.{name}", getattr(self, name))
    size = self.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2:
      raise ValueError(f"model.image_size={self.image_size!r} must be an int or (height, width)")
    for v in size:
      pooling.check_positive("model.image_size", v)
    s("image_size", size)
    pooling.check_positive("model.patch_size", self.patch_size)
    pooling.check_positive("model.num_channels", self.num_channels)
    for v in size:
      if v % self.patch_size:
        raise ValueError(f"model.patch_size={self.patch_size} does not divide "
                         f"model.image_size={self.image_size}")
    if self.posemb not in POSEMBS:
      raise ValueError(f"model.posemb={self.posemb!r} is not one of {POSEMBS}")
    if self.posemb == "sincos2d" and (self.d_model % 4 or self.d_model < 8):
      raise ValueError(f"model.posemb='sincos2d' needs model.d_model divisible by 4 and >= 8, "
                       f"got {self.d_model}")
    if self.pool not in POOLS:
      raise ValueError(f"model.pool={self.pool!r} is not one of {POOLS}")
    if self.class_token is None:
      s("class_token", self.pool == "cls")
    if self.pool == "cls" and not self.class_token:
      raise ValueError("model.pool='cls' needs model.class_token=True")
    s("attention_options", _options(self.attention_options, "model.attention_options"))
    s("pooling_options", _options(self.pooling_options, "model.pooling_options"))
    if self.pool == "cls" and self.pooling_options:
      raise ValueError("model.pooling_options are options of a pooling head; pool='cls' has none")
    if self.mlp_activation is not None and self.mlp_activation not in ACTIVATIONS:
      raise ValueError(f"model.mlp_activation={self.mlp_activation!r} is not one of "
                       f"{sorted(ACTIVATIONS)} (or None: the mlp_kind's own)")
    for name in ("patch_bias", "pre_norm"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"model.{name}={getattr(self, name)!r} must be true or false")
    parse_dtype(self.dtype, "model.dtype")
    parse_dtype(self.param_dtype, "model.param_dtype")
    parse_pattern(self.attention, self.num_layers)
    self.attention_config(0)  # head layout errors, naming the field
    # Pruning.
    layers = _int_tuple(self.prune_layers, "model.prune_layers")
    s("prune_layers", layers)
    if layers:
      if self.pool != "cls" or not self.class_token:
        raise ValueError(f"model.prune_layers={layers} ranks tokens by class-token attention: it "
                         f"needs model.pool='cls' with a class token (got pool={self.pool!r})")
      if list(layers) != sorted(set(layers)) or not all(0 <= l < self.num_layers for l in layers):
        raise ValueError(f"model.prune_layers={layers} must be distinct increasing layer indices "
                         f"in [0, {self.num_layers})")
    ratios = self.keep_ratio
    if isinstance(ratios, str):
      try:
        ratios = tuple(float(r) for r in ratios.split(",") if r.strip())
      except ValueError:
        raise ValueError(f"model.keep_ratio={self.keep_ratio!r} must be numbers in (0, 1]") from None
    if isinstance(ratios, (int, float)) and not isinstance(ratios, bool):
      ratios = (float(ratios),) * len(layers)
    ratios = tuple(ratios)
    if layers and len(ratios) != len(layers):
      raise ValueError(f"model.keep_ratio has {len(ratios)} entries for {len(layers)} "
                       f"model.prune_layers; give one ratio or one per pruning layer")
    for r in ratios:
      if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise ValueError(f"model.keep_ratio={self.keep_ratio!r} must be in (0, 1]")
    s("keep_ratio", tuple(float(r) for r in ratios) if layers else self.keep_ratio)

  @classmethod
  def from_config(cls, model_cfg) -> "ViTConfig":
    """From the `config.model` ConfigDict; unknown fields are an error naming them."""
    return from_model_config(cls, model_cfg, model="vit")

  @property
  def grid(self) -> Tuple[int, int]:
    return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  def token_counts(self) -> Tuple[Tuple[int, int], ...]:
    """Per layer (tokens into the attention, tokens into the MLP), class token included."""
    cls_tok = int(self.class_token)
    n, out = self.num_patches, []
    ratios = dict(zip(self.prune_layers, self.keep_ratio)) if self.prune_layers else {}
    for l in range(self.num_layers):
      before = n
      if l in ratios:
        n = keep_count(n, ratios[l])
      out.append((before + cls_tok, n + cls_tok))
    return tuple(out)

  def attention_config(self, layer: int) -> AttentionConfig:
    return attention_config(self, layer, causal=False, positional="nope",
                            use_bias=self.use_bias)


def _options(value, field: str) -> Tuple[Tuple[str, object], ...]:
  """A mapping, (key, value) pairs or the flag form "k=v,k2=v2" -> sorted (key, value) pairs."""
  if isinstance(value, (tuple, list)):
    try:
      value = dict(value)
    except (TypeError, ValueError):
      raise ValueError(f"{field}={value!r} must be a mapping or 'key=value,...'") from None
  try:
    return tuple(sorted(parse_options(value).items()))
  except ValueError as e:
    raise ValueError(str(e).replace("model.attention_options", field)) from None



def cls_attention(attention: MultiHeadAttention, h: jax.Array, positions: jax.Array) -> jax.Array:
  """Class-token attention of a layer, averaged over heads: h [B, T, d] (the layer's normalised
  input, class token first) -> [B, T] probabilities (a row sums to one).

  The layer's own projections and positional transform, then the reference softmax
  (`mha_probs`) for the one class-token query."""
  q = attention.qkv.q(h[:, :1])
  k = attention.qkv.k(h)
  q, k = attention.positional(q, k, positions[:, :1], positions)
  probs = mha_probs(q, k, k, Mask.bidirectional())  # k stands in for v: only the weights are used
  return jnp.mean(probs[:, :, 0, :], axis=1)


def prune_tokens(x: jax.Array, positions: jax.Array, scores: jax.Array,
                 keep: int) -> Tuple[jax.Array, jax.Array]:
  """Keeps the class token (index 0) and the `keep` patch tokens of highest `scores` [B, T]
  (the class token's own score is ignored), in their original order."""
  _, idx = jax.lax.top_k(scores[:, 1:], keep)
  idx = jnp.sort(idx, axis=-1) + 1
  idx = jnp.concatenate([jnp.zeros_like(idx[:, :1]), idx], axis=1)
  return (jnp.take_along_axis(x, idx[:, :, None], axis=1),
          jnp.take_along_axis(positions, idx, axis=1))


def _head_macs(head: nnx.Module, tokens: int) -> float:
  """Multiply-adds of one example through a pooling head reading `tokens` tokens."""
  size = lambda p: float(math.prod(p.shape))  # noqa: E731
  macs = 0.0
  if getattr(head, "classifier", None) is not None:
    macs += size(head.classifier.linear.kernel)
  name = getattr(head, "pooling_id", None)
  d = head.d_model
  if name == "attentive_probe":
    m = head.num_queries
    if head.variant == "mha":
      macs += tokens * (size(head.k.kernel) + size(head.v.kernel))
      macs += m * (size(head.q.kernel) + size(head.o.kernel))
      if head.mlp is not None:
        macs += m * (size(head.mlp.up.kernel) + size(head.mlp.down.kernel))
      macs += 2 * m * tokens * d  # scores and values
    else:
      dv = head.out_dim
      macs += tokens * (d * dv if head.value is not None else 0) + m * tokens * d
      macs += tokens * dv * (1 if head.combine == "concat" else m)
  elif name == "lowrank_pool":
    h, r = head.num_heads, head.rank
    macs += tokens * d * h * r + d * h * r + tokens * h * r + h * tokens * d
    if head.proj is not None:
      macs += size(head.proj.kernel)
  return macs


class ViT(nnx.Module):
  """images [B, H, W, C] -> logits [B, num_classes] (float32); `encode` gives the tokens."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    families = parse_pattern(cfg.attention, cfg.num_layers)
    dtype = parse_dtype(cfg.dtype, "model.dtype")
    param_dtype = parse_dtype(cfg.param_dtype, "model.param_dtype")
    self.dtype = dtype
    p, c, d = cfg.patch_size, cfg.num_channels, cfg.d_model
    self.patch_embed = Linear((p, p, c), d, axes=(None, None, None, "embed"),
                              use_bias=cfg.patch_bias, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
    if cfg.posemb == "learn":
      init = d ** -0.5 * jax.random.normal(rngs.params(), (cfg.num_patches, d), param_dtype)
      self.posemb = nnx.Param(init, logical_axes=(None, "embed"))
    else:
      self.posemb = None
    self.cls_token = (nnx.Param(jnp.zeros((d,), param_dtype), logical_axes=("embed",))
                      if cfg.class_token else None)
    self.embed_norm = (make_norm(cfg.norm, d, eps=cfg.norm_eps, param_dtype=param_dtype)
                       if cfg.pre_norm else None)
    self.blocks = transformer_blocks(cfg, rngs)
    for l in cfg.prune_layers:
      attn = self.blocks[l].attention
      if not (isinstance(attn, MultiHeadAttention) and hasattr(attn, "qkv")):
        raise ValueError(f"model.prune_layers: layer {l} (attention={families[l]!r}) has no "
                         "query/key projections to rank tokens by class-token attention")
    self.final_norm = make_norm(cfg.norm, d, eps=cfg.norm_eps, param_dtype=param_dtype)
    if cfg.pool == "cls":
      self.head = pooling.Classifier(d, cfg.num_classes, dtype=dtype, param_dtype=param_dtype,
                                     rngs=rngs) if cfg.num_classes else None
    else:
      options = {"stop_gradient": False}  # the head trains with the encoder
      if cfg.pool == "map":  # big_vision's MAPHead: one query, the encoder's heads and MLP
        options.update(variant="mha", num_queries=1, num_heads=cfg.num_heads,
                       mlp_dim=cfg.mlp_dim, use_bias=True, norm_eps=cfg.norm_eps,
                       mlp_activation=cfg.mlp_activation)
      if cfg.pool in ("map", "attentive_probe"):
        options["implementation"] = cfg.implementation
      options.update(dtype=dtype, param_dtype=param_dtype)
      options.update(dict(cfg.pooling_options))
      try:
        self.head = pooling.make_pooling(POOL_HEADS[cfg.pool], d,
                                         num_classes=cfg.num_classes or None, rngs=rngs,
                                         **options)
      except (ValueError, TypeError) as e:
        raise ValueError(f"model.pool={cfg.pool!r} (model.pooling_options): {e}") from None

  # ------------------------------------------------------------------------- stages

  def embed(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> the input tokens z_0 [B, (1 +) N, d] (class token first;
    normalised with pre_norm)."""
    cfg = self.cfg
    want = (*cfg.image_size, cfg.num_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(f"images must be [batch, {want[0]}, {want[1]}, {want[2]}] "
                       f"(model.image_size, model.num_channels), got {tuple(images.shape)}")
    x = self.patch_embed(patchify(images.astype(self.dtype), cfg.patch_size))
    if self.posemb is not None:
      pe = self.posemb[...]
    else:
      pe = posemb_sincos_2d(*cfg.grid, cfg.d_model)
    x = x + pe.astype(self.dtype)[None]
    if self.cls_token is not None:
      cls_tok = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (x.shape[0], 1, x.shape[2]))
      x = jnp.concatenate([cls_tok, x], axis=1)
    return x if self.embed_norm is None else self.embed_norm(x)

  def encode(self, images: jax.Array, *, return_indices: bool = False):
    """images -> tokens after the final norm [B, T, d] (T = (1 +) N, fewer after pruning).

    return_indices: also the kept tokens' indices [B, T] in the unpruned sequence
    (0 = the class token, 1 + i = patch i; patch i alone without a class token)."""
    cfg = self.cfg
    x = self.embed(images)
    b, t = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = Mask.bidirectional()
    counts = cfg.token_counts()
    keep = {l: counts[l][1] - int(cfg.class_token) for l in cfg.prune_layers}

    def plain(block, h, pos):
      return block(h, mask=mask, positions=pos), pos

    def pruned(keep_l):
      def fn(block, h, pos):
        # EViT placement: attention, prune by its class-token attention, then the MLP.
        a = block.attn_norm(h)
        scores = cls_attention(block.attention, a, pos)
        h = h + block.attention(a, mask=mask, positions=pos)
        h, pos = prune_tokens(h, pos, scores, keep_l)
        return h + block.mlp(block.mlp_norm(h)), pos
      return fn

    for l, block in enumerate(self.blocks):
      fn = pruned(keep[l]) if l in keep else plain
      if cfg.remat:
        fn = nnx.remat(fn)
      x, positions = fn(block, x, positions)
    x = self.final_norm(x)
    return (x, positions) if return_indices else x

  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> logits [B, num_classes] in float32; with num_classes=0 the
    pooled vector [B, features_dim] (an image tower: CLIP, captioners)."""
    x = self.encode(images)
    if self.cfg.pool == "cls":
      out = x[:, 0] if self.head is None else self.head(x[:, 0])
    else:
      out = self.head(x[:, 1:] if self.cls_token is not None else x)
    return out.astype(jnp.float32)

  @property
  def features_dim(self) -> int:
    """Width of the pooled vector (what `__call__` gives with num_classes=0)."""
    return self.cfg.d_model if self.cfg.pool == "cls" else self.head.out_dim

  # ------------------------------------------------------------------------- FLOPs

  def train_flops_per_example(self) -> float:
    """Model FLOPs of one training example (forward + backward), PaLM-style:
    6 x (matmul parameters x the tokens they act on) + the attention score/value FLOPs
    of each layer at its token count; pruned layers run their MLP, and every later layer,
    on the kept tokens. The pooling head's FLOPs are counted from its shapes (6 x its
    multiply-adds); the pruning score (one class-token query) is not counted."""
    cfg = self.cfg

    def matmul_params(module) -> float:
      return float(sum(math.prod(p.shape) for path, p in nnx.iter_graph(module)
                       if isinstance(p, nnx.Param) and len(p.shape) >= 2
                       and path[-1] != "bias"))  # [heads, head_dim] biases are not matmuls

    macs = matmul_params(self.patch_embed) * cfg.num_patches
    attn_flops = 0.0
    for block, (t_attn, t_mlp) in zip(self.blocks, cfg.token_counts()):
      macs += matmul_params(block.attention) * t_attn + matmul_params(block.mlp) * t_mlp
      attn_flops += t_attn * block.attention.train_flops_per_token(t_attn)
    t_final = cfg.token_counts()[-1][1]
    if cfg.pool == "cls":
      macs += matmul_params(self.head) if self.head is not None else 0.0
    else:
      macs += _head_macs(self.head, t_final - int(cfg.class_token))
    return 6.0 * macs + attn_flops


def build(model_cfg, rngs: nnx.Rngs) -> ViT:
  """The registry's constructor: `config.model` ConfigDict -> ViT."""
  return ViT(ViTConfig.from_config(model_cfg), rngs=rngs)
