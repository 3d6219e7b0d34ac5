"""Attention families as Flax NNX layers, behind one contract (ARCHITECTURE.md).

Import a family by id (`registry.get("mha")`) or directly (`layers.attention.mha`).
Importing this package registers every family.
"""

# Importing a family module registers its id.
from layers.attention import (  # noqa: F401
    entmax, gated, gaussian_adaptive, mha, moh, multi_token, neural, relational, segment_mask,
    selective, sinks, sqa, tempscale)
from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.attention.registry import get, names, register

__all__ = ["AttentionConfig", "Mask", "get", "names", "register"]
