"""Rotary position embeddings, "RoFormer: Enhanced Transformer with Rotary Position Embedding".

Each pair of channels (i, i + d/2) ("rotate-half" layout, as in Llama and the
Hugging Face checkpoints) is rotated by the angle p * theta_i with
theta_i = base^(-2i/d). Linear scaling ("position interpolation", which
"Giraffe: Adventures in Expanding Context Lengths in LLMs" finds the best
method) divides positions by `scaling`: p -> p / s. Angles are computed in
float32 from integer positions, so cached and recomputed positions agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, base: float = 10_000.0) -> jax.Array:
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  return base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10_000.0,
               scaling: float = 1.0) -> jax.Array:
  """x: [B, T, H, D]; positions: [B, T] integers. Returns x rotated, in x.dtype."""
  d = x.shape[-1]
  inv_freq = rope_frequencies(d, base)
  angles = (positions.astype(jnp.float32) / scaling)[..., None] * inv_freq  # [B, T, D/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
