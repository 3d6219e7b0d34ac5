"""The math of one [block_q, block_k] tile, shared by every Pallas kernel.

The kernels (tpu.py, gpu_triton.py) differ in how they walk the blocks and
move memory; what happens inside a tile is the same and lives here, written
on values (not refs) so the same code lowers on Mosaic TPU, Triton and in
interpret mode. The equations are `reference.py`'s:

    raw  = scale * q k^T                                       (float32)
    s    = cap * tanh(raw / cap)            if a soft cap
    s   += -slope_h |Δ - c_h|^p_h,  Δ = q_pos - k_pos           if a distance bias
    s    = -inf where not visible (the rules of masking.py)

Token-level mask data arrives per tile: query positions and segment ids as
[bq, 1] columns, key positions, segment ids and flags as [1, bk] rows. The
flags fold the per-sequence scalars into the keys, so no kernel reads a
batch-indexed scalar: bit 0 is "a real key" (index < Tk and < kv_lengths[b]),
bit 1 is "inside the bidirectional prefix" (k_pos < prefix_lengths[b]).

Per-head scalars travel as one row `head_params[h] = (slope, power, center,
sink)`; a call without a distance bias or sinks simply ignores those columns.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax.numpy as jnp

from pallas_kernels.flash import masking

VALID_KEY = 1
IN_PREFIX = 2
NUM_HEAD_PARAMS = 4  # slope, power, center, sink
SLOPE, POWER, CENTER, SINK = range(NUM_HEAD_PARAMS)


@dataclasses.dataclass(frozen=True)
class TileSpec:
  """Static settings of a call: what every tile computes."""

  scale: float
  soft_cap: Optional[float]
  is_causal: bool
  window: Optional[Tuple[Optional[int], Optional[int]]]
  chunk_size: Optional[int]
  has_prefix: bool
  has_positions: bool
  has_segments: bool
  has_distance_bias: bool
  has_sinks: bool

  @property
  def has_position_rule(self) -> bool:
    return self.is_causal or self.window is not None or self.chunk_size is not None


def visible(spec: TileSpec, q_pos, q_seg, k_pos, k_seg, k_flags):
  """Boolean [bq, bk]: masking.visible for one tile (q_* are [bq, 1], k_* are [1, bk])."""
  vis = (k_flags & VALID_KEY) != 0
  if spec.has_position_rule:
    rule = masking.position_rule(spec.is_causal, spec.window, spec.chunk_size, q_pos, k_pos)
    if spec.has_prefix:
      rule = rule | ((k_flags & IN_PREFIX) != 0)
    vis = vis & rule
  if spec.has_segments:
    vis = vis & (q_seg == k_seg)
  return vis


def raw_logits(spec: TileSpec, q, k):
  """scale * q k^T in float32 (q [bq, D], k [bk, D])."""
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
  return s * spec.scale


def _distance_terms(q_pos, k_pos, params):
  """x = |Δ - c| and x^p, with x^p = 0 at x = 0 (p > 0)."""
  delta = (q_pos - k_pos).astype(jnp.float32)
  x = jnp.abs(delta - params[CENTER])
  log_x = jnp.log(jnp.where(x > 0, x, 1.0))
  x_p = jnp.where(x > 0, jnp.exp(params[POWER] * log_x), 0.0)
  return delta, x, log_x, x_p


def logits(spec: TileSpec, raw, q_pos, k_pos, params, vis):
  """Masked logits s [bq, bk] from raw logits: soft cap, distance bias, -inf where invisible."""
  s = raw
  if spec.soft_cap is not None:
    s = spec.soft_cap * jnp.tanh(s / spec.soft_cap)
  if spec.has_distance_bias:
    _, _, _, x_p = _distance_terms(q_pos, k_pos, params)
    s = s - params[SLOPE] * x_p
  return jnp.where(vis, s, -jnp.inf)


def dlogits_to_draw(spec: TileSpec, ds, raw):
  """d raw from d s: the soft cap's derivative 1 - tanh^2 (identity without a cap)."""
  if spec.soft_cap is None:
    return ds
  t = jnp.tanh(raw / spec.soft_cap)
  return ds * (1.0 - t * t)


def distance_param_terms(q_pos, k_pos, params):
  """d bias / d (slope, power, center) per pair, shaped like q_pos - k_pos; zero where Δ = c."""
  delta, x, log_x, x_p = _distance_terms(q_pos, k_pos, params)
  slope, power, center = params[SLOPE], params[POWER], params[CENTER]
  g_slope = -x_p
  g_power = -slope * x_p * log_x
  x_pm1 = jnp.where(x > 0, jnp.exp((power - 1.0) * log_x), 0.0)
  g_center = slope * power * x_pm1 * jnp.sign(delta - center)
  return g_slope, g_power, g_center


def distance_param_grads(ds, q_pos, k_pos, params):
  """Row sums [bq, 1] of ds * d bias / d (slope, power, center)."""
  return tuple(jnp.sum(ds * g, axis=1, keepdims=True)
               for g in distance_param_terms(q_pos, k_pos, params))


def online_softmax_step(m, l, acc, s, v):
  """One tile of the online softmax: m, l [bq, 1], acc [bq, Dv] float32; s [bq, bk]; v [bk, Dv]."""
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp(m - m_safe)
  p = jnp.exp(s - m_safe)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return m_new, l, acc


def initial_state(spec: TileSpec, params, block_q: int, dv: int):
  """m, l, acc before the first tile: a sink starts the row at m = sink, l = 1."""
  if spec.has_sinks:
    m = jnp.full((block_q, 1), params[SINK], jnp.float32)
    l = jnp.ones((block_q, 1), jnp.float32)
  else:
    m = jnp.full((block_q, 1), -jnp.inf, jnp.float32)
    l = jnp.zeros((block_q, 1), jnp.float32)
  return m, l, jnp.zeros((block_q, dv), jnp.float32)


def finish(m, l, acc):
  """out = acc / l (zeros for an empty row) and lse = m + log l (-inf for an empty row)."""
  out = acc / jnp.where(l == 0.0, 1.0, l)
  lse = jnp.where(l > 0.0, m + jnp.log(jnp.where(l > 0.0, l, 1.0)), -jnp.inf)
  return out, lse


def backward_tile(spec: TileSpec, q, k, v, do, lse, delta, q_pos, q_seg, k_pos, k_seg, k_flags,
                  params):
  """Recomputes one tile and returns (p, ds_raw, ds): probabilities and logit gradients.

  lse must be +inf (not -inf) on rows with nothing visible, so p is 0 there.
  """
  raw = raw_logits(spec, q, k)
  vis = visible(spec, q_pos, q_seg, k_pos, k_seg, k_flags)
  s = logits(spec, raw, q_pos, k_pos, params, vis)
  p = jnp.exp(s - lse)
  dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
  ds = p * (dp - delta)
  return p, dlogits_to_draw(spec, ds, raw), ds
