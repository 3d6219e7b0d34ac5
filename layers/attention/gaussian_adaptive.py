"""`gaussian_adaptive`: Multi-Head Gaussian Adaptive Attention (GAAM) feature reweighting.

From "Gaussian Adaptive Attention is All You Need: Robust Contextual
Representations Across Multiple Modalities" (Ioannides, Chadha and Elkins,
2024; later retitled "Density Adaptive Attention ..."; code
github.com/gioannides/Gaussian-Adaptive-Attention). Each GAAM head owns a
learnable mean offset and a learnable variance scale; the data's own mean and
variance along the normalised axis centre and scale a Gaussian that reweights
every feature, and the heads (groups of the axis) together model a
multi-modal importance profile:

    for head m (a contiguous group of n features of the axis):
      xbar_m, s2_m = mean and (unbiased) variance of the group
      gate = exp( -(x - (xbar_m + delta_m))^2 / (2 xi_m (s2_m + eps)) ),   xi_m = c_m^2
      y    = x * gate                                  (normalize=False, the default)
      y    = x * gate / max(sum_group(gate), eps)      (normalize=True, the authors' code)

Confirmed against the authors' code (read in this session): mean offsets
initialised at 0, a learned scale c with variance c^2 (initial_c = 2 in the
released MHGAAM), the *unbiased* variance plus eps, heads = equal chunks of the
normalised axis with statistics per chunk, and the output x * weights. The
code also divides the weights by their sum over the axis and, in some
versions, mixes several Gaussians per head; the FAMILIES.md Std form has
neither, so `normalize` defaults to False (then xi -> inf gives gate -> 1, the
identity) and one Gaussian per head is used.

The axis (open in the paper; its code takes `norm_axis` as an argument):
**the feature axis of each token**. In a causal LM the sequence axis would mix
future tokens into the statistics; per-token feature statistics are causal by
construction (tested). GAAM alone mixes no tokens, so in the attention slot it
is combined with dot-product attention ("compatibility with dot-product-based
attention models", abstract) -- option `placement`, a choice made here:
  * "output" (default): the `mha` core, then GAAM on each attention head's
    output along head_dim, one (delta_h, c_h) per attention head (GAAM heads =
    attention heads), before W_O -- the position of a gated-attention gate;
  * "input": GAAM on the layer input x along d_model with `gaussian_heads`
    groups, then the usual q/k/v projections and `mha`.

Importance Factor (diagnostic): `importance_factor(gate)` is the gate averaged
over every axis but the features, min-max scaled to [0, 1] (our reading of
the paper's IF; the exact normalisation is unconfirmed). `GaussianAdaptiveAttention.gates`
returns the layer's gate values for it. A positional distance bias (ALiBi, BAM) is passed
to the `mha` call, as in `mha`.

Paths: `gaussian_adaptive_reference` computes each head by slicing its chunk
and writing mean and variance as explicit sums (the authors' loop);
`gaussian_adaptive` is the vectorised form (one reshape to [..., heads, n]);
both are elementwise, O(T d) time and memory, and the attention itself is the
flash path of `mha` ("reference" runs the dense reference attention).

Options (`model.attention_options.<name>`): placement ("output" | "input"),
gaussian_heads (int dividing d_model, default num_heads; "input" only),
initial_c (float > 0, 2.0), normalize (bool, False), eps (float > 0, 1e-5).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import registry
from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.attention.mha import MultiHeadAttention, mha

PLACEMENTS = ("output", "input")


def _check(x, mean_offset, c):
  h = mean_offset.shape[0]
  if mean_offset.shape != (h,) or c.shape != (h,):
    raise ValueError(f"mean_offset and c must both be [heads]; got {mean_offset.shape}, {c.shape}")
  if x.shape[-1] % h or x.shape[-1] // h < 2:
    raise ValueError(f"the last axis ({x.shape[-1]}) must split into {h} heads of >= 2 features")
  return h


def gaussian_gate(x, mean_offset, c, *, normalize: bool = False, eps: float = 1e-5):
  """The GAAM weights of x [..., F] (F split into len(mean_offset) heads), float32, shape of x."""
  h = _check(x, mean_offset, c)
  xs = x.astype(jnp.float32).reshape(x.shape[:-1] + (h, x.shape[-1] // h))
  mean = jnp.mean(xs, axis=-1, keepdims=True)
  var = jnp.var(xs, axis=-1, ddof=1, keepdims=True) + eps
  xi = jnp.square(c.astype(jnp.float32))[:, None]
  center = mean + mean_offset.astype(jnp.float32)[:, None]
  g = jnp.exp(-jnp.square(xs - center) / (2.0 * xi * var))
  if normalize:
    g = g / jnp.maximum(jnp.sum(g, axis=-1, keepdims=True), eps)
  return g.reshape(x.shape)


def gaussian_adaptive(x, mean_offset, c, *, normalize: bool = False, eps: float = 1e-5):
  """The pure function: x * gaussian_gate(x) (vectorised over heads)."""
  return (x.astype(jnp.float32) * gaussian_gate(x, mean_offset, c, normalize=normalize,
                                                 eps=eps)).astype(x.dtype)


def gaussian_adaptive_reference(x, mean_offset, c, *, normalize: bool = False,
                                eps: float = 1e-5, return_gate: bool = False):
  """Specification: head by head on its chunk, mean and variance written as sums."""
  h = _check(x, mean_offset, c)
  n = x.shape[-1] // h
  outs, gates = [], []
  for m in range(h):
    chunk = x[..., m * n:(m + 1) * n].astype(jnp.float32)
    mean = jnp.sum(chunk, axis=-1, keepdims=True) / n
    var = jnp.sum(jnp.square(chunk - mean), axis=-1, keepdims=True) / (n - 1) + eps
    g = jnp.exp(-jnp.square(chunk - (mean + mean_offset[m])) / (2.0 * c[m] ** 2 * var))
    if normalize:
      g = g / jnp.maximum(jnp.sum(g, axis=-1, keepdims=True), eps)
    outs.append(chunk * g)
    gates.append(g)
  out = jnp.concatenate(outs, axis=-1).astype(x.dtype)
  return (out, jnp.concatenate(gates, axis=-1)) if return_gate else out


def importance_factor(gate: jax.Array) -> jax.Array:
  """Importance per feature (last axis): the mean gate over all other axes, min-max to [0, 1]."""
  a = jnp.mean(gate.reshape(-1, gate.shape[-1]).astype(jnp.float32), axis=0)
  lo, hi = jnp.min(a), jnp.max(a)
  return (a - lo) / jnp.where(hi > lo, hi - lo, 1.0)


@registry.register("gaussian_adaptive")
class GaussianAdaptiveAttention(MultiHeadAttention):
  """`mha` + GAAM feature reweighting on the head outputs or on the input (see module doc)."""

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)  # q/k/v/o first: same weights as `mha` per seed
    self.placement = cfg.option("placement", "output")
    if self.placement not in PLACEMENTS:
      raise ValueError(
          f"model.attention_options.placement={self.placement!r} is not one of {PLACEMENTS}")
    self.normalize = cfg.bool_option("normalize", False)
    initial_c = cfg.option("initial_c", 2.0)
    eps = cfg.option("eps", 1e-5)
    for name, value in (("initial_c", initial_c), ("eps", eps)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"model.attention_options.{name} must be a positive number, got {value!r}")
    self.eps = float(eps)
    if self.placement == "output":
      heads, width, axis = cfg.num_heads, cfg.head_dim, "heads"
    else:
      heads, width, axis = cfg.int_option("gaussian_heads", cfg.num_heads), cfg.d_model, None
      if heads < 1 or cfg.d_model % heads:
        raise ValueError(f"model.attention_options.gaussian_heads={heads} must divide "
                         f"d_model={cfg.d_model}")
      width = cfg.d_model // heads
    if width < 2:
      raise ValueError(f"gaussian_adaptive needs >= 2 features per Gaussian head, got {width}")
    self.mean_offset = nnx.Param(jnp.zeros((heads,), cfg.param_dtype), logical_axes=(axis,))
    self.c = nnx.Param(jnp.full((heads,), float(initial_c), cfg.param_dtype), logical_axes=(axis,))

  applies_positional_bias = True  # the distance bias goes to the `mha` call

  def _gaam(self, y):
    kw = dict(normalize=self.normalize, eps=self.eps)
    if self.cfg.implementation == "reference":
      return gaussian_adaptive_reference(y, self.mean_offset[...], self.c[...], **kw)
    return gaussian_adaptive(y, self.mean_offset[...], self.c[...], **kw)

  def _gate(self, y):
    return gaussian_gate(y, self.mean_offset[...], self.c[...], normalize=self.normalize,
                         eps=self.eps)

  def _heads(self, q, k, v, mask, positions):
    q, k = self.positional(q, k, positions, positions)
    return mha(q, k, v, mask, implementation=self.cfg.implementation,
               distance_bias=self.positional.distance_bias())

  def __call__(self, x: jax.Array, *, mask: Optional[Mask] = None,
               positions: Optional[jax.Array] = None) -> jax.Array:
    if self.placement == "input":
      mask, positions = self.resolve_mask(x, mask, positions)
      return self.out(self._heads(*self.qkv(self._gaam(x)), mask, positions))
    return super().__call__(x, mask=mask, positions=positions)

  def core(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask,
           positions: jax.Array) -> jax.Array:
    """Per-head outputs; with placement="output" each head's output is GAAM-reweighted."""
    o = self._heads(q, k, v, mask, positions)
    if self.placement == "input":
      return o
    b, t, h, d = o.shape
    return self._gaam(o.reshape(b, t, h * d)).reshape(b, t, h, d)

  def gates(self, x: jax.Array, *, mask: Optional[Mask] = None,
            positions: Optional[jax.Array] = None) -> jax.Array:
    """The GAAM weights: [B, T, Hq, head_dim] ("output") or [B, T, d_model] ("input")."""
    if self.placement == "input":
      return self._gate(x)
    mask, positions = self.resolve_mask(x, mask, positions)
    o = self._heads(*self.qkv(x), mask, positions)
    b, t, h, d = o.shape
    return self._gate(o.reshape(b, t, h * d)).reshape(b, t, h, d)
