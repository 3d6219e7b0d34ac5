"""Feed-forward blocks from "GLU Variants Improve Transformer" (Shazeer, 2020).

Gated: y = W_down (act(x W_gate) * (x W_up)); SwiGLU uses SiLU, GeGLU uses GELU (tanh).
Plain: y = W_down act(x W_up).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.linear import Linear

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
# kind -> (activation, gated)
MLP_KINDS = {
    "swiglu": ("silu", True),
    "geglu": ("gelu", True),
    "gelu": ("gelu", False),
    "relu": ("relu", False),
}


class MLP(nnx.Module):

  def __init__(self, d_model: int, hidden: int, *, kind: str = "swiglu", use_bias: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if kind not in MLP_KINDS:
      raise ValueError(f"unknown mlp kind {kind!r}; choose one of {sorted(MLP_KINDS)}")
    act, self.gated = MLP_KINDS[kind]
    self.act = ACTIVATIONS[act]
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.up = Linear(d_model, hidden, axes=("embed", "mlp"), **kw)
    self.gate = Linear(d_model, hidden, axes=("embed", "mlp"), **kw) if self.gated else None
    self.down = Linear(hidden, d_model, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.up(x)
    h = self.act(self.gate(x)) * h if self.gated else self.act(h)
    return self.down(h)
