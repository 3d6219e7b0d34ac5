"""Reference softmax attention in plain jax.numpy: the specification.

For query head h, which reads kv head g(h) = floor(h * Hkv / Hq):

    S   = scale * Q_h K_{g(h)}^T                      [Tq, Tk]
    S   = cap * tanh(S / cap)                          if logits_soft_cap
    S   = S + bias_h                                   if bias
    S   = S - slope_h |Δ - c_h|^p_h,  Δ = q_pos - k_pos  if a distance bias
    S   = where(visible, S, -inf)                      the mask (masking.py)
    lse = log(sum_j exp(S_ij) + exp(sink_h))           the sink term if sinks
    O_h = exp(S - lse) V_{g(h)}

The distance bias is an additive bias that depends only on the distance of
positions (ALiBi: p = 1, c = 0; BAM's generalised Gaussian prior: slope =
α^-β, p = β, c = μ); `distance_bias[h] = (slope, power, center)`. The fast
paths compute it inside each tile; here it is rendered dense.
The soft cap comes before the bias so that an additive -inf bias stays a mask
(tanh would turn it into -cap). A sink is a learned logit that joins every
row's softmax denominator but carries no value, so a row may give weight to
"nothing" (gpt-oss, StreamingLLM); it is neither scaled nor capped.

Quadratic in sequence length on purpose: every fast path (the memory-efficient
XLA path, the Pallas kernels) is tested against this function, outputs and
gradients. Rows with no visible key output zeros and have zero gradients; their
log-sum-exp is -inf (or the sink logit when there are sinks).
Layout is [batch, seq, heads, head_dim] throughout.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.flash import masking


def check_qkv(q, k, v):
  """Shape rules shared by every path; errors name the offending argument."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f"q, k, v must be [batch, seq, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
  b, _, hq, d = q.shape
  if k.shape[0] != b or v.shape[0] != b:
    raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k and v must agree on [batch, seq, heads]: {k.shape} vs {v.shape}")
  if k.shape[3] != d:
    raise ValueError(f"q and k head_dim differ: {d} vs {k.shape[3]}")
  hkv = k.shape[2]
  if hq % hkv:
    raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")


def check_bias(bias, q, k):
  """Checks that `bias` broadcasts to [B, Hq, Tq, Tk]; returns it left-padded to 4-D."""
  b, tq, hq, _ = q.shape
  tk = k.shape[1]
  if bias.ndim > 4:
    raise ValueError(f"bias must broadcast to [B, Hq, Tq, Tk]; got {bias.shape}")
  bias4 = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))
  for size, full, name in zip(bias4.shape, (b, hq, tq, tk), ("B", "Hq", "Tq", "Tk")):
    if size not in (1, full):
      raise ValueError(
          f"bias must broadcast to [B={b}, Hq={hq}, Tq={tq}, Tk={tk}]; its {name} axis is {size}"
          f" (bias shape {tuple(bias.shape)})")
  return bias4


def check_sinks(sinks, q):
  hq = q.shape[2]
  if tuple(sinks.shape) != (hq,):
    raise ValueError(f"sinks must have shape ({hq},) (one logit per query head), got {sinks.shape}")


def check_distance_bias(distance_bias, q):
  hq = q.shape[2]
  if tuple(distance_bias.shape) != (hq, 3):
    raise ValueError("distance_bias must have shape"
                     f" ({hq}, 3) (slope, power, center per query head), got {distance_bias.shape}")


def positions(mask_args: Optional[masking.MaskArgs], batch: int, tq: int, tk: int):
  """(q_positions [B, Tq], kv_positions [B, Tk]): the mask's, or the bottom-right default."""
  if mask_args is not None and mask_args.q_positions is not None:
    return mask_args.q_positions, mask_args.kv_positions
  kv_pos = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (batch, tk))
  q_pos = jnp.broadcast_to(jnp.arange(tk - tq, tk, dtype=jnp.int32), (batch, tq))
  return q_pos, kv_pos


