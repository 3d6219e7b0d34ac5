"""The family registry: string id -> NNX attention module class.

Ids are those of ../shared/FAMILIES.md. Every family module is constructed as
`Family(cfg: AttentionConfig, *, rngs)` and called as
`module(x, *, mask: Mask, positions: [B, T] | None) -> [B, T, d_model]`.
"""

from __future__ import annotations

from typing import Callable, Dict, List

_FAMILIES: Dict[str, type] = {}


def registrar(table: Dict[str, type], what: str, id_attr: str):
  """A class decorator factory adding classes to `table` by id (shared by every registry here)."""
  def register_as(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
      if name in table and table[name] is not cls:
        raise ValueError(f"{what} {name!r} is registered twice")
      table[name] = cls
      setattr(cls, id_attr, name)
      return cls
    return deco
  return register_as


register = registrar(_FAMILIES, "attention family", "family_id")


def get(name: str) -> type:
  import layers.attention  # noqa: F401  (registers every family)
  if name not in _FAMILIES:
    raise ValueError(
        f"unknown attention family {name!r} (model.attention); registered: {names()}")
  return _FAMILIES[name]


def names() -> List[str]:
  import layers.attention  # noqa: F401
  return sorted(_FAMILIES)
