"""Which (query, key) pairs may attend: the one definition every path shares.

Masks are data (ARCHITECTURE.md, "The attention contract", point 4). A mask is
a few static settings plus small per-token arrays; nothing here builds a traced
[T, T] mask unless asked for a dense rendering. The reference renders the whole
matrix with `visible`; the memory-efficient and Pallas paths call the same
function on one [block_q, block_k] tile at a time.

Conventions (all paths follow them):
  * Positions are integer ids per token, `q_positions: [B, Tq]`,
    `kv_positions: [B, Tk]`. By default keys sit at 0..Tk-1 and queries are the
    *last* Tq of them (bottom-right alignment, as in FlashAttention 2), so a
    decode step with Tq=1 sees the whole cache under a causal mask.
  * causal:          kv_pos <= q_pos.
  * window (l, r):   q_pos - l <= kv_pos <= q_pos + r; None on a side = unbounded.
  * chunk_size c:    q_pos // c == kv_pos // c (chunked local attention).
  * prefix_lengths:  prefix-LM; key positions < prefix_lengths[b] are visible to
                     every query even under the causal rule (bidirectional prefix).
  * segment ids:     q_seg == kv_seg (packed sequences never see each other).
  * kv_lengths:      padding; key *indices* >= kv_lengths[b] are invisible.
  * dense mask:      an explicit boolean [B|1, H|1, Tq, Tk] (reference style).
  * block mask:      a boolean [B|1, H|1, nq, nk] over (block_q, block_k) tiles
                     (`block_shape`): block-sparse attention; token (i, j) is
                     visible only if its tile is. AND-ed with the rules above.
A query row with no visible key outputs zeros and has zero gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp

Window = Optional[Union[int, Tuple[Optional[int], Optional[int]]]]


def normalize_window(window: Window, is_causal: bool) -> Optional[Tuple[Optional[int], Optional[int]]]:
  """`local_window_size` as (left, right). An int w means (w, 0) if causal else (w, w)."""
  if window is None:
    return None
  if isinstance(window, int):
    if window < 0:
      raise ValueError(f"local_window_size must be >= 0, got {window}")
    return (window, 0 if is_causal else window)
  if len(window) != 2:
    raise ValueError(f"local_window_size must be an int or a (left, right) pair, got {window!r}")
  left, right = window
  for side in (left, right):
    if side is not None and side < 0:
      raise ValueError(f"local_window_size sides must be >= 0 or None, got {window!r}")
  if left is None and right is None:
    return None
  return (left, right)


@dataclasses.dataclass(frozen=True)
class MaskArgs:
  """The static part of a mask plus its per-token arrays, already normalised."""

  is_causal: bool = False
  window: Optional[Tuple[Optional[int], Optional[int]]] = None
  chunk_size: Optional[int] = None
  q_segment_ids: Optional[jax.Array] = None  # [B, Tq]
  kv_segment_ids: Optional[jax.Array] = None  # [B, Tk]
  q_positions: Optional[jax.Array] = None  # [B, Tq]
  kv_positions: Optional[jax.Array] = None  # [B, Tk]
  prefix_lengths: Optional[jax.Array] = None  # [B]
  kv_lengths: Optional[jax.Array] = None  # [B]
  dense: Optional[jax.Array] = None  # [B|1, H|1, Tq, Tk] bool
  block_mask: Optional[jax.Array] = None  # [B|1, H|1, nq, nk] bool
  block_shape: Optional[Tuple[int, int]] = None  # (block_q, block_k) of block_mask

  @property
  def is_trivial(self) -> bool:
    # `is`, not `in (None, False)`: `in` compares arrays with ==, which raises.
    return all(
        getattr(self, f.name) is None or getattr(self, f.name) is False
        for f in dataclasses.fields(self))


# A pytree, so that a MaskArgs passes through jit, vmap and custom_vjp: the
# arrays are leaves, the rule settings are static.
jax.tree_util.register_dataclass(
    MaskArgs,
    data_fields=["q_segment_ids", "kv_segment_ids", "q_positions", "kv_positions",
                 "prefix_lengths", "kv_lengths", "dense", "block_mask"],
    meta_fields=["is_causal", "window", "chunk_size", "block_shape"])


def make_mask_args(
    batch: int,
    tq: int,
    tk: int,
    *,
    is_causal: bool = False,
    local_window_size: Window = None,
    chunk_size: Optional[int] = None,
    segment_ids=None,
    q_positions=None,
    kv_positions=None,
    prefix_lengths=None,
    kv_lengths=None,
    mask=None,
    num_heads: Optional[int] = None,
    block_mask=None,
    block_shape: Optional[Tuple[int, int]] = None,
) -> MaskArgs:
  """Validates the user-facing mask arguments and fills in default positions.

  `segment_ids` is one [B, T] array (self-attention) or a (q_seg, kv_seg) pair.
  `num_heads` (the query head count), when given, also checks the head axis of
  a dense `mask`.
  """
  window = normalize_window(local_window_size, is_causal)
  if chunk_size is not None and chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  q_seg = kv_seg = None
  if segment_ids is not None:
    if isinstance(segment_ids, (tuple, list)):
      q_seg, kv_seg = segment_ids
    else:
      if tq != tk:
        raise ValueError(
            "segment_ids as one array needs Tq == Tk; pass (q_segment_ids, kv_segment_ids)"
            f" for Tq={tq}, Tk={tk}")
      q_seg = kv_seg = segment_ids
    _check_shape("q segment_ids", q_seg, (batch, tq))
    _check_shape("kv segment_ids", kv_seg, (batch, tk))
  needs_positions = is_causal or window is not None or chunk_size is not None or prefix_lengths is not None
  if needs_positions or q_positions is not None or kv_positions is not None:
    if kv_positions is None:
      kv_positions = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (batch, tk))
    if q_positions is None:
      q_positions = jnp.broadcast_to(jnp.arange(tk - tq, tk, dtype=jnp.int32), (batch, tq))
    _check_shape("q_positions", q_positions, (batch, tq))
    _check_shape("kv_positions", kv_positions, (batch, tk))
  if prefix_lengths is not None:
    _check_shape("prefix_lengths", prefix_lengths, (batch,))
  if kv_lengths is not None:
    _check_shape("kv_lengths", kv_lengths, (batch,))
  if mask is not None:
    heads_ok = num_heads is None or mask.ndim < 2 or mask.shape[1] in (1, num_heads)
    if (mask.ndim != 4 or mask.shape[-2:] != (tq, tk) or mask.shape[0] not in (1, batch)
        or not heads_ok):
      raise ValueError(
          f"mask must be [B|1={batch}, H|1={num_heads or 'H'}, Tq={tq}, Tk={tk}],"
          f" got {tuple(mask.shape)}")
    mask = mask.astype(bool)
  if block_mask is not None:
    if block_shape is None or len(block_shape) != 2 or min(block_shape) <= 0:
      raise ValueError(f"block_shape must be a positive (block_q, block_k) pair, got {block_shape!r}")
    nq, nk = -(-tq // block_shape[0]), -(-tk // block_shape[1])
    heads_ok = num_heads is None or block_mask.shape[1] in (1, num_heads)
    if (block_mask.ndim != 4 or block_mask.shape[-2:] != (nq, nk)
        or block_mask.shape[0] not in (1, batch) or not heads_ok):
      raise ValueError(
          f"block_mask must be [B|1={batch}, H|1={num_heads or 'H'}, nq={nq}, nk={nk}] for"
          f" block_shape={tuple(block_shape)}, got {tuple(block_mask.shape)}")
    block_mask = block_mask.astype(bool)
    block_shape = (int(block_shape[0]), int(block_shape[1]))
  else:
    block_shape = None
  return MaskArgs(
      is_causal=is_causal, window=window, chunk_size=chunk_size,
      q_segment_ids=q_seg, kv_segment_ids=kv_seg,
      q_positions=q_positions, kv_positions=kv_positions,
      prefix_lengths=prefix_lengths, kv_lengths=kv_lengths, dense=mask,
      block_mask=block_mask, block_shape=block_shape)


def _check_shape(name, x, shape):
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")


def position_rule(is_causal: bool, window, chunk_size: Optional[int], q_pos, k_pos):
  """The causal, window and chunk rules on broadcastable position arrays; None when none applies.

  Plain jnp on values, so the Pallas kernels evaluate the same rules per tile (tile.py).
  """
  rule = None

  def conj(a, b):
    return b if a is None else a & b

  if is_causal:
    rule = k_pos <= q_pos
  if window is not None:
    left, right = window
    if left is not None:
      rule = conj(rule, k_pos >= q_pos - left)
    if right is not None:
      rule = conj(rule, k_pos <= q_pos + right)
  if chunk_size is not None:
    rule = conj(rule, (q_pos // chunk_size) == (k_pos // chunk_size))
  return rule


def visible(m: MaskArgs, q_idx: jax.Array, kv_idx: jax.Array,
            tk: Optional[int] = None) -> Optional[jax.Array]:
  """Boolean visibility for query indices `q_idx: [bq]` x key indices `kv_idx: [bk]`.

  Returns [B|1, H|1, bq, bk], or None when every pair is visible. A tiled
  caller whose last tile runs past the keys passes the true key count `tk`:
  indices >= tk are then invisible. Out-of-range query rows are the caller's
  to drop.
  """
  out = None

  def conj(a, b):
    return b if a is None else a & b

  def take(x, idx):  # [B, T] -> [B, len(idx)], clamped (out-of-range masked elsewhere)
    return jnp.take(x, jnp.clip(idx, 0, x.shape[1] - 1), axis=1)

  if m.q_positions is not None:
    qp = take(m.q_positions, q_idx)[:, None, :, None]
    kp = take(m.kv_positions, kv_idx)[:, None, None, :]
    rule = position_rule(m.is_causal, m.window, m.chunk_size, qp, kp)
    if m.prefix_lengths is not None and rule is not None:
      # The prefix only widens a restricting rule; with no rule every key is
      # already visible (a bidirectional prefix-LM is plain bidirectional).
      rule = rule | (kp < m.prefix_lengths[:, None, None, None])
    out = conj(out, rule)
  if m.q_segment_ids is not None:
    qs = take(m.q_segment_ids, q_idx)[:, None, :, None]
    ks = take(m.kv_segment_ids, kv_idx)[:, None, None, :]
    out = conj(out, qs == ks)
  if m.kv_lengths is not None:
    out = conj(out, kv_idx[None, None, None, :] < m.kv_lengths[:, None, None, None])
  if m.dense is not None:
    d = m.dense
    d = jnp.take(d, jnp.clip(q_idx, 0, d.shape[2] - 1), axis=2)
    d = jnp.take(d, jnp.clip(kv_idx, 0, d.shape[3] - 1), axis=3)
    out = conj(out, d)
  if m.block_mask is not None:
    bq, bk = m.block_shape
    d = m.block_mask
    d = jnp.take(d, jnp.clip(q_idx // bq, 0, d.shape[2] - 1), axis=2)
    d = jnp.take(d, jnp.clip(kv_idx // bk, 0, d.shape[3] - 1), axis=3)
    out = conj(out, d)
  if tk is not None:
    out = conj(out, (kv_idx < tk)[None, None, None, :])
  return out
