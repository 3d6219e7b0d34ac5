"""Attention families as Flax NNX layers, behind one contract (ARCHITECTURE.md).

Import a family by id (`registry.get("mha")`) or directly (`layers.attention.mha`).
Importing this package registers every family.
"""

from layers.attention import mha  # noqa: F401  (registers "mha")
from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.attention.registry import get, names, register

__all__ = ["AttentionConfig", "Mask", "get", "names", "register"]
