"""The one configuration schema of every attention family (ARCHITECTURE.md, contract point 3).

Head layout is independent of the family: query heads, KV heads and head size
are separate settings, so MHA (Hkv = Hq), GQA (Hkv | Hq), MQA (Hkv = 1) and
SQA (fewer query heads than d_model / head_dim) are the same layer.
Family-specific settings go in `options` (e.g. {"gate": "headwise"}).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple, Union

import jax.numpy as jnp

from layers.attention.rope import rope_frequencies

IMPLEMENTATIONS = ("auto", "xla", "reference", "pallas", "pallas_interpret", "cudnn")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  d_model: int
  num_heads: int
  num_kv_heads: Optional[int] = None  # None: = num_heads (MHA)
  head_dim: Optional[int] = None  # None: d_model // num_heads
  causal: bool = True
  positional: str = "rope"
  rope_base: float = 10_000.0
  rope_scaling: float = 1.0  # context-extension factor s (1: none)
  rope_scaling_type: str = "linear"  # linear | ntk | yarn | llama3 (layers/attention/rope.py)
  rope_original_max_len: Optional[int] = None  # training context of yarn / llama3 scaling
  window: Optional[Union[int, Tuple[Optional[int], Optional[int]]]] = None  # sliding window of this layer
  use_bias: bool = False
  implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(
            f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
            "set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
    for name in ("d_model", "num_heads", "num_kv_heads", "head_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(
          f"implementation={self.implementation!r} is not one of {IMPLEMENTATIONS}")
    if self.positional == "rope":
      # Validates the scaling settings once, at construction.
      rope_frequencies(self.head_dim, self.rope_base, scaling=self.rope_scaling,
                       scaling_type=self.rope_scaling_type,
                       original_max_len=self.rope_original_max_len)

  def option(self, name: str, default=None):
    return dict(self.options).get(name, default)
