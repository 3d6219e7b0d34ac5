"""The one linear projection every layer uses.

`Linear` contracts the last `len(in_shape)` axes of x with a kernel of shape
in_shape + out_shape, so multi-head projections keep their head axes
([embed] -> [heads, head_dim]) instead of reshaping, and every kernel axis has
a logical name for sharding.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from flax import nnx

Shape = Union[int, Sequence[int]]


def _tuple(s: Shape) -> Tuple[int, ...]:
  return (s,) if isinstance(s, int) else tuple(s)


class Linear(nnx.Module):
  """y = x . W (+ b), W: in_shape + out_shape, fan-in truncated-normal init."""

  def __init__(self, in_shape: Shape, out_shape: Shape, *, axes: Sequence[str | None],
               use_bias: bool = False, init_scale: float = 1.0,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.in_shape, self.out_shape = _tuple(in_shape), _tuple(out_shape)
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    if len(axes) != n_in + n_out:
      raise ValueError(f"axes {axes} must name {n_in + n_out} kernel dimensions")
    fan_in = math.prod(self.in_shape)
    # Truncated normal with the std of fan-in scaling (the 0.8796 undoes truncation at 2 sigma).
    std = init_scale / math.sqrt(fan_in) / 0.87962566103423978
    w = std * jax.random.truncated_normal(
        rngs.params(), -2.0, 2.0, self.in_shape + self.out_shape, param_dtype)
    self.kernel = nnx.Param(w, logical_axes=tuple(axes))
    self.bias = (nnx.Param(jnp.zeros(self.out_shape, param_dtype), logical_axes=tuple(axes[n_in:]))
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    if x.shape[x.ndim - n_in:] != self.in_shape:
      raise ValueError(f"Linear expects trailing dims {self.in_shape}, got {x.shape}")
    kernel = self.kernel[...].astype(self.dtype)
    y = jax.lax.dot_general(
        x.astype(self.dtype), kernel,
        ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y
