"""`biformer_net`: BiFormer, a hierarchical vision transformer of Bi-Level Routing Attention.

From "BiFormer: Vision Transformer with Bi-Level Routing Attention" (Zhu et al.,
CVPR 2023), the four-stage pyramid of its Figure 3 (images [B, H, W, C], feature
maps [B, h, w, C_i] throughout, no class token, no position table):

    x_0 = Stem(images)                 3x3 convs of stride 2 (log2(stem_stride) of them;
                                       stem_stride=4: C -> C_0/2, LN, GELU, -> C_0, LN)
    stage i = 0..N-1:
      x   = Down(x)   (i > 0)          3x3 conv, stride 2, C_{i-1} -> C_i, then LN
      x   = x + DWConv3x3(x)           depthwise-conv positional embedding
      x   = x + BRA(LN(x))             layers/attention/biformer.py: S_i x S_i regions,
                                       top-k_i routed regions, LCE (5x5 depthwise conv of V)
      x   = x + MLP(LN(x))             C_i -> mlp_ratio C_i (3 in the paper) -> C_i, GELU
      (the last three lines repeated depth_i times)
    pooled = LN(mean_{h, w} x)         global average pooling, then LayerNorm
    logits = pooled W + b              (num_classes=0: no classifier, the pooled vector)

Sizes by name (`variant`; dims, depths, S, top-k, head_dim, stem stride), the
paper's table and the official code:
  T     dims 64/128/256/512, depths 2/2/8/2,  S = 7, top-k 1/4/16/S^2, head_dim 32, stem 4
  S     dims 64/128/256/512, depths 4/4/18/4, S = 7, top-k 1/4/16/S^2, head_dim 32, stem 4
  B     dims 96/192/384/768, depths 4/4/18/4, S = 7, top-k 1/4/16/S^2, head_dim 32, stem 4
  tiny  dims 32/64/128,      depths 2/2/2,    S = 4/2/1, top-k 4/2/S^2, head_dim 16, stem 2
At 224 px the T/S/B maps are 56, 28, 14, 7 (S = 7: regions of 8x8, 4x4, 2x2, 1x1 tokens);
their last stage, top-k = S^2, is full attention with LCE (the official code's plain
attention with LePE there). `tiny` is for 32x32 images: stem stride 2 -> maps 16, 8, 4,
S = 4/2/1, so every region is 4x4 = 16 tokens (the GPU block-sparse tile's minimum);
stage 1 reads 4 of 16 regions, stage 2 2 of 4, stage 3 is full attention.
Explicit `dims`, `depths`, `num_heads`, `num_regions`, `topk`, `head_dim`, `stem_stride`
override the variant; a per-stage field takes one value for every stage, a tuple or
"a,b,c"; topk=-1 means all S^2 regions.

Departures from the official code, chosen so the model has no batch statistics
(the loop keeps none): LayerNorm over channels where it has BatchNorm (after the
stem convs, after the downsampling convs, and the final norm, which comes after
the pooling here); no stochastic depth and no layer scale (BiFormer-T uses none);
GELU in its tanh form (`layers.mlp`). The BRA details taken as standard are in
layers/attention/biformer.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
from flax import nnx

from layers import pooling
from layers.attention.biformer import (IMPLEMENTATIONS, BiLevelRoutingAttention, DepthwiseConv2d,
                                       check_topk, region_shape)
from layers.linear import Linear
from layers.mlp import MLP
from layers.norms import LayerNorm
from pallas_kernels.flash import api as flash_api
from zoo.model_config import from_model_config, parse_dtype

# name -> (dims, depths, num_regions, topk, head_dim, stem_stride); topk -1 = all S^2 regions.
VARIANTS = {
    "T": ((64, 128, 256, 512), (2, 2, 8, 2), (7, 7, 7, 7), (1, 4, 16, -1), 32, 4),
    "S": ((64, 128, 256, 512), (4, 4, 18, 4), (7, 7, 7, 7), (1, 4, 16, -1), 32, 4),
    "B": ((96, 192, 384, 768), (4, 4, 18, 4), (7, 7, 7, 7), (1, 4, 16, -1), 32, 4),
    "tiny": ((32, 64, 128), (2, 2, 2), (4, 2, 1), (4, 2, -1), 16, 2),
}


def _ints(value, field: str, stages: Optional[int] = None) -> Optional[Tuple[int, ...]]:
  """None | "" -> None; 3 | "3" -> (3,) * stages; (3, 6) | "3,6" -> a tuple of ints (errors name
  the field)."""
  if value is None or value == "" or value == ():
    return None
  if isinstance(value, str):
    try:
      value = tuple(int(s) for s in value.split(",") if s.strip())
    except ValueError:
      raise ValueError(f"{field}={value!r} must be integers, e.g. '2,2,8,2'") from None
    if len(value) == 1 and stages is not None:
      value = value[0]
  if isinstance(value, int) and not isinstance(value, bool):
    if stages is None:
      raise ValueError(f"{field}={value!r} must give one value per stage")
    value = (value,) * stages
  if not isinstance(value, (tuple, list)):
    raise ValueError(f"{field}={value!r} must be an integer or one integer per stage")
  out = tuple(value)
  if any(isinstance(v, bool) or not isinstance(v, int) for v in out):
    raise ValueError(f"{field}={value!r} must be integers")
  if stages is not None and len(out) != stages:
    raise ValueError(f"{field}={value!r} has {len(out)} entries for {stages} stages "
                     f"(model.dims has {stages})")
  return out



def conv_out(size: int, stride: int) -> int:
  """Output length of a 3x3 conv with padding 1: ceil(size / stride)."""
  return (size - 1) // stride + 1


@dataclasses.dataclass(frozen=True)
class BiFormerConfig:
  """`config.model` of `biformer_net`. Sizes left None come from `variant`; __post_init__
  resolves them to one tuple entry per stage and validates every field."""
  num_classes: Optional[int] = None  # required; the loop fills it. 0: no classifier (a tower)
  image_size: Union[int, Tuple[int, int]] = 224
  num_channels: int = 3
  variant: str = "T"
  dims: Optional[Tuple[int, ...]] = None
  depths: Optional[Tuple[int, ...]] = None
  num_heads: Optional[Tuple[int, ...]] = None  # None: dims // head_dim
  head_dim: Optional[int] = None
  num_regions: Optional[Tuple[int, ...]] = None  # S per stage
  topk: Optional[Tuple[int, ...]] = None  # routed regions per stage; -1: all S^2
  stem_stride: Optional[int] = None  # 1 or a power of two (that many-fold smaller map)
  mlp_ratio: float = 3.0
  pos_kernel: int = 3  # depthwise-conv positional embedding (0: none)
  lce_kernel: int = 5  # BRA's local context enhancement (0: none)
  norm_eps: float = 1e-6
  use_bias: bool = True
  implementation: str = "gather"  # gather | block_sparse | reference
  kernel_implementation: str = "auto"  # the block-sparse kernel's backend (block_sparse only)
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    s = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    if self.num_classes is None:
      raise ValueError("model.num_classes is not set (the loop fills it from the dataset)")
    if self.num_classes != 0:
      pooling.check_positive("model.num_classes", self.num_classes)
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown model.variant={self.variant!r}; choose one of {list(VARIANTS)}")
    v_dims, v_depths, v_regions, v_topk, v_head_dim, v_stem = VARIANTS[self.variant]
    dims = _ints(self.dims, "model.dims") or v_dims
    n = len(dims)
    for d in dims:
      pooling.check_positive("model.dims", d)
    s("dims", dims)
    defaults = dict(depths=v_depths, num_regions=v_regions, topk=v_topk)
    for name in ("depths", "num_regions", "topk"):
      value = _ints(getattr(self, name), f"model.{name}", n)
      if value is None:
        if len(defaults[name]) != n:
          raise ValueError(f"model.dims has {n} stages, variant {self.variant!r} "
                           f"{len(defaults[name])}: set model.{name} too (one per stage)")
        value = defaults[name]
      s(name, value)
    for d in self.depths:
      pooling.check_positive("model.depths", d)
    heads = _ints(self.num_heads, "model.num_heads", n)
    if heads is None:  # heads from the head size (the variant's unless model.head_dim is set)
      head_dim = v_head_dim if self.head_dim is None else self.head_dim
      pooling.check_positive("model.head_dim", head_dim)
      for d in dims:
        if d % head_dim:
          raise ValueError(f"model.head_dim={head_dim} does not divide model.dims={dims}; set "
                           "model.num_heads (per stage) or another head_dim")
      heads = tuple(d // head_dim for d in dims)
      s("head_dim", head_dim)
    else:  # explicit heads: head_dim None means dims[i] // num_heads[i]
      for h in heads:
        pooling.check_positive("model.num_heads", h)
      if self.head_dim is None:
        for d, h in zip(dims, heads):
          if d % h:
            raise ValueError(f"model.num_heads={heads} does not divide model.dims={dims}; set "
                             "model.head_dim explicitly")
      else:
        pooling.check_positive("model.head_dim", self.head_dim)
    s("num_heads", heads)
    stem = v_stem if self.stem_stride is None else self.stem_stride
    pooling.check_positive("model.stem_stride", stem)
    if stem & (stem - 1):
      raise ValueError(f"model.stem_stride={stem} must be 1 or a power of two")
    s("stem_stride", stem)
    size = self.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2:
      raise ValueError(f"model.image_size={self.image_size!r} must be an int or (height, width)")
    for v in size:
      pooling.check_positive("model.image_size", v)
    s("image_size", size)
    pooling.check_positive("model.num_channels", self.num_channels)
    if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) \
        or self.mlp_ratio <= 0:
      raise ValueError(f"model.mlp_ratio must be positive, got {self.mlp_ratio!r}")
    for name in ("pos_kernel", "lce_kernel"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"model.{name} must be a non-negative integer (0: none), got {value!r}")
    # Regions and routing, per stage.
    topk = []
    for i, (grid, regions, k) in enumerate(zip(self.grids, self.num_regions, self.topk)):
      try:
        region_shape(grid, regions)
      except ValueError:
        raise ValueError(
            f"model.num_regions={self.num_regions}: S={regions} does not divide stage {i}'s "
            f"{grid[0]}x{grid[1]} feature map (model.image_size={self.image_size}, "
            f"model.stem_stride={stem}, halved after each stage)") from None
      k = regions * regions if k == -1 else k
      try:
        check_topk(k, regions)
      except ValueError:
        raise ValueError(f"model.topk={self.topk}: stage {i} routes to {k} of S^2 = "
                         f"{regions * regions} regions; use 1..S^2 or -1 (all)") from None
      topk.append(k)
    s("topk", tuple(topk))
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"model.implementation={self.implementation!r} is not one of "
                       f"{IMPLEMENTATIONS}")
    kernels = flash_api.available_implementations()
    if self.kernel_implementation not in kernels:
      raise ValueError(f"model.kernel_implementation={self.kernel_implementation!r} is not one "
                       f"of {kernels}")
    parse_dtype(self.dtype, "model.dtype")
    parse_dtype(self.param_dtype, "model.param_dtype")

  @classmethod
  def from_config(cls, model_cfg) -> "BiFormerConfig":
    """From the `config.model` ConfigDict; unknown fields are an error naming them."""
    return from_model_config(cls, model_cfg, model="biformer_net")

  def stage_head_dim(self, stage: int) -> int:
    return self.head_dim if self.head_dim is not None else self.dims[stage] // self.num_heads[stage]

  @property
  def stem_grid(self) -> Tuple[int, int]:
    h, w = self.image_size
    for _ in range(int(math.log2(self.stem_stride))):
      h, w = conv_out(h, 2), conv_out(w, 2)
    return h, w

  @property
  def grids(self) -> Tuple[Tuple[int, int], ...]:
    """The feature map (h, w) of every stage."""
    out = [self.stem_grid]
    for _ in range(len(self.dims) - 1):
      out.append((conv_out(out[-1][0], 2), conv_out(out[-1][1], 2)))
    return tuple(out)


class Conv2d(nnx.Module):
  """A 3x3 (by default) convolution with padding k // 2, HWIO kernel, fan-in init, bias."""

  def __init__(self, in_ch: int, out_ch: int, *, kernel_size: int = 3, stride: int = 1,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.linear = Linear((kernel_size, kernel_size, in_ch), out_ch,
                         axes=(None, None, None, "embed"), use_bias=True, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.stride, self.kernel_size, self.dtype = stride, kernel_size, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.kernel_size // 2
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.linear.kernel[...].astype(self.dtype),
        window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.linear.bias[...].astype(self.dtype)

  def macs(self, out_grid: Tuple[int, int]) -> float:
    return float(math.prod(self.linear.kernel.shape)) * out_grid[0] * out_grid[1]


class ConvNorm(nnx.Module):
  """Conv2d then LayerNorm over channels (the official code's conv + BatchNorm)."""

  def __init__(self, in_ch: int, out_ch: int, *, stride: int, eps: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.conv = Conv2d(in_ch, out_ch, stride=stride, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
    self.norm = LayerNorm(out_ch, eps=eps, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.conv(x))


class BiFormerBlock(nnx.Module):
  """x + DWConv(x); x + BRA(LN(x)); x + MLP(LN(x)) on a feature map [B, h, w, C]."""

  def __init__(self, cfg: BiFormerConfig, stage: int, *, rngs: nnx.Rngs):
    dtype = parse_dtype(cfg.dtype, "model.dtype")
    param_dtype = parse_dtype(cfg.param_dtype, "model.param_dtype")
    d = cfg.dims[stage]
    self.pos = (DepthwiseConv2d(d, cfg.pos_kernel, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs) if cfg.pos_kernel else None)
    self.attn_norm = LayerNorm(d, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.attention = BiLevelRoutingAttention(
        d, num_heads=cfg.num_heads[stage], head_dim=cfg.stage_head_dim(stage),
        num_regions=cfg.num_regions[stage], topk=cfg.topk[stage],
        lce_kernel=cfg.lce_kernel, implementation=cfg.implementation,
        kernel_implementation=cfg.kernel_implementation, use_bias=cfg.use_bias, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = LayerNorm(d, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.mlp = MLP(d, max(1, int(round(cfg.mlp_ratio * d))), kind="gelu", use_bias=cfg.use_bias,
                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pos is not None:
      x = x + self.pos(x)
    x = x + self.attention(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class BiFormer(nnx.Module):
  """images [B, H, W, C] -> logits [B, num_classes] (float32); `encode` gives the last map."""

  def __init__(self, cfg: BiFormerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = parse_dtype(cfg.dtype, "model.dtype")
    param_dtype = parse_dtype(cfg.param_dtype, "model.param_dtype")
    self.dtype = dtype
    kw = dict(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Stem: log2(stem_stride) stride-2 convs (one stride-1 conv for stem_stride=1), widths
    # doubling up to dims[0] (stride 4: C -> C_0/2 -> C_0), GELU between them.
    m = int(math.log2(cfg.stem_stride))
    widths = [max(1, cfg.dims[0] // 2 ** (m - 1 - i)) for i in range(m)] or [cfg.dims[0]]
    chans = [cfg.num_channels] + widths
    self.stem = nnx.List([ConvNorm(chans[i], chans[i + 1], stride=2 if m else 1, **kw)
                          for i in range(len(widths))])
    self.downsample = nnx.List([ConvNorm(cfg.dims[i - 1], cfg.dims[i], stride=2, **kw)
                                for i in range(1, len(cfg.dims))])
    self.stages = nnx.List([
        nnx.List([BiFormerBlock(cfg, i, rngs=rngs) for _ in range(cfg.depths[i])])
        for i in range(len(cfg.dims))])
    self.norm = LayerNorm(cfg.dims[-1], eps=cfg.norm_eps, param_dtype=param_dtype)
    self.head = (pooling.Classifier(cfg.dims[-1], cfg.num_classes, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
                 if cfg.num_classes else None)

  def encode(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> the last stage's feature map [B, h, w, dims[-1]]."""
    cfg = self.cfg
    want = (*cfg.image_size, cfg.num_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(f"images must be [batch, {want[0]}, {want[1]}, {want[2]}] "
                       f"(model.image_size, model.num_channels), got {tuple(images.shape)}")
    x = images.astype(self.dtype)
    for i, layer in enumerate(self.stem):
      x = layer(x)
      if i + 1 < len(self.stem):
        x = jax.nn.gelu(x, approximate=True)
    for i, blocks in enumerate(self.stages):
      if i > 0:
        x = self.downsample[i - 1](x)
      for block in blocks:
        fn = (lambda blk, h: blk(h))
        if cfg.remat:
          fn = nnx.remat(fn)
        x = fn(block, x)
    return x

  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> logits [B, num_classes] in float32; with num_classes=0 the
    pooled, normalised vector [B, dims[-1]]."""
    x = self.encode(images)
    pooled = self.norm(jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype))
    out = pooled if self.head is None else self.head(pooled)
    return out.astype(jnp.float32)

  @property
  def features_dim(self) -> int:
    return self.cfg.dims[-1]

  def train_flops_per_example(self) -> float:
    """Model FLOPs of one training example (forward + backward), PaLM-style: 6 x the
    multiply-adds of every matmul and convolution (projections and MLPs x the tokens of their
    stage, convs x their output pixels, depthwise convs included) + each BRA layer's token
    attention (12 heads d x the k n keys a query reads, per token) and its forward-only
    routing (`BiLevelRoutingAttention.train_flops`). Norms and elementwise ops are not counted."""
    cfg = self.cfg

    def matmul_params(module) -> float:
      return float(sum(math.prod(p.shape) for path, p in nnx.iter_graph(module)
                       if isinstance(p, nnx.Param) and len(p.shape) >= 2 and path[-1] != "bias"))

    macs, extra = 0.0, 0.0
    grid = cfg.image_size
    for layer in self.stem:
      if layer.conv.stride == 2:
        grid = (conv_out(grid[0], 2), conv_out(grid[1], 2))
      macs += layer.conv.macs(grid)
    for i, (blocks, grid) in enumerate(zip(self.stages, cfg.grids)):
      t = grid[0] * grid[1]
      if i > 0:
        macs += self.downsample[i - 1].conv.macs(grid)
      for block in blocks:
        attn = block.attention
        proj = sum(float(math.prod(lin.kernel.shape)) for lin in (attn.q, attn.k, attn.v, attn.o))
        macs += (proj + matmul_params(block.mlp)) * t
        if block.pos is not None:
          macs += float(math.prod(block.pos.kernel.shape)) * t
        extra += attn.train_flops(grid)
    if self.head is not None:
      macs += matmul_params(self.head)
    return 6.0 * macs + extra


def build(model_cfg, rngs: nnx.Rngs) -> BiFormer:
  """The registry's constructor: `config.model` ConfigDict -> BiFormer."""
  return BiFormer(BiFormerConfig.from_config(model_cfg), rngs=rngs)
