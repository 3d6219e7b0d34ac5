"""Feed-forward blocks from "GLU Variants Improve Transformer" (Shazeer, 2020).

Gated: y = W_down (act(x W_gate) * (x W_up)); SwiGLU uses SiLU, GeGLU uses GELU (tanh).
Plain: y = W_down act(x W_up).

`activation` overrides the kind's own, so outside checkpoints keep their exact
function: "gelu" is the tanh approximation (GPT-2's gelu_new, ViT in big_vision),
"gelu_exact" the erf form (BERT, HF ViT, ModernBERT), "quick_gelu"
x sigmoid(1.702 x) (OpenAI CLIP).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.linear import Linear

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
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
               activation: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if kind not in MLP_KINDS:
      raise ValueError(f"unknown mlp kind {kind!r}; choose one of {sorted(MLP_KINDS)}")
    act, self.gated = MLP_KINDS[kind]
    if activation is not None:
      if activation not in ACTIVATIONS:
        raise ValueError(f"unknown mlp activation {activation!r}; choose one of "
                         f"{sorted(ACTIVATIONS)}")
      act = activation
    self.act = ACTIVATIONS[act]
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.up = Linear(d_model, hidden, axes=("embed", "mlp"), **kw)
    self.gate = Linear(d_model, hidden, axes=("embed", "mlp"), **kw) if self.gated else None
    self.down = Linear(hidden, d_model, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.up(x)
    h = self.act(self.gate(x)) * h if self.gated else self.act(h)
    return self.down(h)
