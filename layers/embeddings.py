"""Token embeddings; `attend` reuses the table as the output head (tied embeddings)."""

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
