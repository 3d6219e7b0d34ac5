"""Dense softmax attention with mask and score modifications: reference, XLA path, dispatch."""

from pallas_kernels.flash.api import AttentionCall, flash_attention, register_backend

__all__ = ["AttentionCall", "flash_attention", "register_backend"]
