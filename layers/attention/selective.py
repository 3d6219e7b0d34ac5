"""`selective`: Selective Self-Attention (SSA), query- and position-dependent temperature.

From "Selective Attention: Enhancing Transformer through Principled Context
Control". Standard attention applies the same map V^T softmax(K q) to every
query; SSA gives each query its own inverse temperature tau(q, pos), and also
scales the values by a value temperature:

    tau_{t,h} = softplus(w_h . q_{t,h} + b_h) * (1 + c_h * log(pos_t + 1))     [B, T, Hq]
    s_{j,g}   = softplus(u_g . v_{j,g} + e_g)                                  [B, T, Hkv]
    O_{t,h}   = sum_j softmax_j(tau_{t,h} * scale * q_{t,h} . k_{j,g(h)} + M) s_{j,g(h)} v_{j,g(h)}

(`q` is taken before the positional rotation for the content term; RoPE is
linear, so scaling q before or after it is the same.) b_h and e_g start at
softplus^{-1}(1) and w, u, c at 0, so a fresh layer is exactly `mha`
(tau = s = 1) and can be fine-tuned from an `mha` checkpoint.

What the paper leaves open / what is chosen here (the exact parameterisation
of tau and of the value temperature could not be read from the paper in this
session; this is the Std form of FAMILIES.md, *assumed*):
  * tau: softplus of a per-head linear function of the query, times a
    per-head learned position term 1 + c log(pos + 1) (c initialised to 0;
    the paper's position-aware term counters attention dilution at long
    context; its exact form is not confirmed).
  * value temperature: a per-KV-head softplus of a linear function of the
    value vector (one scalar per key and KV head), initialised to 1.
  * weight sharing: one w_h per query head over head_dim only
    (Hq * D + 2 Hq + Hkv * D + Hkv new parameters, i.e. about d_model per layer).

Fast path: the flash kernel is unchanged; tau is folded into q (a per-query
scale) and s into v, so `selective` costs one elementwise multiply each.
`selective_reference` scales the logits explicitly (the specification).

Options (`model.attention_options.<name>`):
  query_temperature (bool, True): learn tau's content term (else softplus(b) only).
  position_temperature (bool, True): include the 1 + c log(pos + 1) factor.
  value_temperature (bool, True): scale values by s (else s = 1).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import registry
from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.attention.mha import MultiHeadAttention
from pallas_kernels.flash import api as flash_api
from pallas_kernels.flash import reference as flash_reference

_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)  # softplus(_SOFTPLUS_INV_ONE) == 1


def selective(q: jax.Array, k: jax.Array, v: jax.Array, tau: jax.Array,
              value_scale: Optional[jax.Array] = None, mask: Optional[Mask] = None, *,
              scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
  """SSA with tau folded into q and the value scale into v; one unchanged flash call.

  q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], tau [B,Tq,Hq], value_scale [B,Tk,Hkv] or None.
  """
  mask = Mask.bidirectional() if mask is None else mask
  q = q * tau[..., None].astype(q.dtype)
  if value_scale is not None:
    v = v * value_scale[..., None].astype(v.dtype)
  return flash_api.flash_attention(q, k, v, scale=scale, implementation=implementation,
                                   **mask.kernel_args())


def selective_reference(q, k, v, tau, value_scale=None, mask: Optional[Mask] = None, *,
                        scale: Optional[float] = None) -> jax.Array:
  """The specification: dense logits multiplied by tau, values by the value scale."""
  mask = Mask.bidirectional() if mask is None else mask
  b, tq, hq, _ = q.shape
  tk = k.shape[1]
  vf = v.astype(jnp.float32)
  if value_scale is not None:
    vf = vf * value_scale[..., None].astype(jnp.float32)
  vf = flash_reference.repeat_kv(vf, hq)
  s = flash_reference.dense_logits(q, k, scale)
  s = s * jnp.moveaxis(tau.astype(jnp.float32), 1, 2)[..., None]  # tau_{t,h} scales row t of head h
  vis = mask.dense(b, tq, tk)
  p, _ = flash_reference.softmax_with_sink(jnp.where(vis, s, -jnp.inf))
  return jnp.einsum("bhqk,bkhd->bqhd", p, vf).astype(q.dtype)


@registry.register("selective")
class SelectiveAttention(MultiHeadAttention):
  """`mha` projections + per-query temperature tau(q, pos) + value temperature (see module doc)."""

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.query_temperature = cfg.bool_option("query_temperature", True)
    self.position_temperature = cfg.bool_option("position_temperature", True)
    self.value_temperature = cfg.bool_option("value_temperature", True)
    hq, hkv, d, pd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
    self.tau_w = (nnx.Param(jnp.zeros((hq, d), pd), logical_axes=("heads", "head_dim"))
                  if self.query_temperature else None)
    self.tau_b = nnx.Param(jnp.full((hq,), _SOFTPLUS_INV_ONE, pd), logical_axes=("heads",))
    self.tau_c = (nnx.Param(jnp.zeros((hq,), pd), logical_axes=("heads",))
                  if self.position_temperature else None)
    if self.value_temperature:
      self.val_w = nnx.Param(jnp.zeros((hkv, d), pd), logical_axes=("kv_heads", "head_dim"))
      self.val_b = nnx.Param(jnp.full((hkv,), _SOFTPLUS_INV_ONE, pd), logical_axes=("kv_heads",))
    else:
      self.val_w = self.val_b = None

  def temperatures(self, q: jax.Array, v: jax.Array, positions: jax.Array):
    """tau [B, T, Hq] and the value scale [B, T, Hkv] (or None), in float32."""
    f32 = jnp.float32
    z = jnp.broadcast_to(self.tau_b[...].astype(f32), q.shape[:3])
    if self.tau_w is not None:
      z = z + jnp.einsum("bthd,hd->bth", q.astype(f32), self.tau_w[...].astype(f32))
    tau = jax.nn.softplus(z)
    if self.tau_c is not None:
      logpos = jnp.log1p(jnp.maximum(positions, 0).astype(f32))[..., None]  # [B, T, 1]
      tau = tau * (1.0 + self.tau_c[...].astype(f32) * logpos)
    vs = None
    if self.val_w is not None:
      vs = jax.nn.softplus(
          jnp.einsum("bthd,hd->bth", v.astype(f32), self.val_w[...].astype(f32))
          + self.val_b[...].astype(f32))
    return tau, vs

  def core(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask,
           positions: jax.Array) -> jax.Array:
    cfg = self.cfg
    tau, vs = self.temperatures(q, v, positions)  # from the unrotated q
    q, k = self.positional(q, k, positions, positions)
    if cfg.implementation == "reference":
      return selective_reference(q, k, v, tau, vs, mask)
    return selective(q, k, v, tau, vs, mask, implementation=cfg.implementation)
