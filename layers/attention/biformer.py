"""`biformer`: Bi-Level Routing Attention (BRA) on a 2-D token grid.

From "BiFormer: Vision Transformer with Bi-Level Routing Attention" (Zhu et al.,
CVPR 2023). A feature map X [H, W, C] is cut into an S x S grid of
non-overlapping regions of n = HW / S^2 tokens each (X^r [S^2, n, C]). Then

    Q, K, V   = X^r W_q, X^r W_k, X^r W_v                        (per token, multi-head)
    Q^r, K^r  = mean_{tokens of region i} Q,  mean K             [S^2, C]   (region level)
    A^r       = Q^r (K^r)^T                                      [S^2, S^2] region adjacency
    I^r       = topkIndex(A^r)                                   [S^2, k]   routed regions
    K^g, V^g  = gather(K, I^r), gather(V, I^r)                   [S^2, k n, C]
    O         = Attention(Q, K^g, V^g) + LCE(V)                   (token level)
    Y         = O W_o

where Attention is multi-head softmax attention, head h of a token t in region
i: softmax_j(q_{t,h} . k_{j,h} / sqrt(d)) over the k n tokens j of the regions in
I^r_i, and LCE (local context enhancement) is a depthwise convolution over V
(kernel 5, "same" zero padding, one filter per channel, with a bias) laid out
back on the [H, W] grid. Only dense matmuls are needed: each region gathers
its routed regions' keys/values and runs one ordinary attention.

Details the paper leaves to its code, taken as standard here (as in the
official implementation, `BiLevelRoutingAttention` with its BiFormer defaults):
  * region-level queries/keys are the mean of the region's tokens' q/k, over
    all heads' channels together (one routing per region, shared by the heads);
  * the top-k is over all S^2 regions, the region itself included as a
    candidate like any other (it is not forced in; it usually wins, since its
    pooled q and k come from the same tokens);
  * LCE kernel 5 (`lce_kernel`; 0 turns LCE off);
  * no gradient through the routing: the indices are discrete and the affinity
    A^r is under stop_gradient; q/k get their gradient from the token attention
    only (the official code's `diff_routing=False`, and its routing weights are
    not used for the output, `mul_weight="none"`);
  * the token-attention scale is 1/sqrt(head_dim) (`scale` overrides it; the
    official code scales by 1/sqrt(C), the whole width, a known quirk);
  * biases on the q/k/v and output projections (`use_bias`), as the official
    `qkv_bias=True`; the region tokens of a routed region are all of its n
    tokens (the official `kv_downsample_mode="identity"` used by BiFormer).

Layout. The pure functions take the grid form of the contract's
[batch, seq, heads, head_dim]: q/k/v [B, H, W, heads, head_dim] (tokens
row-major over the grid). Indices are [B, S^2, k] over regions numbered
row-major over the S x S region grid. Three paths compute the token attention:

  "reference"     dense [T, T] attention (T = HW, tokens in grid order) under the
                  routing mask "key region in I^r of the query's region"; quadratic
                  memory, the specification (can return the probabilities);
  "gather"        per region, gather the k routed regions' K/V ([S^2, k n] per head)
                  and attend: O(T k n) memory, dense matmuls only (the paper's form);
  "block_sparse"  `pallas_kernels.block_sparse_attention` on region-major token order
                  with block_shape (n, n) and I^r as the per-query-block lists
                  (`kernel_implementation` goes to it: "xla" on CPU, "auto", or a
                  Pallas backend).

Pallas tiles: the block-sparse kernels tile by the region, so a Pallas backend
needs n = (H/S)(W/S) tokens per region that it can tile: the GPU (Triton)
kernels a power of two >= 16 (regions 4x4, 4x8, 8x8, ...), the TPU kernels a
multiple of 128 (8x16, 16x16, ...). Naming such a backend with another region
size is an error naming the setting; "auto" falls back to the XLA path (and
logs why); "xla", "reference" and the interpret twins take any region size.
BiFormer-T at 224 px (S = 7: regions of 64, 16, 4 and 1 tokens) runs the
Pallas kernels only in its first two stages.

This family is not in the self-attention registry (`layers.attention.registry`):
its input is a 2-D grid [B, H, W, C], not a sequence, and it takes no `Mask`
or positions, so it does not fit the `TransformerBlock` contract; the BiFormer
model (zoo/vision/biformer.py) builds it directly.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from layers.linear import Linear
from pallas_kernels.block_sparse import block_sparse_attention
from pallas_kernels.flash import api as flash_api

IMPLEMENTATIONS = ("gather", "block_sparse", "reference")


# ----------------------------------------------------------------------------- regions


def region_shape(grid: Tuple[int, int], num_regions: int) -> Tuple[int, int]:
  """(H, W) and S -> the region size (H / S, W / S); errors name num_regions."""
  h, w = grid
  if isinstance(num_regions, bool) or not isinstance(num_regions, int) or num_regions <= 0:
    raise ValueError(f"num_regions must be a positive integer, got {num_regions!r}")
  if h % num_regions or w % num_regions:
    raise ValueError(f"num_regions={num_regions} (S) must divide the grid height and width, "
                     f"got a {h}x{w} grid")
  return h // num_regions, w // num_regions


def check_topk(topk: int, num_regions: int) -> None:
  if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= num_regions ** 2:
    raise ValueError(f"topk={topk!r} must be an integer in [1, num_regions^2 = "
                     f"{num_regions ** 2}] (num_regions={num_regions})")


def to_regions(x: jax.Array, num_regions: int) -> jax.Array:
  """[B, H, W, ...] -> [B, S^2, n, ...]: regions row-major over the S x S grid, the n = (H/S)(W/S)
  tokens of a region row-major inside it."""
  b, h, w = x.shape[:3]
  rest = x.shape[3:]
  s = num_regions
  rh, rw = region_shape((h, w), s)
  x = x.reshape(b, s, rh, s, rw, *rest)
  x = jnp.moveaxis(x, 3, 2)  # [B, S, S, rh, rw, ...]
  return x.reshape(b, s * s, rh * rw, *rest)


def from_regions(x: jax.Array, num_regions: int, grid: Tuple[int, int]) -> jax.Array:
  """The inverse of `to_regions`: [B, S^2, n, ...] -> [B, H, W, ...]."""
  b = x.shape[0]
  rest = x.shape[3:]
  s = num_regions
  rh, rw = region_shape(grid, s)
  x = x.reshape(b, s, s, rh, rw, *rest)
  x = jnp.moveaxis(x, 2, 3)  # [B, S, rh, S, rw, ...]
  return x.reshape(b, grid[0], grid[1], *rest)


def region_ids(grid: Tuple[int, int], num_regions: int) -> jax.Array:
  """The region of every token, row-major over the grid: int [H * W]."""
  rh, rw = region_shape(grid, num_regions)
  y, x = jnp.meshgrid(jnp.arange(grid[0]), jnp.arange(grid[1]), indexing="ij")
  return ((y // rh) * num_regions + x // rw).reshape(-1)


def region_affinity(q: jax.Array, k: jax.Array, num_regions: int) -> jax.Array:
  """A^r = Q^r (K^r)^T [B, S^2, S^2] (float32): region means of q/k, all heads' channels
  together."""
  def pooled(x):  # [B, H, W, heads, D] -> [B, S^2, heads * D]
    x = jnp.mean(to_regions(x.astype(jnp.float32), num_regions), axis=2)
    return x.reshape(x.shape[0], num_regions ** 2, -1)
  return jnp.einsum("bic,bjc->bij", pooled(q), pooled(k))


def route(q: jax.Array, k: jax.Array, num_regions: int, topk: int) -> jax.Array:
  """I^r = topkIndex(Q^r (K^r)^T): q/k [B, H, W, heads, D] -> int32 [B, S^2, topk], the routed
  regions of each region, highest affinity first (no gradient flows through the routing)."""
  check_topk(topk, num_regions)
  affinity = jax.lax.stop_gradient(region_affinity(q, k, num_regions))
  _, idx = jax.lax.top_k(affinity, topk)
  return idx.astype(jnp.int32)


def routing_mask(indices: jax.Array, num_regions: int) -> jax.Array:
  """indices [B, S^2, k] -> bool [B, S^2, S^2]: region i may read region j."""
  hot = jax.nn.one_hot(indices, num_regions ** 2, dtype=jnp.int32)  # [B, S^2, k, S^2]
  return jnp.sum(hot, axis=2) > 0


def _check_qkv(q, k, v, num_regions: int) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 5:
      raise ValueError(f"{name} must be [B, H, W, heads, head_dim], got shape {tuple(x.shape)}")
  if q.shape != k.shape or q.shape[:4] != v.shape[:4]:
    raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share "
                     "[B, H, W, heads] (and q/k the head_dim)")
  region_shape(q.shape[1:3], num_regions)


def _check_indices(indices, q, num_regions: int) -> None:
  want = (q.shape[0], num_regions ** 2)
  if indices.ndim != 3 or tuple(indices.shape[:2]) != want:
    raise ValueError(f"indices must be [B, S^2, k] = [{want[0]}, {want[1]}, k], got "
                     f"{tuple(indices.shape)}")
  check_topk(int(indices.shape[2]), num_regions)


# ----------------------------------------------------------------------------- token attention


def bra_reference(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, *,
                  num_regions: int, scale: Optional[float] = None, return_probs: bool = False):
  """The specification: dense [T, T] softmax attention under the routing mask.

  q/k/v [B, H, W, heads, D], indices [B, S^2, k] -> out [B, H, W, heads, D] (q's dtype);
  with return_probs also the probabilities [B, heads, T, T] (tokens row-major over the grid).
  """
  _check_qkv(q, k, v, num_regions)
  _check_indices(indices, q, num_regions)
  b, h, w, nh, d = q.shape
  t = h * w
  scale = d ** -0.5 if scale is None else scale
  rid = region_ids((h, w), num_regions)
  allowed = routing_mask(indices, num_regions)[:, rid][:, :, rid]  # [B, T, T]
  qf = q.reshape(b, t, nh, d).astype(jnp.float32)
  kf = k.reshape(b, t, nh, d).astype(jnp.float32)
  vf = v.reshape(b, t, nh, v.shape[-1]).astype(jnp.float32)
  s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
  s = jnp.where(allowed[:, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)  # every query sees its routed regions: no empty rows
  out = jnp.einsum("bhqk,bkhd->bqhd", p, vf).reshape(b, h, w, nh, v.shape[-1]).astype(q.dtype)
  return (out, p) if return_probs else out


def bra_gather(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, *,
               num_regions: int, scale: Optional[float] = None) -> jax.Array:
  """The paper's form: per region, gather the k routed regions' K/V and attend over their k n
  tokens (memory O(T k n) per head). Indices must be distinct within a row (top-k gives that)."""
  _check_qkv(q, k, v, num_regions)
  _check_indices(indices, q, num_regions)
  d = q.shape[-1]
  scale = d ** -0.5 if scale is None else scale
  qr = to_regions(q, num_regions)  # [B, S^2, n, heads, D]
  kr, vr = to_regions(k, num_regions), to_regions(v, num_regions)
  take = jax.vmap(lambda x, i: x[i])  # per batch: [S^2, n, h, D][S^2, k] -> [S^2, k, n, h, D]
  kg, vg = take(kr, indices), take(vr, indices)
  b, r, kk, n = kg.shape[:4]
  kg = kg.reshape(b, r, kk * n, *kg.shape[4:])
  vg = vg.reshape(b, r, kk * n, *vg.shape[4:])
  s = jnp.einsum("brqhd,brkhd->brhqk", qr, kg, preferred_element_type=jnp.float32) * scale
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  out = jnp.einsum("brhqk,brkhd->brqhd", p, vg, preferred_element_type=jnp.float32)
  return from_regions(out.astype(q.dtype), num_regions, q.shape[1:3])


def _check_kernel_tile(region: Tuple[int, int], num_regions: int, implementation: str) -> None:
  """Names the setting when a Pallas backend cannot tile by the region (see the module doc)."""
  platform = jax.default_backend()
  n = region[0] * region[1]
  what = (f"kernel_implementation={implementation!r} tiles the block-sparse kernel by the region: "
          f"num_regions={num_regions} gives {region[0]}x{region[1]} = {n} tokens per region")
  if implementation == "pallas_triton" or (implementation == "pallas" and platform == "gpu"):
    if n < 16 or n & (n - 1):
      raise ValueError(f"{what}; the GPU (Triton) kernels need a power of two >= 16 (e.g. 4x4, "
                       "8x8 regions). Choose another num_regions, kernel_implementation='auto' "
                       "(falls back to XLA) or 'xla', or implementation='gather'")
  if implementation == "pallas_tpu" or (implementation == "pallas" and platform == "tpu"):
    if n % 128:
      raise ValueError(f"{what}; the TPU kernels need a multiple of 128 (e.g. 8x16, 16x16 "
                       "regions). Choose another num_regions, kernel_implementation='auto' or "
                       "'xla', or implementation='gather'")


def bra_block_sparse(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, *,
                     num_regions: int, scale: Optional[float] = None,
                     implementation: str = "auto") -> jax.Array:
  """Region-major tokens, block_shape (n, n), I^r as the key-block list of each query block,
  shared by the heads, through `pallas_kernels.block_sparse_attention(implementation=...)`."""
  _check_qkv(q, k, v, num_regions)
  _check_indices(indices, q, num_regions)
  grid = q.shape[1:3]
  region = region_shape(grid, num_regions)
  _check_kernel_tile(region, num_regions, implementation)
  n = region[0] * region[1]

  def flat(x):  # [B, H, W, h, D] -> region-major [B, T, h, D]
    x = to_regions(x, num_regions)
    return x.reshape(x.shape[0], -1, *x.shape[3:])

  b, r, kk = indices.shape
  out = block_sparse_attention(
      flat(q), flat(k), flat(v), indices.astype(jnp.int32)[:, None],
      jnp.full((b, 1, r), kk, jnp.int32), block_shape=(n, n), scale=scale,
      implementation=implementation)
  out = out.reshape(b, r, n, *out.shape[2:])
  return from_regions(out, num_regions, grid)


def bi_level_routing_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, num_regions: int,
                               topk: int, implementation: str = "gather",
                               kernel_implementation: str = "auto",
                               scale: Optional[float] = None, return_indices: bool = False):
  """The pure function of the family (without LCE, which has parameters):
  q/k/v [B, H, W, heads, D] -> route (I^r) -> token attention [B, H, W, heads, D].

  implementation: "gather" | "block_sparse" | "reference" (module doc); kernel_implementation
  is the block-sparse kernel's backend. return_indices: also I^r [B, S^2, topk].
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
  _check_qkv(q, k, v, num_regions)
  indices = route(q, k, num_regions, topk)
  kw = dict(num_regions=num_regions, scale=scale)
  if implementation == "reference":
    out = bra_reference(q, k, v, indices, **kw)
  elif implementation == "gather":
    out = bra_gather(q, k, v, indices, **kw)
  else:
    out = bra_block_sparse(q, k, v, indices, implementation=kernel_implementation, **kw)
  return (out, indices) if return_indices else out


# ----------------------------------------------------------------------------- LCE and the module


def depthwise_conv2d(x: jax.Array, kernel: jax.Array,
                     bias: Optional[jax.Array] = None) -> jax.Array:
  """x [B, H, W, C], kernel [kh, kw, C] (one filter per channel), "same" zero padding, stride 1."""
  kh, kw, c = kernel.shape
  if x.shape[-1] != c:
    raise ValueError(f"depthwise_conv2d: x has {x.shape[-1]} channels, the kernel {c}")
  pad = ((kh // 2, (kh - 1) // 2), (kw // 2, (kw - 1) // 2))
  y = jax.lax.conv_general_dilated(
      x, kernel[:, :, None, :].astype(x.dtype), window_strides=(1, 1), padding=pad,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
  if bias is not None:
    y = y + bias.astype(x.dtype)
  return y


class DepthwiseConv2d(nnx.Module):
  """A k x k depthwise convolution with a bias, "same" padding (LCE; BiFormer's positional conv).
  Kernel [k, k, C] with fan-in (k^2) truncated-normal init, like `Linear`."""

  def __init__(self, channels: int, kernel_size: int, *, use_bias: bool = True,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size <= 0:
      raise ValueError(f"kernel_size must be a positive integer, got {kernel_size!r}")
    std = 1.0 / kernel_size / 0.87962566103423978
    w = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0,
                                          (kernel_size, kernel_size, channels), param_dtype)
    self.kernel = nnx.Param(w, logical_axes=(None, None, "embed"))
    self.bias = (nnx.Param(jnp.zeros((channels,), param_dtype), logical_axes=("embed",))
                 if use_bias else None)
    self.kernel_size = kernel_size
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    bias = None if self.bias is None else self.bias[...]
    return depthwise_conv2d(x.astype(self.dtype), self.kernel[...], bias)


class BiLevelRoutingAttention(nnx.Module):
  """BRA: x [B, H, W, d_model] -> [B, H, W, d_model] (module doc).

  num_heads x head_dim (head_dim default d_model // num_heads) is the q/k/v width C; num_regions
  is S (it must divide H and W of the input); topk in [1, S^2] (S^2: full attention);
  lce_kernel: the LCE depthwise conv's size (0: no LCE); implementation: "gather" |
  "block_sparse" | "reference"; kernel_implementation: the block-sparse kernel's backend.
  """

  def __init__(self, d_model: int, *, num_heads: int, num_regions: int, topk: int,
               head_dim: Optional[int] = None, lce_kernel: int = 5,
               implementation: str = "gather", kernel_implementation: str = "auto",
               scale: Optional[float] = None, use_bias: bool = True, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    for name, value in (("d_model", d_model), ("num_heads", num_heads)):
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if head_dim is None:
      if d_model % num_heads:
        raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}; "
                         "set head_dim explicitly")
      head_dim = d_model // num_heads
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
      raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
    if isinstance(num_regions, bool) or not isinstance(num_regions, int) or num_regions <= 0:
      raise ValueError(f"num_regions must be a positive integer, got {num_regions!r}")
    check_topk(topk, num_regions)
    if isinstance(lce_kernel, bool) or not isinstance(lce_kernel, int) or lce_kernel < 0:
      raise ValueError(f"lce_kernel must be a non-negative integer (0: no LCE), got {lce_kernel!r}")
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
    kernels = flash_api.available_implementations()
    if kernel_implementation not in kernels:
      raise ValueError(f"kernel_implementation={kernel_implementation!r} is not one of {kernels}")
    self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
    self.num_regions, self.topk, self.lce_kernel = num_regions, topk, lce_kernel
    self.implementation, self.kernel_implementation = implementation, kernel_implementation
    self.scale = scale
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Linear(d_model, (num_heads, head_dim), axes=("embed", "heads", "head_dim"), **kw)
    self.k = Linear(d_model, (num_heads, head_dim), axes=("embed", "heads", "head_dim"), **kw)
    self.v = Linear(d_model, (num_heads, head_dim), axes=("embed", "heads", "head_dim"), **kw)
    self.lce = (DepthwiseConv2d(num_heads * head_dim, lce_kernel, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs) if lce_kernel else None)
    self.o = Linear((num_heads, head_dim), d_model, axes=("heads", "head_dim", "embed"), **kw)

  def __call__(self, x: jax.Array, *, return_indices: bool = False):
    """x [B, H, W, d_model] -> [B, H, W, d_model]; return_indices: also I^r [B, S^2, topk]."""
    if x.ndim != 4 or x.shape[-1] != self.d_model:
      raise ValueError(f"BiLevelRoutingAttention expects x [B, H, W, {self.d_model}], got "
                       f"{tuple(x.shape)}")
    region_shape(x.shape[1:3], self.num_regions)
    q, k, v = self.q(x), self.k(x), self.v(x)
    out, indices = bi_level_routing_attention(
        q, k, v, num_regions=self.num_regions, topk=self.topk,
        implementation=self.implementation, kernel_implementation=self.kernel_implementation,
        scale=self.scale, return_indices=True)
    if self.lce is not None:
      b, h, w = x.shape[:3]
      lce = self.lce(v.reshape(b, h, w, -1)).reshape(out.shape)
      out = out + lce.astype(out.dtype)
    y = self.o(out)
    return (y, indices) if return_indices else y

  def region_tokens(self, grid: Tuple[int, int]) -> int:
    rh, rw = region_shape(tuple(grid), self.num_regions)
    return rh * rw

  def train_flops(self, grid: Tuple[int, int]) -> float:
    """FLOPs of one example through this layer on an H x W grid, forward + backward, beyond the
    projections' matmuls: the token attention (12 heads d x the k n keys a query reads, per
    token, PaLM-style), the LCE conv (6 k^2 C per token) and the routing affinity (forward only:
    2 S^4 C; no gradient flows through it)."""
    t = grid[0] * grid[1]
    keys = self.topk * self.region_tokens(grid)
    c = self.num_heads * self.head_dim
    flops = 12.0 * self.num_heads * self.head_dim * keys * t
    flops += 6.0 * (self.lce_kernel ** 2) * c * t if self.lce is not None else 0.0
    flops += 2.0 * self.num_regions ** 4 * c
    return flops


__all__ = ["BiLevelRoutingAttention", "DepthwiseConv2d", "bi_level_routing_attention",
           "bra_block_sparse", "bra_gather", "bra_reference", "depthwise_conv2d", "from_regions",
           "region_affinity", "region_ids", "region_shape", "route", "routing_mask",
           "to_regions"]
