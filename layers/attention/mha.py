"""`mha`: multi-head softmax attention with decoupled head counts (MHA / GQA / MQA).

From "Attention Is All You Need" (Vaswani et al., 2017) and, for shared KV
heads, "GQA: Training Generalized Multi-Query Transformer Models from
Multi-Head Checkpoints":

    O_h = softmax(Q_h K_{g(h)}^T / sqrt(d) + M) V_{g(h)},   g(h) = floor(h * Hkv / Hq)
    y   = concat_h(O_h) W_O

MHA: Hkv = Hq; GQA: Hkv divides Hq; MQA: Hkv = 1. KV heads are never
repeated in memory on the fast path. The mask M is a `Mask` (data, not a
[T, T] array); `positional` (an NNX module, layers/attention/positional.py)
transforms q and k by position ids first and may add a score bias that is
a function of i - j (ALiBi, BAM), passed to the kernel as `distance_bias`
and evaluated per tile by the Pallas kernels. An encoding that owns the
whole score computation (`owns_attention`, CoPE) runs in place of the
kernel call, and one that widens the heads (`heads_per_query`, RoPE++)
gets an out projection over that many heads per query head
(layers/attention/positional.py, (c) and (d)).
The core runs through `pallas_kernels.flash_attention`, whose
`implementation="auto"` picks the best backend for the platform and ends at
the memory-efficient XLA path; `implementation="reference"` runs the dense
quadratic form and can return the attention probabilities.

Decoding (ARCHITECTURE.md, contract point 7): `init_cache(batch, capacity)` makes
a `KVCache` (layers/attention/kv_cache.py: k, v [B, S, Hkv, D] after the
positional transform, lengths [B]); `prefill(x, cache, lengths=)` runs the
parallel path above and writes the prompt's K/V; `decode(x_new, cache)` projects
the new tokens, transforms q and k at their positions L_b + t (RoPE and every
per-token (a) transform), appends k, v and attends over the cache through
`decode_attention` (`attend_cache`; a window or an ALiBi/BAM distance bias runs
the flash path over the cache instead). prefill + decode steps equal the
parallel forward over the whole sequence. A family that changes only the
attention of transformed q, k, v overrides `attend` and `attend_cached` and
decodes the same way (gated: a gate on the output; sinks: sink logits in the
softmax). Families that change the rest of the core, and encodings that own
the attention (CoPE, rope_buckets), have no decode path: `decode_refusal()`
says why and the cache methods raise it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import probes
from layers.attention import registry
from layers.attention.config import AttentionConfig
from layers.attention.kv_cache import KVCache, attend_cache
from layers.attention.masks import Mask
from layers.attention.positional import POSITIONAL, make_positional
from layers.attention.projection import OutProjection, QKVProjection
from pallas_kernels.flash import api as flash_api
from pallas_kernels.flash import reference as flash_reference


def mha(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[Mask] = None, *,
        scale: Optional[float] = None, implementation: str = "auto",
        bias: Optional[jax.Array] = None,
        distance_bias: Optional[jax.Array] = None) -> jax.Array:
  """The pure function of the family: q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D] -> [B,Tq,Hq,D].

  bias: additive logits broadcasting to [B, Hq, Tq, Tk] (after the scale), differentiable.
  distance_bias: [Hq, 3] (slope, power, center) of -slope |i - j - center|^power.
  """
  mask = Mask.bidirectional() if mask is None else mask
  probes.record(lambda: mha_probs(q, k, v, mask, scale=scale, bias=bias,
                                  distance_bias=distance_bias), q)
  return flash_api.flash_attention(q, k, v, scale=scale, implementation=implementation,
                                   bias=bias, distance_bias=distance_bias, **mask.kernel_args())


def mha_probs(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[Mask] = None, *,
              scale: Optional[float] = None, bias: Optional[jax.Array] = None,
              distance_bias: Optional[jax.Array] = None) -> jax.Array:
  """Attention probabilities [B, Hq, Tq, Tk] from the reference path (for diagnostics and plots;
  `layers.attention.probes` records them for a whole model)."""
  mask = Mask.bidirectional() if mask is None else mask
  _, probs = flash_reference.attention(
      q, k, v, mask_args=mask.mask_args(q.shape[0], q.shape[1], k.shape[1]), scale=scale,
      bias=bias, distance_bias=distance_bias, return_probs=True)
  return probs


@registry.register("mha")
class MultiHeadAttention(nnx.Module):
  """Projections + positional encoding + `mha` core. Options: none (the head layout is in cfg)."""

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.qkv = QKVProjection(cfg, rngs=rngs)
    widen = getattr(POSITIONAL.get(cfg.positional), "heads_per_query", 1)  # static, by class
    self.out = OutProjection(cfg, num_heads=cfg.num_heads * widen, rngs=rngs)
    self.positional = make_positional(cfg, rngs=rngs)
    cls = type(self)
    own_core = (cls.core is not MultiHeadAttention.core
                or cls.__call__ is not MultiHeadAttention.__call__
                or cls.attend is not MultiHeadAttention.attend)
    family = getattr(cls, "family_id", cls.__name__)
    if (self.positional.has_bias and not getattr(cls, "applies_positional_bias", False)
        and own_core):
      raise ValueError(
          f"attention={family!r} does not apply the score bias "
          f"of positional={cfg.positional!r} (model.positional) yet; use a family that does "
          "(e.g. 'mha') or a positional encoding without a bias")
    if own_core and (self.positional.owns_attention or self.positional.heads_per_query != 1):
      what = ("computes the attention itself" if self.positional.owns_attention
              else "adds attention heads")
      raise ValueError(
          f"attention={family!r} has its own attention core, which does not run "
          f"positional={cfg.positional!r} (model.positional; it {what}); use attention='mha'")

  def __call__(self, x: jax.Array, *, mask: Optional[Mask] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    mask, positions = self.resolve_mask(x, mask, positions)
    q, k, v = self.qkv(x)
    return self.out(self.core(x, q, k, v, mask, positions))

  def resolve_mask(self, x: jax.Array, mask: Optional[Mask],
                   positions: Optional[jax.Array]) -> Tuple[Mask, jax.Array]:
    """The layer's mask (its own causality and window by default) with token positions."""
    cfg = self.cfg
    mask = Mask(causal=cfg.causal) if mask is None else mask
    if cfg.window is not None:
      mask = mask.replace(window=cfg.window)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    return mask.replace(q_positions=positions, kv_positions=positions), positions

  def core(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask,
           positions: jax.Array) -> jax.Array:
    """Projected (not yet rotated) q, k, v -> per-head outputs [B, T, Hq, D].

    The one place a family changes the attention itself; x is the layer input
    (for gates and routers).
    """
    q, k = self.positional(q, k, positions, positions)
    return self.attend(x, q, k, v, mask)

  def attend(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array,
             mask: Mask) -> jax.Array:
    """Already transformed q, k and v -> per-head outputs (the second half of `core`).

    A family that changes only this half (a gate on the output, sink logits)
    overrides it together with `attend_cached`, its decode counterpart, and
    then prefills and decodes like `mha`.
    """
    if self.positional.owns_attention:
      return self.positional.attention(q, k, v, mask, implementation=self.cfg.implementation)
    return mha(q, k, v, mask, implementation=self.cfg.implementation,
               distance_bias=self.positional.distance_bias())

  def train_flops_per_token(self, seq_len: int) -> float:
    """Score and value matmul FLOPs per token, forward + backward (PaLM's 12 Hq Dh T)."""
    heads = self.cfg.num_heads * self.positional.heads_per_query
    return 12.0 * heads * self.cfg.head_dim * seq_len

  # Decoding ------------------------------------------------------------------
  def decode_refusal(self) -> Optional[str]:
    """Why this layer has no KV-cache decode path (a message naming the setting), or None."""
    cls = type(self)
    base = MultiHeadAttention
    if (cls.core is not base.core or cls.__call__ is not base.__call__
        or (cls.attend is not base.attend and cls.attend_cached is base.attend_cached)):
      family = getattr(cls, "family_id", cls.__name__)
      return (f"attention={family!r} (model.attention) has no KV-cache decode path; "
              "use attention='mha' (or 'sqa') to generate")
    if self.positional.owns_attention:
      return (f"positional={self.cfg.positional!r} (model.positional) computes the attention "
              "itself and has no KV-cache decode path")
    if not self.cfg.causal:
      return "a bidirectional attention layer (causal=False) has no KV-cache decode path"
    return None

  def _check_decodable(self) -> None:
    refusal = self.decode_refusal()
    if refusal is not None:
      raise ValueError(refusal)

  def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
    """An empty cache of `capacity` positions per sequence (dtype: cfg.dtype by default)."""
    self._check_decodable()
    cfg = self.cfg
    return KVCache.zeros(batch, capacity, cfg.num_kv_heads, cfg.head_dim,
                         cfg.dtype if dtype is None else dtype)

  def prefill(self, x: jax.Array, cache: KVCache, *, lengths: Optional[jax.Array] = None,
              mask: Optional[Mask] = None, positions: Optional[jax.Array] = None
              ) -> Tuple[jax.Array, KVCache]:
    """The parallel forward over prompts x [B, T, d] (right-padded; `lengths` [B] real
    tokens, T by default) -> (y [B, T, d], the cache holding their K/V at 0..T-1)."""
    self._check_decodable()
    mask, positions = self.resolve_mask(x, mask, positions)
    q, k, v = self.qkv(x)
    # The mha core, split so the transformed keys it attends with are the ones cached.
    q, k = self.positional(q, k, positions, positions)
    y = self.out(self.attend(x, q, k, v, mask))
    if lengths is None:
      lengths = jnp.full((x.shape[0],), x.shape[1], jnp.int32)
    return y, cache.fill(k, v, lengths)

  def decode(self, x: jax.Array, cache: KVCache) -> Tuple[jax.Array, KVCache]:
    """New tokens x [B, Tq, d] (Tq = 1 for a step) at positions L_b + t -> (y, cache + them)."""
    self._check_decodable()
    q, k, v = self.qkv(x)
    positions = cache.positions(x.shape[1])
    q, k = self.positional(q, k, positions, positions)
    cache = cache.write(k, v)
    return self.out(self.attend_cached(x, q, cache)), cache

  def attend_cached(self, x: jax.Array, q: jax.Array, cache: KVCache) -> jax.Array:
    """`attend` for new tokens: transformed q [B, Tq, Hq, D] against the cache that holds them."""
    return attend_cache(q, cache, window=self.cfg.window,
                        distance_bias=self.positional.distance_bias(),
                        implementation=self.cfg.implementation)
