"""Token embeddings (`attend` reuses the table as the output head: tied embeddings) and
learned absolute position embeddings ("Attention Is All You Need", GPT-2, BERT, ViT, CLIP)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Embed(nnx.Module):

  def __init__(self, vocab_size: int, dim: int, *, init_std: float | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    # std 1/sqrt(dim): tied logits x . E^T of a unit-RMS x then start at unit scale.
    init_std = dim ** -0.5 if init_std is None else init_std
    table = init_std * jax.random.normal(rngs.params(), (vocab_size, dim), param_dtype)
    self.embedding = nnx.Param(table, logical_axes=("vocab", "embed"))
    self.vocab_size, self.dtype = vocab_size, dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Logits x . E^T over the vocabulary."""
    return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(self.dtype))


class PositionEmbed(nnx.Module):
  """A learned table [max_len, dim]; `__call__(positions [B, T])` -> [B, T, dim]."""

  def __init__(self, max_len: int, dim: int, *, init_std: float = 0.02, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    table = init_std * jax.random.normal(rngs.params(), (max_len, dim), param_dtype)
    self.embedding = nnx.Param(table, logical_axes=(None, "embed"))
    self.max_len, self.dtype = max_len, dtype

  def __call__(self, positions: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], positions, axis=0).astype(self.dtype)
