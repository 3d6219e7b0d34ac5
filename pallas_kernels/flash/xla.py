"""Memory-efficient softmax attention in plain XLA: FlashAttention-2 in jax.lax.

Computes exactly what `reference.attention` computes (see its docstring for
the equations: scale, soft cap, bias, mask, sinks) without materialising the
[Tq, Tk] score matrix. Queries are cut into blocks of `block_q` rows and keys
into blocks of `block_k`; for one query block the keys are visited block by
block with an online softmax (Milakov & Gimelshein 2018; Dao 2023):

    S_j   = scores of the tile (float32), -inf where masked     [bq, bk]
    m'    = max(m, rowmax S_j)
    l'    = exp(m - m') l + rowsum exp(S_j - m')
    acc'  = exp(m - m') acc + exp(S_j - m') V_j
    O     = acc / l,    lse = m + log l

starting from m = -inf, l = 0, acc = 0 -- or, with a sink logit, from
m = sink, l = 1, which is how the sink joins the denominator without a value.

The backward pass (a `jax.custom_vjp`) keeps only O and lse from the forward
and recomputes each tile (FlashAttention-2, Algorithm 2):

    P_ij  = exp(S_ij - lse_i)
    dV_j += P^T dO_i
    dP    = dO_i V_j^T
    dS    = P * (dP - delta_i),   delta_i = rowsum(dO_i * O_i) - dlse_i
    dQ_i += scale * dS' K_j,   dK_j += scale * dS'^T Q_i     (dS' = dS * tanh' if capped)

dS itself is the bias gradient, and d sink_h = -sum_i exp(sink_h - lse_i) delta_i.
The key-block loop is the outer one, carrying the dQ accumulator, so each tile
costs five matmuls and memory stays O(T) (plus one tile) in both passes.

Layout. Grouped-query attention reads K/V once per kv head: the Hq query heads
are viewed as [Hkv, G] and a tile is [Bs, Hs, G, bq, bk] (float32), so K and V
are never repeated. (Bs, Hs) is a slab of the batch and kv heads: on
accelerators the whole of [B, Hkv], on CPU a cache-sized part, looped over
(`default_slab`). Each slab is cut from the caller's [B, T, H, D] arrays and
written back in one fused transposing copy.

Masks come tile by tile from `masking.visible`; a tile with no visible pair
skips its matmuls (`lax.cond`), so causal attention costs about half of
bidirectional. Ragged lengths are padded to whole blocks inside a slab and the
padded keys masked; padded query rows are dropped. When both sequences fit in
one block (the default up to 512 tokens) there are no block loops, no padding
and no conditionals: the path is then the dense computation with a recomputing
backward, which is what the language models train with.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash import masking
from pallas_kernels.flash import reference

# 512 x 512 float32 tiles keep the matmuls large enough to run near the
# machine's matmul speed on CPU while a tile per (batch, head) stays at 1 MiB;
# 256 and 1024 measured slower at T = 512 .. 8192 on the 2-core CPU machines.
DEFAULT_BLOCK = 512

_F32 = jnp.float32


def default_block(length: int, target: int = DEFAULT_BLOCK) -> int:
  """The block size for a sequence: the fewest blocks of at most `target`, balanced.

  Balancing (600 -> 2 x 304 rather than 512 + 88 padded to 1024) keeps the
  padding under 8 rows per block; sizes are multiples of 8 once there is more
  than one block, and a sequence that fits is one block of its own length.
  """
  n = -(-length // target)
  if n <= 1:
    return max(length, 1)
  size = -(-length // n)
  return -(-size // 8) * 8


@dataclasses.dataclass(frozen=True)
class _Config:
  """The static settings of one call (hashable: the custom_vjp's nondiff argument)."""

  scale: float
  logits_soft_cap: Optional[float]
  block_q: int
  block_k: int
  block_b: int  # batch elements per slab
  block_h: int  # kv heads per slab
  tq: int  # true lengths, before padding to whole blocks
  tk: int

  @property
  def tq_padded(self) -> int:
    return -(-self.tq // self.block_q) * self.block_q

  @property
  def tk_padded(self) -> int:
    return -(-self.tk // self.block_k) * self.block_k


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask_args: Optional[masking.MaskArgs] = None,
    bias: Optional[jax.Array] = None,
    scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None,
    distance_bias: Optional[jax.Array] = None,
    return_lse: bool = False,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    block_b: Optional[int] = None,
    block_h: Optional[int] = None,
):
  """Memory-efficient attention; same contract as `reference.attention`.

  q: [B, Tq, Hq, D]; k: [B, Tk, Hkv, D]; v: [B, Tk, Hkv, Dv]; Hq % Hkv == 0.
  bias broadcasts against [B, Hq, Tq, Tk] (its head axis is 1 or Hq);
  sinks: [Hq]; distance_bias: [Hq, 3] (slope, power, center), evaluated per
  tile from the positions (never rendered dense). Returns out [B, Tq, Hq, Dv]
  in q.dtype, and with `return_lse` also lse [B, Hq, Tq] float32.
  Differentiable in q, k, v, bias, sinks and distance_bias.

  block_q / block_k: query / key rows per tile (default `default_block`).
  block_b / block_h: batch elements / kv heads per tile (default
  `default_slab`: all of them on accelerators, a cache-sized slab on CPU);
  each must divide its axis, and block_h < Hkv needs block_b == 1.
  """
  reference.check_qkv(q, k, v)
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  if logits_soft_cap is not None and not logits_soft_cap > 0:
    raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
  if sinks is not None:
    reference.check_sinks(sinks, q)
  for name, block in (("block_q", block_q), ("block_k", block_k), ("block_b", block_b),
                      ("block_h", block_h)):
    if block is not None and (not isinstance(block, int) or block <= 0):
      raise ValueError(f"{name} must be a positive int, got {block!r}")
  if bias is not None:
    bias = reference.check_bias(bias, q, k)
  if mask_args is not None and mask_args.is_trivial:
    mask_args = None
  if distance_bias is not None:
    reference.check_distance_bias(distance_bias, q)
    if mask_args is None or mask_args.q_positions is None:
      # Positions alone restrict nothing (masking.visible applies no rule to them).
      q_pos, kv_pos = reference.positions(mask_args, b, tq, tk)
      mask_args = dataclasses.replace(mask_args or masking.MaskArgs(), q_positions=q_pos,
                                      kv_positions=kv_pos)
  block_q = max(min(block_q, tq), 1) if block_q else default_block(tq)
  block_k = max(min(block_k, tk), 1) if block_k else default_block(tk)
  auto_b, auto_h = default_slab(b, hkv, hq // hkv, block_q, block_k, jax.default_backend())
  block_b = auto_b if block_b is None else block_b
  block_h = auto_h if block_h is None else block_h
  if b % block_b or hkv % block_h or (block_h < hkv and block_b > 1):
    raise ValueError(
        f"block_b={block_b} must divide the batch ({b}) and block_h={block_h} the kv heads"
        f" ({hkv}); block_h < kv heads needs block_b == 1")
  cfg = _Config(
      scale=float(d ** -0.5 if scale is None else scale),
      logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
      block_q=block_q, block_k=block_k, block_b=block_b, block_h=block_h, tq=tq, tk=tk)
  if tq == 0 or tk == 0:
    # Nothing to tile: no queries, or no keys (then every row is empty).
    out = jnp.zeros((b, tq, hq, v.shape[3]), q.dtype)
    lse = jnp.full((b, hq, tq), -jnp.inf, _F32)
    if sinks is not None:
      lse = jnp.broadcast_to(sinks.astype(_F32)[None, :, None], (b, hq, tq))
    return (out, lse) if return_lse else out
  out, lse = _flash(cfg, q, k, v, bias, sinks, distance_bias, mask_args)
  if return_lse:
    return out, lse.reshape(b, hq, -1)[:, :, :tq]
  return out


# ---------------------------------------------------------------------------
# Layout helpers.


def _grouped_bias(bias4, hkv, cfg):
  """[B|1, Hq|1, Tq|1, Tk|1] -> [B|1, Hkv|1, G|1, Tq_padded|1, Tk_padded|1]."""
  bb, hb, tqb, tkb = bias4.shape
  g = 1 if hb == 1 else hb // hkv
  x = bias4.reshape(bb, hb // g, g, tqb, tkb)
  if tqb > 1:
    x = _pad_axis(x, 3, cfg.tq_padded)
  if tkb > 1:
    x = _pad_axis(x, 4, cfg.tk_padded)
  return x


def _distance_tile(dist, mask_args, q_idx, k_idx):
  """The distance bias of one tile, [Bs, Hs, G, bq, bk] f32, from params dist [Hs, G, 3]."""
  hs, g = dist.shape[:2]
  take = lambda x, idx: jnp.take(x, jnp.clip(idx, 0, x.shape[1] - 1), axis=1)  # noqa: E731
  qp, kp = take(mask_args.q_positions, q_idx), take(mask_args.kv_positions, k_idx)
  tile = reference.distance_bias_dense(dist.reshape(hs * g, 3), qp, kp)
  return tile.reshape(tile.shape[0], hs, g, *tile.shape[2:])


def _tile_bias(bias, dist, mask_args, i, j, bq, bk):
  """The additive bias of tile (i, j): the dense bias's block plus the distance bias, or None."""
  bias_t = None if bias is None else _block(_block(bias, 3, i * bq, bq), 4, j * bk, bk)
  if dist is None:
    return bias_t
  dist_t = _distance_tile(dist, mask_args, i * bq + jnp.arange(bq), j * bk + jnp.arange(bk))
  return dist_t if bias_t is None else bias_t.astype(_F32) + dist_t


def _pad_axis(x, axis, size):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _block(x, axis, start, size):
  """The block [start, start + size) of `x` along `axis`; a broadcast (size-1) axis is kept."""
  if x.shape[axis] == 1 or x.shape[axis] == size:
    return x
  return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _tile_visibility(mask_args, q_idx, k_idx, cfg, hkv, g):
  """Visible pairs of one tile as [B|1, Hkv|1, G|1, bq, bk] bool, or None if all are."""
  key_bound = cfg.tk if cfg.tk_padded > cfg.tk else None
  if mask_args is None:
    if key_bound is None:
      return None
    return (k_idx < key_bound)[None, None, None, None, :]
  vis = masking.visible(mask_args, q_idx, k_idx, tk=key_bound)
  if vis is None:
    return None
  bv, hv, bq, bk = vis.shape
  if hv == 1:
    return vis[:, :, None]
  return vis.reshape(bv, hkv, g, bq, bk)


# ---------------------------------------------------------------------------
# One tile, forward and backward.


def _scores(cfg, q_t, k_t, bias_t, vis):
  """S = cap * tanh(scale Q K^T / cap) + bias, -inf where invisible: [B, Hkv, G, bq, bk] f32.

  Also returns tanh(scale Q K^T / cap) (None without a cap), which the
  backward needs for the cap's derivative.
  """
  s = jnp.einsum("bhgqd,bhkd->bhgqk", q_t, k_t, preferred_element_type=_F32) * cfg.scale
  capped = None
  if cfg.logits_soft_cap is not None:
    capped = jnp.tanh(s / cfg.logits_soft_cap)
    s = cfg.logits_soft_cap * capped
  if bias_t is not None:
    s = s + bias_t.astype(_F32)
  if vis is not None:
    s = jnp.where(vis, s, -jnp.inf)
  return s, capped


def _online_softmax_step(carry, s, v_t):
  """Folds one tile of scores into the running (max m, denominator l, numerator acc)."""
  m, l, acc = carry
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  # A row that has seen only -inf keeps m = -inf; shift it by 0 so that
  # exp(-inf - shift) is 0 rather than exp(nan).
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp(s - shift[..., None])
  alpha = jnp.exp(m - shift)
  l = alpha * l + jnp.sum(p, axis=-1)
  pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v_t.dtype), v_t, preferred_element_type=_F32)
  return m_new, l, alpha[..., None] * acc + pv


def _tile_grads(cfg, q_t, k_t, v_t, do_t, lse_t, delta_t, bias_t, vis):
  """Gradient contributions of one tile.

  Returns dq^T [.., D, G, bq], dk [.., bk, D], dv [.., bk, Dv] (f32) and dS
  [.., G, bq, bk] (the bias gradient). The tile is computed keys-first,
  S^T = K Q^T laid out [.., bk, G, bq]: then dV = P^T dO, dK = dS^T Q and
  dQ^T = K^T dS^T all read the big operand as it lies, and XLA transposes only
  [bk|bq, D] blocks, never a [bq, bk] one (on CPU each such transpose is one
  more pass over the tile).
  """
  keys_first = lambda x: jnp.moveaxis(x, -1, 2)  # [.., G, bq, bk] -> [.., bk, G, bq]
  s = jnp.einsum("bhkd,bhgqd->bhkgq", k_t, q_t, preferred_element_type=_F32) * cfg.scale
  capped = None
  if cfg.logits_soft_cap is not None:
    capped = jnp.tanh(s / cfg.logits_soft_cap)
    s = cfg.logits_soft_cap * capped
  if bias_t is not None:
    s = s + keys_first(bias_t).astype(_F32)
  if vis is not None:
    s = jnp.where(keys_first(vis), s, -jnp.inf)
  p = jnp.exp(s - lse_t[:, :, None])
  dv = jnp.einsum("bhkgq,bhgqd->bhkd", p.astype(do_t.dtype), do_t, preferred_element_type=_F32)
  dp = jnp.einsum("bhkd,bhgqd->bhkgq", v_t, do_t, preferred_element_type=_F32)
  ds = p * (dp - delta_t[:, :, None])
  dlogits = ds if capped is None else ds * (1.0 - capped * capped)
  dlogits = (dlogits * cfg.scale).astype(q_t.dtype)
  dk = jnp.einsum("bhkgq,bhgqd->bhkd", dlogits, q_t, preferred_element_type=_F32)
  dq_t = jnp.einsum("bhkd,bhkgq->bhdgq", k_t, dlogits, preferred_element_type=_F32)
  return dq_t, dk, dv, jnp.moveaxis(ds, 2, -1)


def _reduce_to(x, shape):
  """Sums the axes of `x` that `shape` broadcasts (size 1), keeping them."""
  axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _skip_if_invisible(vis, single_tile, compute, skip, *operands):
  """`compute(*operands)` unless the tile has no visible pair (then `skip`).

  A single tile is always computed: a conditional would only cost copies there.
  """
  if vis is None or single_tile:
    return compute(*operands)
  return lax.cond(jnp.any(vis), compute, skip, *operands)


# ---------------------------------------------------------------------------
# Slabs: which (batch, kv head) pairs one step of the outer loop covers.


def default_slab(batch: int, kv_heads: int, group: int, block_q: int, block_k: int,
                 platform: str) -> Tuple[int, int]:
  """(batch elements, kv heads) per slab: how much of [B, Hkv] one tile spans.

  On accelerators a tile spans every batch element and head, so each op is as
  large as possible. On CPU a [B, Hq, bq, bk] tile quickly outgrows the caches
  (B=8, H=8, 512 x 512 is 64 MiB), and the five passes over it run at memory
  speed; looping over slabs of about `CPU_TILE_ELEMENTS` scores (2 MiB, an L2
  and a bit) measured about twice as fast on a 2-core EPYC. One kv head's
  query group is never split, and a slab spans several batch elements only
  when it spans all heads.
  """
  if platform != "cpu":
    return batch, kv_heads
  per_head = group * block_q * block_k
  heads = max([h for h in _divisors(kv_heads) if h * per_head <= CPU_TILE_ELEMENTS], default=1)
  if heads < kv_heads:
    return 1, heads
  per_batch = kv_heads * per_head
  return max([b for b in _divisors(batch) if b * per_batch <= CPU_TILE_ELEMENTS], default=1), kv_heads


CPU_TILE_ELEMENTS = 512 * 1024


def _divisors(n):
  return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class _Slab:
  """Slab `index` of a call: batch rows [b0, b0 + Bs), kv heads [h0, h0 + Hs).

  Slabs are cut straight from the caller's [B, T, H, D] arrays and written
  straight back, so the move to the head-major tile layout is one fused copy
  per slab (never a whole head-major copy of q, k, v and dO).
  """

  cfg: _Config
  kv_heads: int
  group: int
  index: Union[int, jax.Array]

  @property
  def b0(self):
    return (self.index // (self.kv_heads // self.cfg.block_h)) * self.cfg.block_b

  @property
  def h0(self):
    return (self.index % (self.kv_heads // self.cfg.block_h)) * self.cfg.block_h

  def _rows_heads(self, x, head_axis, per_head):
    x = _block(x, 0, self.b0, self.cfg.block_b)
    return _block(x, head_axis, self.h0 * per_head, self.cfg.block_h * per_head)

  def queries(self, x):
    """[B, Tq, Hq, D] -> [Bs, Hs, G, Tq_padded, D] (query head h = kv * G + g)."""
    x = self._rows_heads(x, 2, self.group)
    bs, t, _, d = x.shape
    x = x.reshape(bs, t, self.cfg.block_h, self.group, d).transpose(0, 2, 3, 1, 4)
    return _pad_axis(x, 3, self.cfg.tq_padded)

  def keys(self, x):
    """[B, Tk, Hkv, D] -> [Bs, Hs, Tk_padded, D]."""
    x = self._rows_heads(x, 2, 1).transpose(0, 2, 1, 3)
    return _pad_axis(x, 2, self.cfg.tk_padded)

  def rows(self, x):
    """[B, Hkv, G, Tq_padded] -> [Bs, Hs, G, Tq_padded] (lse, delta)."""
    return self._rows_heads(x, 1, 1)

  def put_queries(self, buf, x):
    """Writes [Bs, Hs, G, Tq_padded, D] into buf [B, Tq, Hq, D] (and casts to its dtype)."""
    bs, hs, g, _, d = x.shape
    x = x[:, :, :, :self.cfg.tq].transpose(0, 3, 1, 2, 4).reshape(bs, self.cfg.tq, hs * g, d)
    return _put(buf, x.astype(buf.dtype), (self.b0, 0, self.h0 * g, 0))

  def put_keys(self, buf, x):
    """Writes [Bs, Hs, Tk_padded, D] into buf [B, Tk, Hkv, D]."""
    x = x[:, :, :self.cfg.tk].transpose(0, 2, 1, 3)
    return _put(buf, x.astype(buf.dtype), (self.b0, 0, self.h0, 0))

  def put_rows(self, buf, x):
    return _put(buf, x, (self.b0, self.h0, 0, 0))

  def of_bias(self, bias_g):
    """[B|1, Hkv|1, G|1, Tq|1, Tk|1] -> this slab's part."""
    return None if bias_g is None else self._rows_heads(bias_g, 1, 1)

  def of_heads(self, x):
    """Per-head values [Hkv, G, ...] (sinks, distance-bias params) -> [Hs, G, ...]."""
    return None if x is None else _block(x, 0, self.h0, self.cfg.block_h)

  def of_mask(self, m):
    if m is None:
      return None
    rows = lambda x: None if x is None else _block(x, 0, self.b0, self.cfg.block_b)
    heads = lambda x: None if x is None else self._rows_heads(x, 1, self.group)  # noqa: E731
    return dataclasses.replace(
        m, q_segment_ids=rows(m.q_segment_ids), kv_segment_ids=rows(m.kv_segment_ids),
        q_positions=rows(m.q_positions), kv_positions=rows(m.kv_positions),
        prefix_lengths=rows(m.prefix_lengths), kv_lengths=rows(m.kv_lengths),
        dense=heads(m.dense), block_mask=heads(m.block_mask))


def _put(buf, x, starts):
  """buf with x written at `starts`; x itself when it is the whole of buf."""
  if x.shape == buf.shape:
    return x
  return lax.dynamic_update_slice(buf, x, [jnp.asarray(i, jnp.int32) for i in starts])


def _for_each_slab(cfg, batch, kv_heads, group, body, carry):
  """carry = body(slab, carry) for every slab, in a loop unless there is only one."""
  n = (batch // cfg.block_b) * (kv_heads // cfg.block_h)
  if n == 1:
    return body(_Slab(cfg, kv_heads, group, 0), carry)
  return lax.fori_loop(0, n, lambda i, c: body(_Slab(cfg, kv_heads, group, i), c), carry)


# ---------------------------------------------------------------------------
# The loops over blocks, within one slab.


def _forward_slab(cfg, q, k, v, bias, sinks, dist, mask_args):
  """One slab: q [Bs, Hs, G, Tq_p, D], k/v [Bs, Hs, Tk_p, D|Dv] -> out (q.dtype), lse (f32)."""
  bs, hs, g = q.shape[:3]
  dv = v.shape[-1]
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = cfg.tq_padded // bq, cfg.tk_padded // bk
  if sinks is None:
    m0, l0 = jnp.full((bs, hs, g, bq), -jnp.inf, _F32), jnp.zeros((bs, hs, g, bq), _F32)
  else:
    m0 = jnp.broadcast_to(sinks[None, :, :, None], (bs, hs, g, bq))
    l0 = jnp.ones((bs, hs, g, bq), _F32)
  acc0 = jnp.zeros((bs, hs, g, bq, dv), _F32)

  def q_block(i):
    q_t = _block(q, 3, i * bq, bq)
    q_idx = i * bq + jnp.arange(bq)

    def k_step(j, carry):
      vis = _tile_visibility(mask_args, q_idx, j * bk + jnp.arange(bk), cfg, hs, g)
      bias_t = _tile_bias(bias, dist, mask_args, i, j, bq, bk)

      def update(c):
        s, _ = _scores(cfg, q_t, _block(k, 2, j * bk, bk), bias_t, vis)
        return _online_softmax_step(c, s, _block(v, 2, j * bk, bk))

      return _skip_if_invisible(vis, nq == nk == 1, update, lambda c: c, carry)

    carry = (m0, l0, acc0)
    carry = k_step(0, carry) if nk == 1 else lax.fori_loop(0, nk, k_step, carry)
    m, l, acc = carry
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return out.astype(q.dtype), lse

  if nq == 1:
    return q_block(0)
  out, lse = lax.map(q_block, jnp.arange(nq))  # [nq, Bs, Hs, G, bq, ...]
  out = jnp.moveaxis(out, 0, 3).reshape(bs, hs, g, cfg.tq_padded, dv)
  return out, jnp.moveaxis(lse, 0, 3).reshape(bs, hs, g, cfg.tq_padded)


def _backward_slab(cfg, q, k, v, do, lse, delta, bias, dist, mask_args):
  """One slab's (dq, dk, dv, dbias, ddist), f32, in the slab layout; lse is finite (see _backward).

  The distance bias's parameter gradient is the VJP of one tile's bias with dS.
  """
  bs, hs, g = q.shape[:3]
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = cfg.tq_padded // bq, cfg.tk_padded // bk

  def k_block(j, dq, dbias, ddist):
    k_t, v_t = _block(k, 2, j * bk, bk), _block(v, 2, j * bk, bk)
    k_idx = j * bk + jnp.arange(bk)

    def q_step(i, carry):
      dk, dv, dq, dbias, ddist = carry
      q_idx = i * bq + jnp.arange(bq)
      vis = _tile_visibility(mask_args, q_idx, k_idx, cfg, hs, g)
      bias_t = _tile_bias(bias, dist, mask_args, i, j, bq, bk)
      q_t, do_t = _block(q, 3, i * bq, bq), _block(do, 3, i * bq, bq)
      lse_t, delta_t = _block(lse, 3, i * bq, bq), _block(delta, 3, i * bq, bq)
      dense_shape = None if bias is None else _block(_block(bias, 3, 0, bq), 4, 0, bk).shape

      def grads():
        dq_t, dk_t, dv_t, ds = _tile_grads(cfg, q_t, k_t, v_t, do_t, lse_t, delta_t, bias_t, vis)
        db_t = None if bias is None else _reduce_to(ds, dense_shape)
        dd_t = None
        if dist is not None:
          _, vjp = jax.vjp(lambda d: _distance_tile(d, mask_args, q_idx, k_idx), dist)
          (dd_t,) = vjp(ds)
        return dq_t, dk_t, dv_t, db_t, dd_t

      def zeros():
        return (jnp.zeros(dq.shape[:3] + (g, bq), _F32), jnp.zeros(k_t.shape, _F32),
                jnp.zeros(v_t.shape, _F32),
                None if bias is None else jnp.zeros(dense_shape, _F32),
                None if dist is None else jnp.zeros(dist.shape, _F32))

      # Only tile-sized values cross the conditional; the accumulators are
      # updated outside it so that XLA never copies them per tile.
      dq_t, dk_t, dv_t, db_t, dd_t = _skip_if_invisible(vis, nq == nk == 1, grads, zeros)
      dq = _accumulate(dq, dq_t, {4: i * bq})
      if dbias is not None:
        dbias = _accumulate(dbias, db_t, {3: i * bq, 4: j * bk})
      if ddist is not None:
        ddist = ddist + dd_t
      return dk + dk_t, dv + dv_t, dq, dbias, ddist

    carry = (jnp.zeros(k_t.shape, _F32), jnp.zeros(v_t.shape, _F32), dq, dbias, ddist)
    return q_step(0, carry) if nq == 1 else lax.fori_loop(0, nq, q_step, carry)

  dq0 = jnp.zeros((bs, hs, q.shape[-1], g, cfg.tq_padded), _F32)  # dQ^T, see _tile_grads
  dbias0 = None if bias is None else jnp.zeros(bias.shape, _F32)
  ddist0 = None if dist is None else jnp.zeros(dist.shape, _F32)
  if nk == 1:
    dk, dv, dq, dbias, ddist = k_block(0, dq0, dbias0, ddist0)
    return jnp.moveaxis(dq, 2, -1), dk, dv, dbias, ddist

  def scan_step(carry, j):
    dk, dv, dq, dbias, ddist = k_block(j, *carry)
    return (dq, dbias, ddist), (dk, dv)

  (dq, dbias, ddist), (dk, dv) = lax.scan(scan_step, (dq0, dbias0, ddist0), jnp.arange(nk))
  unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(bs, hs, cfg.tk_padded, x.shape[-1])
  return jnp.moveaxis(dq, 2, -1), unblock(dk), unblock(dv), dbias, ddist


# ---------------------------------------------------------------------------
# The whole call: layouts, slabs, and the pieces outside the loops.


def _forward(cfg, q, k, v, bias, sinks, dist, mask_args):
  """Returns out [B, Tq, Hq, Dv] (q.dtype) and lse [B, Hkv, G, Tq_padded] f32 (-inf: empty row)."""
  b, tq, hq, _ = q.shape
  hkv, dv = v.shape[2], v.shape[3]
  g = hq // hkv
  bias_g = None if bias is None else _grouped_bias(bias, hkv, cfg)
  sinks_g = None if sinks is None else sinks.astype(_F32).reshape(hkv, g)
  dist_g = None if dist is None else dist.astype(_F32).reshape(hkv, g, 3)

  def slab_forward(slab, carry):
    out, lse = carry
    out_s, lse_s = _forward_slab(cfg, slab.queries(q), slab.keys(k), slab.keys(v),
                                 slab.of_bias(bias_g), slab.of_heads(sinks_g),
                                 slab.of_heads(dist_g), slab.of_mask(mask_args))
    return slab.put_queries(out, out_s), slab.put_rows(lse, lse_s)

  carry = (jnp.zeros((b, tq, hq, dv), q.dtype), jnp.zeros((b, hkv, g, cfg.tq_padded), _F32))
  return _for_each_slab(cfg, b, hkv, g, slab_forward, carry)


def _backward(cfg, res, cotangents):
  """Cotangents of (q, k, v, bias, sinks, dist, mask_args) from those of (out, lse)."""
  q, k, v, bias, sinks, dist, mask_args, out, lse = res
  d_out, d_lse = cotangents
  b, _, hq, _ = q.shape
  hkv = v.shape[2]
  g = hq // hkv
  # delta_i = rowsum(dO_i * O_i) - dlse_i, in the [B, Hkv, G, Tq_padded] layout of lse.
  delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1)  # [B, Tq, Hq]
  delta = delta.reshape(b, -1, hkv, g).transpose(0, 2, 3, 1)
  delta = _pad_axis(delta, 3, cfg.tq_padded) - d_lse.astype(_F32)
  # Every pair of an empty row (lse = -inf) has S = -inf; any finite shift makes P = 0 there.
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  bias_g = None if bias is None else _grouped_bias(bias, hkv, cfg)

  dist_g = None if dist is None else dist.astype(_F32).reshape(hkv, g, 3)

  def slab_backward(slab, carry):
    dq, dk, dv, dbias, ddist = carry
    # Padded query rows get dO = 0 and therefore contribute nothing to dK, dV.
    dq_s, dk_s, dv_s, dbias_s, ddist_s = _backward_slab(
        cfg, slab.queries(q), slab.keys(k), slab.keys(v), slab.queries(d_out),
        slab.rows(lse_safe), slab.rows(delta), slab.of_bias(bias_g), slab.of_heads(dist_g),
        slab.of_mask(mask_args))
    if dbias is not None:
      dbias = _accumulate(dbias, dbias_s, {0: slab.b0, 1: slab.h0})
    if ddist is not None:
      ddist = _accumulate(ddist, ddist_s, {0: slab.h0})
    return (slab.put_queries(dq, dq_s), slab.put_keys(dk, dk_s), slab.put_keys(dv, dv_s), dbias,
            ddist)

  carry = (jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v),
           None if bias_g is None else jnp.zeros(bias_g.shape, _F32),
           None if dist_g is None else jnp.zeros(dist_g.shape, _F32))
  dq, dk, dv, dbias, ddist = _for_each_slab(cfg, b, hkv, g, slab_backward, carry)
  dbias_out = None
  if bias is not None:
    dbias_out = dbias[..., :bias.shape[2], :bias.shape[3]].reshape(bias.shape).astype(bias.dtype)
  dsinks = None
  if sinks is not None:
    p_sink = jnp.exp(sinks.astype(_F32).reshape(1, hkv, g, 1) - lse)
    dsinks = -jnp.sum(p_sink * delta, axis=(0, 3)).reshape(hq).astype(sinks.dtype)
  ddist_out = None if dist is None else ddist.reshape(hq, 3).astype(dist.dtype)
  return dq, dk, dv, dbias_out, dsinks, ddist_out, None


def _accumulate(acc, x, starts):
  """acc[block at `starts` (axis -> offset)] += x; broadcast (size-1) axes start at 0."""
  if acc.shape == x.shape:
    return acc + x
  idx = [jnp.asarray(starts[a] if a in starts and acc.shape[a] != x.shape[a] else 0, jnp.int32)
         for a in range(acc.ndim)]
  return lax.dynamic_update_slice(acc, lax.dynamic_slice(acc, idx, x.shape) + x, idx)


# ---------------------------------------------------------------------------
# The differentiable function.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, bias, sinks, dist, mask_args):
  """(out, lse): the forward pass; gradients by `_backward`."""
  return _forward(cfg, q, k, v, bias, sinks, dist, mask_args)


def _flash_fwd(cfg, q, k, v, bias, sinks, dist, mask_args):
  out, lse = _forward(cfg, q, k, v, bias, sinks, dist, mask_args)
  # Only O(T) residuals: the inputs, the output and the log-sum-exp.
  return (out, lse), (q, k, v, bias, sinks, dist, mask_args, out, lse)


_flash.defvjp(_flash_fwd, _backward)
