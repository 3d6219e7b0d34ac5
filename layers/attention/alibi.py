"""`alibi`: linear distance bias (positional id, `model.positional="alibi"`).

The ALiBi paper is not among the seeds; "Bayesian Attention Mechanism: A
Probabilistic Framework for Positional Encoding and Context Length
Extrapolation" names ALiBi as a special case of its prior. Std (the ALiBi
paper's rule, Press et al., "Train Short, Test Long: Attention with Linear
Biases Enables Input Length Extrapolation"):

    logit_h(i, j) += -m_h |i - j|,      m_h = 2^(-8h/H),  h = 1..H   (H a power of 2)

i, j are the query and key position ids (packed documents restart them).
For H not a power of 2 the paper's (and its code's) rule: with n = 2^floor(log2 H),
take the n slopes of n heads, then the first H - n of the odd-numbered slopes
of 2n heads, 2^(-8(2k-1)/(2n)) for k = 1..H-n (they sit between the first ones).

Choices: the distance is |i - j|, equal to the paper's (i - j) on every key
a causal query sees, and the symmetric variant usual for bidirectional
encoders. Slopes are fixed (not learned), over the query heads H = Hq (GQA
shares K/V, not the bias). Option `alibi_slope_scale` (default 1.0)
multiplies every slope (0 gives NoPE). The bias is dense until the flash
kernel computes f(i - j) in-kernel (see layers/attention/positional.py).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.attention.config import AttentionConfig
from layers.attention.positional import PositionalEncoding, register_positional


def alibi_slopes(num_heads: int) -> np.ndarray:
  """The ALiBi paper's slopes m_h, float32 [num_heads]."""
  if num_heads <= 0:
    raise ValueError(f"num_heads must be positive, got {num_heads}")

  def power_of_2(n):
    return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

  n = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = power_of_2(n)
  if n < num_heads:
    slopes += power_of_2(2 * n)[0::2][: num_heads - n]
  return np.asarray(slopes, np.float32)


def relative_distance(q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
  """i - j as float32 [B, 1, Tq, Tk] from position ids [B, Tq], [B, Tk]."""
  qp = jnp.asarray(q_positions).astype(jnp.float32)
  kp = jnp.asarray(kv_positions).astype(jnp.float32)
  return qp[:, None, :, None] - kp[:, None, None, :]


def alibi_bias(q_positions: jax.Array, kv_positions: jax.Array, slopes: jax.Array) -> jax.Array:
  """The pure function: -m_h |i - j|, float32 [B, H, Tq, Tk] (dense)."""
  slopes = jnp.asarray(slopes, jnp.float32)
  return -slopes[None, :, None, None] * jnp.abs(relative_distance(q_positions, kv_positions))


@register_positional("alibi")
class ALiBi(PositionalEncoding):
  """Fixed per-head slopes; q and k untouched."""

  has_bias = True

  def __init__(self, cfg: AttentionConfig, *, rngs: Optional[nnx.Rngs] = None):
    del rngs
    scale = float(cfg.option("alibi_slope_scale", 1.0))
    if not scale >= 0:
      raise ValueError(f"model.attention_options.alibi_slope_scale must be >= 0, got {scale}")
    self.slopes = tuple(float(m) * scale for m in alibi_slopes(cfg.num_heads))  # static

  def distance_bias(self):
    """(m_h, 1, 0): -m_h |i - j|, the same as `alibi_bias`."""
    slopes = jnp.asarray(self.slopes, jnp.float32)
    return jnp.stack([slopes, jnp.ones_like(slopes), jnp.zeros_like(slopes)], axis=1)
