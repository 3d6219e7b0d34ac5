"""The one configuration schema of every attention family (ARCHITECTURE.md, contract point 3).

Head layout is independent of the family: query heads, KV heads and head size
are separate settings, so MHA (Hkv = Hq), GQA (Hkv | Hq), MQA (Hkv = 1) and
SQA (fewer query heads than d_model / head_dim) are the same layer.
Family-specific settings go in `options` (e.g. {"gate": "headwise"}).
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import jax.numpy as jnp

from layers.attention.rope import rope_frequencies
from pallas_kernels.flash import api as flash_api

# The attention backends a layer may name (pallas_kernels/flash/api.py).
IMPLEMENTATIONS = flash_api.available_implementations()


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
  rope_scaling_type: str = "linear"  # linear | ntk | yarn | llama3 | truncated (rope.py)
  rope_original_max_len: Optional[int] = None  # training context (yarn, llama3, truncated)
  window: Optional[Union[int, Tuple[Optional[int], Optional[int]]]] = None  # sliding window of this layer
  use_bias: bool = False
  implementation: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # Per-layer positional schedules (positional="nope_hybrid", layers/attention/nope_hybrid.py):
  layer: int = 0  # this layer's index in its model
  positional_schedule: Optional[str] = None  # "rope,nope,..." cycled over layers; None: default
  rope_window: Optional[int] = None  # sliding window of the schedule's RoPE layers

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
    if self.layer < 0:
      raise ValueError(f"layer must be >= 0, got {self.layer}")
    if self.positional == "nope_hybrid":
      kind = layer_positional(self)
      if kind == "rope" and self.rope_window is not None:
        if not (isinstance(self.rope_window, int) and self.rope_window > 0):
          raise ValueError(f"rope_window must be a positive integer, got {self.rope_window!r}")
        object.__setattr__(self, "window", self.rope_window)
    elif self.positional_schedule is not None or self.rope_window is not None:
      raise ValueError(
          "positional_schedule / rope_window are settings of positional='nope_hybrid', "
          f"not of positional={self.positional!r}")
    if self.positional == "rope" or (self.positional == "nope_hybrid"
                                     and layer_positional(self) == "rope"):
      # Validates the scaling settings once, at construction.
      rope_frequencies(self.head_dim, self.rope_base, scaling=self.rope_scaling,
                       scaling_type=self.rope_scaling_type,
                       original_max_len=self.rope_original_max_len)

  def option(self, name: str, default=None):
    return dict(self.options).get(name, default)

  def bool_option(self, name: str, default: bool) -> bool:
    value = self.option(name, default)
    if not isinstance(value, bool):
      raise ValueError(f"model.attention_options.{name} must be true or false, got {value!r}")
    return value

  def int_option(self, name: str, default: int) -> int:
    value = self.option(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"model.attention_options.{name} must be an integer, got {value!r}")
    return value


SCHEDULE_KINDS = ("rope", "nope")
DEFAULT_SCHEDULE = "rope,rope,rope,nope"  # RNoPE-SWA's 3 RoPE : 1 NoPE (nope_hybrid.py)


def parse_positional_schedule(schedule: Optional[str]) -> Tuple[str, ...]:
  """'rope,rope,rope,nope' -> ('rope', 'rope', 'rope', 'nope'); None -> the default."""
  schedule = DEFAULT_SCHEDULE if schedule is None else schedule
  kinds = tuple(s.strip() for s in schedule.split(",")) if isinstance(schedule, str) else tuple(
      schedule)
  if not kinds or any(k not in SCHEDULE_KINDS for k in kinds):
    raise ValueError(f"positional_schedule={schedule!r} must be a comma-separated list of "
                     f"{SCHEDULE_KINDS}")
  return kinds


def layer_positional(cfg: AttentionConfig) -> str:
  """'rope' or 'nope': the schedule's entry for layer cfg.layer (the schedule is cycled)."""
  kinds = parse_positional_schedule(cfg.positional_schedule)
  return kinds[cfg.layer % len(kinds)]


def parse_options(value) -> Dict[str, Any]:
  """Family options from a mapping, or from the flag form "gate=headwise,top_k=2".

  The flag form exists because `--config.model.attention_options.KEY=V` cannot
  add keys to a config; values are Python literals where they parse
  ("0.5", "True", "(2, (3, 3), 3)"), strings otherwise; commas inside
  brackets do not split.
  """
  if value is None or value == "":
    return {}
  if isinstance(value, Mapping) or hasattr(value, "items"):
    return dict(value.items())
  if not isinstance(value, str):
    raise ValueError(f"model.attention_options must be a mapping or 'key=value,...', got {value!r}")
  items, depth, start = [], 0, 0
  for i, ch in enumerate(value + ","):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      items.append(value[start:i].strip())
      start = i + 1
  out = {}
  for item in filter(None, items):
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"model.attention_options: {item!r} is not key=value")
    try:
      out[key.strip()] = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = raw.strip()
  return out
