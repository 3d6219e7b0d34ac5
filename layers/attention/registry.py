"""The family registry: string id -> NNX attention module class.

Ids are those of ../shared/FAMILIES.md. Every family module is constructed as
`Family(cfg: AttentionConfig, *, rngs)` and called as
`module(x, *, mask: Mask, positions: [B, T] | None) -> [B, T, d_model]`.
"""

from __future__ import annotations

from typing import Callable, Dict, List

_FAMILIES: Dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  def deco(cls: type) -> type:
    if name in _FAMILIES and _FAMILIES[name] is not cls:
      raise ValueError(f"attention family {name!r} is registered twice")
    _FAMILIES[name] = cls
    cls.family_id = name
    return cls
  return deco


def get(name: str) -> type:
  import layers.attention  # noqa: F401  (registers every family)
  if name not in _FAMILIES:
    raise ValueError(
        f"unknown attention family {name!r} (model.attention); registered: {names()}")
  return _FAMILIES[name]


def names() -> List[str]:
  import layers.attention  # noqa: F401
  return sorted(_FAMILIES)
