"""Positional encodings, chosen by id with `model.positional`.

An encoding transforms (q, k) given their position ids before the attention
core; encodings that add a score bias (ALiBi, BAM, ...) will extend this with
kernel arguments. Registered here: `rope` (rotary; linear, NTK, YaRN and Llama-3 scaling) and `nope`
(no positional information: "Length Generalization of Causal Transformers
without Position Encoding" shows causal masks alone let a model infer order).
"""

from __future__ import annotations

from typing import Callable, Dict

import jax

from layers.attention.config import AttentionConfig
from layers.attention.rope import apply_rope


class RoPE:
  def __init__(self, cfg: AttentionConfig):
    if cfg.head_dim % 2:
      raise ValueError(f"positional='rope' needs an even head_dim, got {cfg.head_dim}")
    self.kwargs = dict(base=cfg.rope_base, scaling=cfg.rope_scaling,
                       scaling_type=cfg.rope_scaling_type,
                       original_max_len=cfg.rope_original_max_len)

  def __call__(self, q: jax.Array, k: jax.Array, q_positions, kv_positions):
    return apply_rope(q, q_positions, **self.kwargs), apply_rope(k, kv_positions, **self.kwargs)


class NoPE:
  def __init__(self, cfg: AttentionConfig):
    del cfg

  def __call__(self, q, k, q_positions, kv_positions):
    return q, k


POSITIONAL: Dict[str, Callable[[AttentionConfig], object]] = {"rope": RoPE, "nope": NoPE}


def make_positional(cfg: AttentionConfig):
  if cfg.positional not in POSITIONAL:
    raise ValueError(
        f"unknown positional encoding {cfg.positional!r} (model.positional); "
        f"choose one of {sorted(POSITIONAL)}")
  return POSITIONAL[cfg.positional](cfg)
