"""Block-sparse attention, the specification: dense attention under the expanded mask.

Query block I (rows I*bq .. I*bq + bq - 1) may attend key block J
(columns J*bk .. J*bk + bk - 1) iff J is in the list of (b, h, I); within an
allowed tile the other mask settings (causal, window, segments ...) still
apply. The dense rendering is

    visible_bhij = block_mask[b, h, i // bq, j // bk]  AND  token_mask_bij

followed by `pallas_kernels.flash.reference.attention` unchanged. Quadratic
on purpose: every fast path is tested against it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.flash import masking
from pallas_kernels.flash import reference as flash_reference
from pallas_kernels.flash import schedule


def attention(q, k, v, block_indices, block_counts, *, block_shape, mask_args=None, **kwargs):
  """Dense block-sparse attention; `kwargs` are `flash.reference.attention`'s (bias, sinks ...)."""
  tk = k.shape[1]
  nk = -(-tk // block_shape[1])
  block_mask = schedule.block_mask_from_lists(jnp.asarray(block_indices),
                                              jnp.asarray(block_counts), nk)
  if mask_args is None:
    mask_args = masking.MaskArgs()
  mask_args = dataclasses.replace(mask_args, block_mask=block_mask, block_shape=tuple(block_shape))
  return flash_reference.attention(q, k, v, mask_args=mask_args, **kwargs)
