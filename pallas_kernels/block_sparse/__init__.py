"""Attention over per-(batch, head, query-block) lists of key blocks."""

from pallas_kernels.block_sparse.api import block_sparse_attention, lists_from_block_mask

__all__ = ["block_sparse_attention", "lists_from_block_mask"]