def distance_bias_dense(distance_bias: jax.Array, q_positions: jax.Array,
                        kv_positions: jax.Array) -> jax.Array:
  """-slope_h |q_pos - k_pos - c_h|^p_h as float32 [B, Hq, Tq, Tk]; 0 where the distance is c_h.

  |x|^p is written exp(p log x) with x = 0 mapped to 0 with zero gradient, so
  p <= 1 (whose derivative is unbounded at 0) gives no NaN.
  """
  params = distance_bias.astype(jnp.float32)
  slope, power, center = (params[:, i][None, :, None, None] for i in range(3))
  delta = (q_positions[:, None, :, None] - kv_positions[:, None, None, :]).astype(jnp.float32)
  x = jnp.abs(delta - center)
  safe = jnp.where(x > 0, x, 1.0)
  return -slope * jnp.where(x > 0, jnp.exp(power * jnp.log(safe)), 0.0)


def repeat_kv(x: jax.Array, num_q_heads: int) -> jax.Array:
  """[B, T, Hkv, D] -> [B, T, Hq, D]: kv head g serves query heads g*G .. g*G + G - 1."""
  return jnp.repeat(x, num_q_heads // x.shape[2], axis=2)


def dense_logits(q: jax.Array, k: jax.Array, scale: Optional[float] = None) -> jax.Array:
  """scale * Q K^T in float32, [B, Hq, Tq, Tk], GQA by repeating K (the obvious form)."""
  scale = q.shape[3] ** -0.5 if scale is None else scale
  kf = repeat_kv(k, q.shape[2]).astype(jnp.float32)
  return jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf) * scale


def softmax_with_sink(s: jax.Array, sink: Optional[jax.Array] = None):
  """Softmax over the last axis of masked logits `s` (-inf = masked) -> (probs, lse [...]).

  `sink` (broadcasting against s[..., :1]) joins the denominator with no
  value. A row with nothing visible outputs zeros, with lse -inf (the sink
  logit with a sink).
  """
  m = jnp.max(s, axis=-1, keepdims=True, initial=-jnp.inf)  # `initial`: Tk may be 0
  if sink is not None:
    m = jnp.maximum(m, sink)
  # The shift cancels in the softmax; stopping its gradient keeps rows of all
  # -inf from sending anything through max.
  m = jax.lax.stop_gradient(m)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m_safe)
  l = jnp.sum(p, axis=-1, keepdims=True)
  if sink is not None:
    l = l + jnp.exp(sink - m_safe)
  probs = p / jnp.where(l == 0, 1.0, l)
  l = l[..., 0]
  # log of a safe argument: the untaken branch's log(0) would make a NaN gradient.
  lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + m_safe[..., 0], -jnp.inf)
  return probs, lse


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask_args: Optional[masking.MaskArgs] = None,
    bias: Optional[jax.Array] = None,
    scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None,
    distance_bias: Optional[jax.Array] = None,
    return_lse: bool = False,
    return_probs: bool = False,
):
  """Dense attention. Returns out [B, Tq, Hq, Dv] (+ lse [B, Hq, Tq]) (+ probs [B, Hq, Tq, Tk]).

  `bias` broadcasts against [B, Hq, Tq, Tk]; `sinks` is [Hq]; `distance_bias`
  is [Hq, 3] (slope, power, center), on the mask's positions or the default. `probs` are the
  weights on the keys; with sinks a row sums to less than one.
  """
  check_qkv(q, k, v)
  b, tq, hq, d = q.shape
  tk = k.shape[1]
  if scale is None:
    scale = d ** -0.5
  v_full = repeat_kv(v, hq)
  s = dense_logits(q, k, scale)
  if logits_soft_cap is not None:
    s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
  if bias is not None:
    s = s + check_bias(bias, q, k).astype(jnp.float32)
  if distance_bias is not None:
    check_distance_bias(distance_bias, q)
    s = s + distance_bias_dense(distance_bias, *positions(mask_args, b, tq, tk))
  allowed = None
  if mask_args is not None:
    allowed = masking.visible(mask_args, jnp.arange(tq), jnp.arange(tk))
  if allowed is not None:
    s = jnp.where(allowed, s, -jnp.inf)
  sink = None
  if sinks is not None:
    check_sinks(sinks, q)
    sink = sinks.astype(jnp.float32)[None, :, None, None]
  probs, lse = softmax_with_sink(s, sink)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, v_full.astype(jnp.float32)).astype(q.dtype)
  results = [out]
  if return_lse:
    results.append(lse)
  if return_probs:
    results.append(probs)
  return results[0] if len(results) == 1 else tuple(results)
