"""`tempscale`: a temperature in the attention softmax, against length collapse.

From "Length-Induced Embedding Collapse in Transformer-based Models" (S1).
The abstract: self-attention acts as a low-pass filter whose attenuation grows
with sequence length, so long texts' token features collapse towards their DC
component; the fix, TempScale, is "introducing a temperature in softmax()",
"tuning-free" and plugged into existing embedding models:

    O_h = softmax(Q_h K_{g(h)}^T / (tau * sqrt(d)) + M) V_{g(h)},   y = concat_h(O_h) W_O

tau < 1 sharpens attention (less smoothing). Implemented by folding 1/tau into
q (so tau may vary per example and per query) and calling `flash_attention`.

Options (`model.attention_options.<name>`):
  * `temperature` (float > 0, default 1.0): tau, or the base tau of the rule below.
  * `temperature_rule`: "fixed" (default; tau for every query) or
    "log_length": tau(n) = tau * log(n_ref) / log(max(n, n_ref)), i.e. the
    inverse temperature grows like log n once the length n exceeds
    n_ref = `reference_length` (int >= 2, default 512), and short texts keep tau.
    n is the number of keys the query can see in a causal layer (its position
    + 1, so prefixes and step-by-step decoding agree), and the text length (T,
    or kv_lengths for padded batches) in a bidirectional one.

What could not be confirmed: the paper body was not reachable from this
session (only the abstract), so its exact temperature value and whether/how it
depends on length are NOT confirmed. The abstract only fixes "a temperature in
softmax()". The default (tau = 1, "fixed") is therefore the identity (`mha`);
the value must be set by the user. The "log_length" rule is an assumption (the
common log-n length scaling of logits), offered as an option, not as the
paper's rule.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import registry
from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.attention.mha import MultiHeadAttention, mha

RULES = ("fixed", "log_length")


def length_temperature(temperature: float, length: jax.Array, reference_length: int) -> jax.Array:
  """tau(n) = tau * log(n_ref) / log(max(n, n_ref)) (the "log_length" rule)."""
  n = jnp.maximum(jnp.asarray(length, jnp.float32), float(reference_length))
  return temperature * math.log(reference_length) / jnp.log(n)


def tempscale_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[Mask] = None, *,
                        temperature: Union[float, jax.Array] = 1.0, scale: Optional[float] = None,
                        implementation: str = "auto") -> jax.Array:
  """softmax(scale * Q K^T / tau + M) V. q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D].

  `temperature` is a Python float, or an array broadcasting to [B, Tq, Hq]
  (per example / query / head); `scale` defaults to D ** -0.5.
  """
  if isinstance(temperature, (int, float)):
    if not temperature > 0:
      raise ValueError(f"temperature must be positive, got {temperature}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return mha(q, k, v, mask, scale=scale / temperature, implementation=implementation)
  inv = (1.0 / jnp.asarray(temperature, jnp.float32))
  inv = jnp.broadcast_to(inv, q.shape[:3])[..., None]
  q = (q.astype(jnp.float32) * inv).astype(q.dtype)
  return mha(q, k, v, mask, scale=scale, implementation=implementation)


@registry.register("tempscale")
class TempScaleAttention(MultiHeadAttention):
  """`mha` with a softmax temperature. Options: temperature, temperature_rule, reference_length."""

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    tau = cfg.option("temperature", 1.0)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
      raise ValueError(f"model.attention_options.temperature={tau!r} must be a positive number")
    rule = cfg.option("temperature_rule", "fixed")
    if rule not in RULES:
      raise ValueError(f"model.attention_options.temperature_rule={rule!r} is not one of {RULES}")
    n_ref = cfg.option("reference_length", 512)
    if isinstance(n_ref, bool) or int(n_ref) != n_ref or int(n_ref) < 2:
      raise ValueError(
          f"model.attention_options.reference_length={n_ref!r} must be an integer >= 2")
    self.temperature, self.rule, self.reference_length = float(tau), rule, int(n_ref)

  def temperatures(self, mask: Mask, positions: jax.Array) -> Union[float, jax.Array]:
    """tau per (example, query) [B, T, 1], or a float for the "fixed" rule."""
    if self.rule == "fixed":
      return self.temperature
    if mask.causal:
      n = positions + 1
    elif mask.kv_lengths is not None:
      n = jnp.broadcast_to(mask.kv_lengths[:, None], positions.shape)
    else:
      n = jnp.full(positions.shape, positions.shape[1])
    return length_temperature(self.temperature, n, self.reference_length)[..., None]

  def core(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask,
           positions: jax.Array) -> jax.Array:
    cfg = self.cfg
    q, k = self.positional(q, k, positions, positions)
    return tempscale_attention(q, k, v, mask, temperature=self.temperatures(mask, positions),
                               implementation=cfg.implementation)
