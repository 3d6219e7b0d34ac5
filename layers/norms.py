"""RMSNorm ("Root Mean Square Layer Normalization") and LayerNorm.

RMSNorm: y = x / sqrt(mean(x^2) + eps) * g. LayerNorm: y = (x - mu) / sqrt(var + eps) * g + b.
Statistics are computed in float32 whatever the activation dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = "norm",
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float = 1e-6, use_bias: bool = True,
               axis_name: str = "norm", param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
    self.bias = (nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=(axis_name,))
                 if use_bias else None)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


def make_norm(kind: str, dim: int, *, eps: float, param_dtype=jnp.float32) -> nnx.Module:
  if kind not in NORMS:
    raise ValueError(f"unknown norm {kind!r}; choose one of {sorted(NORMS)}")
  return NORMS[kind](dim, eps=eps, param_dtype=param_dtype)
