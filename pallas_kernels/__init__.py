"""Attention kernels, one folder per kernel shape; each has a reference, backends and a dispatch."""

from pallas_kernels.block_sparse import block_sparse_attention, lists_from_block_mask
from pallas_kernels.decode import decode_attention
from pallas_kernels.flash import flash_attention

__all__ = ["block_sparse_attention", "decode_attention", "flash_attention",
           "lists_from_block_mask"]
