"""Autoregressive generation with a KV cache: `generate` (decoding.py) and the pure
sampling functions (sampling.py). `generate.py` at the repository root is the
command-line entry point over a trained run's checkpoint (from_checkpoint.py)."""

from zoo.generation.decoding import batch_prompts, generate, generate_without_cache
from zoo.generation.sampling import (apply_temperature, filter_logits, sample, top_k_filter,
                                     top_p_filter)

__all__ = ["apply_temperature", "batch_prompts", "filter_logits", "generate",
           "generate_without_cache", "sample", "top_k_filter", "top_p_filter"]
