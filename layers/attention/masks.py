"""Masks as data (ARCHITECTURE.md, contract point 4).

A `Mask` is a static description (causal or not, a sliding window, a chunk
size) plus small per-token arrays (segment ids for packed sequences, position
ids, prefix lengths for prefix-LM, key lengths for padding). It renders itself
two ways: `dense()` for the reference, and `kernel_args()` for the fast paths,
which evaluate visibility tile by tile (pallas_kernels/flash/masking.py holds
the one definition of the rules). Nothing here builds a [T, T] array on the
fast path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.flash import masking


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
  """Which keys each query may see. Build with the constructors below.

  Fields with arrays are data (traced); the rest are static.
  """

  causal: bool = dataclasses.field(default=True, metadata=dict(static=True))
  window: Any = dataclasses.field(default=None, metadata=dict(static=True))  # int | (left, right)
  chunk_size: Optional[int] = dataclasses.field(default=None, metadata=dict(static=True))
  segment_ids: Optional[jax.Array] = None  # [B, T], or a (q, kv) pair for cross attention
  q_positions: Optional[jax.Array] = None  # [B, Tq]
  kv_positions: Optional[jax.Array] = None  # [B, Tk]
  prefix_lengths: Optional[jax.Array] = None  # [B]
  kv_lengths: Optional[jax.Array] = None  # [B]

  # Constructors -------------------------------------------------------------
  @classmethod
  def make_causal(cls) -> "Mask":
    return cls(causal=True)

  @classmethod
  def bidirectional(cls) -> "Mask":
    return cls(causal=False)

  @classmethod
  def sliding_window(cls, left: Optional[int], right: Optional[int] = 0, *,
                     causal: bool = True) -> "Mask":
    """Keys within [i - left, i + right]; `right` > 0 needs causal=False to matter."""
    return cls(causal=causal, window=(left, right))

  @classmethod
  def chunked(cls, chunk_size: int, *, causal: bool = True) -> "Mask":
    """Attention only within aligned chunks of `chunk_size` positions."""
    return cls(causal=causal, chunk_size=chunk_size)

  @classmethod
  def prefix_lm(cls, prefix_lengths: jax.Array) -> "Mask":
    """Bidirectional over the first prefix_lengths[b] positions, causal after."""
    return cls(causal=True, prefix_lengths=prefix_lengths)

  # Modifiers ----------------------------------------------------------------
  def replace(self, **changes) -> "Mask":
    return dataclasses.replace(self, **changes)

  def with_segments(self, segment_ids: jax.Array, positions: Optional[jax.Array] = None) -> "Mask":
    """Packed sequences: tokens see only their own segment; positions restart per segment."""
    return self.replace(segment_ids=segment_ids, q_positions=positions, kv_positions=positions)

  def with_padding(self, kv_lengths: jax.Array) -> "Mask":
    return self.replace(kv_lengths=kv_lengths)

  # Renderings -----------------------------------------------------------------
  def kernel_args(self) -> Dict[str, Any]:
    """Keyword arguments of pallas_kernels.flash_attention for this mask."""
    return dict(
        is_causal=self.causal, local_window_size=self.window, chunk_size=self.chunk_size,
        segment_ids=self.segment_ids, q_positions=self.q_positions,
        kv_positions=self.kv_positions, prefix_lengths=self.prefix_lengths,
        kv_lengths=self.kv_lengths)

  def mask_args(self, batch: int, tq: int, tk: int) -> masking.MaskArgs:
    return masking.make_mask_args(batch, tq, tk, **self.kernel_args())

  def dense(self, batch: int, tq: int, tk: int) -> jax.Array:
    """Boolean [B|1, 1, Tq, Tk] (True = visible), for the reference and for plots."""
    vis = masking.visible(self.mask_args(batch, tq, tk), jnp.arange(tq), jnp.arange(tk))
    if vis is None:
      return jnp.ones((1, 1, tq, tk), bool)
    return vis
