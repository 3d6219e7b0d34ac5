"""Attention kernels, one folder per kernel shape; each has a reference, backends and a dispatch."""

from pallas_kernels.flash import flash_attention

__all__ = ["flash_attention"]
