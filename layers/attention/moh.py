"""`moh`: Mixture-of-Head attention, heads as experts with per-token routing.

From "MoH: Multi-Head Attention as Mixture-of-Head Attention". Multi-head
attention in summation form is y_t = sum_h H_{t,h} W_O^(h); MoH weights the
sum with per-token gates and routes each token to a subset of heads:

    y_t = sum_h g_{t,h} H_{t,h} W_O^(h)

Heads 0..hs-1 are *shared* (always on); the remaining R = H - hs are *routed*
(each token keeps its top-k). The two-stage gates, as in the authors' released
code (SkyworkAI/MoH, `MoH-ViT/attention*.py`; confirmed there, including the
scale factors, which the paper's equations omit):

    p_t    = softmax(W_r x_t)                                     [R]  routed scores
    g^r_t  = k * (p_t * TopK_k(p_t)) / sum(p_t * TopK_k(p_t))     0 off the top-k
    g^s_t  = hs * softmax(W_s x_t)   (hs > 1),   1   (hs == 1)    [hs] shared weights
    a_t    = 2 * softmax(W_0 x_t)                                 [2]  shared vs routed
    g_t    = concat(a_t0 g^s_t, a_t1 g^r_t)                       (a = 1 if hs == 0 or R == 0)

The k, hs and 2 factors make a uniform router give every selected head gate 1,
so MoH with all heads selected and zero routers is exactly `mha`: that is how
a pretrained MHA layer is continue-tuned into MoH (`MixtureOfHeadAttention.from_mha`,
which copies the projections and zeroes the routers).

Load balance (code): l_aux = R * sum_i mean_t(p_{t,i}) * mean_t(1[i in TopK(p_t)]),
over the tokens of the batch; k for a uniform router. It is reported with
`sow(nnx.Intermediate, "aux_loss", l_aux)` (its weight in the loss is the
trainer's choice; the paper's is not confirmed here). The top-k selection is
discrete (no gradient), as in the code.

Open in the paper / chosen here: defaults num_shared_heads = H // 2 and
top_k = (H - hs) // 2 (75% of heads active, the MoH-LLaMA3-8B ratio; the
per-model splits are not confirmed); routers have no bias; routers read the
layer input x (as in the code). Padding tokens are counted in l_aux.

Fast path: attention for *all* heads via flash, then the gates in jnp.
Tiles of unselected heads are not skipped yet (no compute saving until a
gated-epilogue kernel skips tiles whose gates are all zero).

Options (`model.attention_options.<name>`): num_shared_heads (int, H // 2),
top_k (int, (H - num_shared_heads) // 2), router_init_scale (float, 1.0;
0 gives the uniform router, i.e. `mha` when every head is selected).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import registry
from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.attention.mha import MultiHeadAttention
from layers.linear import Linear
from pallas_kernels.flash import api as flash_api
from pallas_kernels.flash import reference as flash_reference


def moh(q: jax.Array, k: jax.Array, v: jax.Array, gates: jax.Array,
        mask: Optional[Mask] = None, *, scale: Optional[float] = None,
        implementation: str = "auto") -> jax.Array:
  """Gated heads: q [B,T,Hq,D], k/v [B,Tk,Hkv,D], gates [B,T,Hq] -> [B,T,Hq,D] (then W_O)."""
  mask = Mask.bidirectional() if mask is None else mask
  o = flash_api.flash_attention(q, k, v, scale=scale, implementation=implementation,
                                **mask.kernel_args())
  return o * gates[..., None].astype(o.dtype)


def moh_reference(q, k, v, gates, mask: Optional[Mask] = None, *,
                  scale: Optional[float] = None) -> jax.Array:
  """The specification: dense attention per head, then the gates."""
  mask = Mask.bidirectional() if mask is None else mask
  o = flash_reference.attention(q, k, v, mask_args=mask.mask_args(q.shape[0], q.shape[1], k.shape[1]),
                                scale=scale)
  return o * gates[..., None].astype(o.dtype)


def route(shared_logits: Optional[jax.Array], routed_logits: Optional[jax.Array],
          mix_logits: Optional[jax.Array], *, num_shared: int, top_k: int, lead_shape):
  """Two-stage gates [*lead, hs + R], the load-balance loss and the routed selection.

  shared_logits [*lead, hs] (None when hs <= 1), routed_logits [*lead, R] (None when
  R == 0), mix_logits [*lead, 2] (None unless hs > 0 and R > 0). Returns
  (gates, aux or None, selected [*lead, R] in {0, 1} or None).
  """
  aux = selected = None
  lead = tuple(lead_shape)
  g_s = g_r = None
  if num_shared > 0:
    if shared_logits is not None:
      g_s = jax.nn.softmax(shared_logits.astype(jnp.float32), axis=-1) * num_shared
    else:
      g_s = jnp.ones(lead + (num_shared,), jnp.float32)
  if routed_logits is not None:
    r = routed_logits.shape[-1]
    p = jax.nn.softmax(routed_logits.astype(jnp.float32), axis=-1)
    _, idx = jax.lax.top_k(p, top_k)
    selected = jnp.sum(jax.nn.one_hot(idx, r, dtype=jnp.float32), axis=-2)  # [B, T, R] in {0, 1}
    kept = p * selected
    denom = jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True), jnp.finfo(jnp.float32).eps)
    g_r = kept / denom * top_k
    me = jnp.mean(p.reshape(-1, r), axis=0)
    ce = jnp.mean(selected.reshape(-1, r), axis=0)
    aux = r * jnp.sum(me * ce)
  if mix_logits is not None:
    a = jax.nn.softmax(mix_logits.astype(jnp.float32), axis=-1) * 2.0
    g_s, g_r = g_s * a[..., :1], g_r * a[..., 1:]
  parts = [g for g in (g_s, g_r) if g is not None]
  return jnp.concatenate(parts, axis=-1), aux, selected


@registry.register("moh")
class MixtureOfHeadAttention(MultiHeadAttention):
  """`mha` projections + two-stage head router (see module doc)."""

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    h = cfg.num_heads
    hs = cfg.int_option("num_shared_heads", h // 2)
    if not 0 <= hs <= h:
      raise ValueError(
          f"model.attention_options.num_shared_heads must be in [0, num_heads={h}], got {hs}")
    r = h - hs
    k = cfg.int_option("top_k", r // 2 if r > 1 else r)
    if r > 0 and not 1 <= k <= r:
      raise ValueError(
          f"model.attention_options.top_k must be in [1, {r}] (the {r} routed heads), got {k}")
    if r == 0 and k != 0:
      raise ValueError(
          f"model.attention_options.top_k={k} but every head is shared"
          f" (num_shared_heads={hs} = num_heads); use top_k=0")
    init_scale = cfg.option("router_init_scale", 1.0)
    if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or init_scale < 0:
      raise ValueError(
          f"model.attention_options.router_init_scale must be a number >= 0, got {init_scale!r}")
    self.num_shared, self.num_routed, self.top_k = hs, r, k
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
              init_scale=float(init_scale) if init_scale > 0 else 1.0)
    self.router_routed = (Linear(cfg.d_model, r, axes=("embed", "heads"), **kw) if r > 0 else None)
    self.router_shared = (Linear(cfg.d_model, hs, axes=("embed", "heads"), **kw) if hs > 1 else None)
    self.router_mix = (Linear(cfg.d_model, 2, axes=("embed", None), **kw)
                       if hs > 0 and r > 0 else None)
    if init_scale == 0:
      self.zero_routers()

  def zero_routers(self):
    """Uniform routers: every selected head gets gate 1 (MoH with all heads selected == mha)."""
    for lin in (self.router_routed, self.router_shared, self.router_mix):
      if lin is not None:
        lin.kernel[...] = jnp.zeros_like(lin.kernel[...])

  @classmethod
  def from_mha(cls, layer: MultiHeadAttention, cfg: Optional[AttentionConfig] = None, *,
               rngs: nnx.Rngs) -> "MixtureOfHeadAttention":
    """A MoH layer that continue-tunes `layer`: same projections, uniform (zero) routers.

    `cfg` (default: the mha layer's) carries the MoH options; its head layout must match.
    """
    cfg = layer.cfg if cfg is None else cfg
    for f in ("d_model", "num_heads", "num_kv_heads", "head_dim", "use_bias"):
      if getattr(cfg, f) != getattr(layer.cfg, f):
        raise ValueError(f"from_mha: cfg.{f}={getattr(cfg, f)} differs from the mha layer's "
                         f"{getattr(layer.cfg, f)}")
    new = cls(cfg, rngs=rngs)
    nnx.update(new.qkv, nnx.clone(nnx.state(layer.qkv)))
    nnx.update(new.out, nnx.clone(nnx.state(layer.out)))
    new.zero_routers()
    return new

  def gates(self, x: jax.Array):
    """(gates [B, T, H], aux loss or None, routed selection [B, T, R] or None)."""
    call = lambda lin: None if lin is None else lin(x)
    return route(call(self.router_shared), call(self.router_routed), call(self.router_mix),
                 num_shared=self.num_shared, top_k=self.top_k, lead_shape=x.shape[:-1])

  def core(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask,
           positions: jax.Array) -> jax.Array:
    cfg = self.cfg
    gates, aux, _ = self.gates(x)
    if aux is not None:
      self.sow(nnx.Intermediate, "aux_loss", aux)
    q, k = self.positional(q, k, positions, positions)
    if cfg.implementation == "reference":
      return moh_reference(q, k, v, gates, mask)
    return moh(q, k, v, gates, mask, implementation=cfg.implementation)
