"""`gated`: a sigmoid gate on each head's SDPA output, before W_O.

From "Gated Attention for Large Language Models: Non-linearity, Sparsity, and
Attention-Sink-Free" (S2; code github.com/qiuzh20/gated_attention):

    O_h = softmax(Q_h K_{g(h)}^T / sqrt(d) + M) V_{g(h)}      (the `mha` core)
    G_h = x W_G^(h) + b_G^(h)                                  x: the (normalised) layer input
    Y_h = O_h * sigmoid(G_h)
    y   = concat_h(Y_h) W_O

The gate is head-specific and query-dependent (it reads the query token's x),
the "G1" position of the paper (after SDPA, before the output projection).
Option `model.attention_options.gate`:

    "elementwise" (default): G_h in R^d, one gate per head channel, W_G: d_model -> H_q * d
    "headwise":              G_h in R,   one gate per head and token, W_G: d_model -> H_q

Gate input: the layer input x, which in `TransformerBlock` is Norm(block input),
as in the paper ([confirm] in FAMILIES.md; also what the repository's Qwen3
code does, where the gate is extra output columns of q_proj). The gate is
multiplicative and sigmoid, as in the abstract ("head-specific sigmoid gate").

Open in the paper, choices made here:
  * default granularity "elementwise": recalled (not re-read) as the paper's best
    G1 variant, with headwise close behind; both are offered.
  * initialisation: W_G is fan-in truncated normal scaled by `gate_init_scale`
    (default 0.1; the paper's code uses the q_proj init, i.e. 1.0, and no bias),
    plus a bias b_G initialised to `gate_bias_init` (default 0.0). So at
    initialisation sigmoid(G) ~= 0.5 nearly uniformly: the layer starts as `mha`
    with its output scaled by about 1/2 (a fixed rescale the residual stream and
    W_O absorb), i.e. near-identity up to a constant, and the gate learns its
    sparsity from there. A large `gate_bias_init` (e.g. 1e4) makes the gate
    exactly 1, which is `mha`.
  * the gate is applied in the activation dtype outside the kernel (a later
    Pallas path can fuse it as a flash epilogue).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import registry
from layers.attention.config import AttentionConfig
from layers.attention.kv_cache import KVCache
from layers.attention.masks import Mask
from layers.attention.mha import MultiHeadAttention, mha
from layers.linear import Linear

GATES = ("elementwise", "headwise")


def gated_attention(q: jax.Array, k: jax.Array, v: jax.Array, gate_logits: jax.Array,
                    mask: Optional[Mask] = None, *, scale: Optional[float] = None,
                    implementation: str = "auto") -> jax.Array:
  """The pure function: SDPA(q, k, v) * sigmoid(gate_logits).

  q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D]; gate_logits [B,Tq,Hq] (headwise) or
  [B,Tq,Hq,D] (elementwise). Returns [B,Tq,Hq,D].
  """
  return apply_gate(mha(q, k, v, mask, scale=scale, implementation=implementation), gate_logits)


def apply_gate(o: jax.Array, gate_logits: jax.Array) -> jax.Array:
  """Y = O * sigmoid(G): o [B, Tq, Hq, D]; gate_logits [B, Tq, Hq] or [B, Tq, Hq, D]."""
  if gate_logits.shape == o.shape[:3]:
    gate_logits = gate_logits[..., None]
  elif gate_logits.shape != o.shape:
    raise ValueError(
        f"gate_logits must be [B, Tq, Hq] {o.shape[:3]} or [B, Tq, Hq, D] {o.shape}, got"
        f" {gate_logits.shape}")
  return o * jax.nn.sigmoid(gate_logits).astype(o.dtype)


@registry.register("gated")
class GatedAttention(MultiHeadAttention):
  """`mha` projections + a learned sigmoid gate. Options: gate, gate_init_scale, gate_bias_init."""

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)  # q/k/v/o are created first: same weights as `mha` per seed
    mode = cfg.option("gate", "elementwise")
    if mode not in GATES:
      raise ValueError(f"model.attention_options.gate={mode!r} is not one of {GATES}")
    self.mode = mode
    init_scale = float(cfg.option("gate_init_scale", 0.1))
    if init_scale < 0:
      raise ValueError(
          f"model.attention_options.gate_init_scale={init_scale!r} must be non-negative")
    bias_init = float(cfg.option("gate_bias_init", 0.0))
    if mode == "headwise":
      shape, axes = (cfg.num_heads,), ("embed", "heads")
    else:
      shape, axes = (cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim")
    self.gate = Linear(cfg.d_model, shape, axes=axes, use_bias=False, init_scale=init_scale,
                       dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.gate_bias = nnx.Param(jnp.full(shape, bias_init, cfg.param_dtype),
                               logical_axes=axes[1:])

  def gate_logits(self, x: jax.Array) -> jax.Array:
    """G = x W_G + b_G for the tokens x [B, T, d]: [B, T, Hq] or [B, T, Hq, D]."""
    return self.gate(x) + self.gate_bias[...].astype(self.cfg.dtype)

  def attend(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
             mask: Mask) -> jax.Array:
    return gated_attention(q, k, v, self.gate_logits(x), mask,
                           implementation=self.cfg.implementation)

  def attend_cached(self, x: jax.Array, q: jax.Array, cache: KVCache) -> jax.Array:
    """Decoding: the new tokens' SDPA over the cache, gated by their own x (the gate is per query)."""
    return apply_gate(super().attend_cached(x, q, cache), self.gate_logits(x))
