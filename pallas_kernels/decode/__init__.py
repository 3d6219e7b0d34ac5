"""Decode attention: a few query tokens per sequence against a (paged) KV cache, per-sequence or
per-kv-head lengths. Reference, XLA path, Pallas kernels (Triton-style GPU, TPU) and dispatch."""

from pallas_kernels.decode.api import DecodeCall, decode_attention

__all__ = ["DecodeCall", "decode_attention"]
