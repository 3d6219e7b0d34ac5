"""`nope_hybrid`: NoPE, head temperature, QK-Norm, layer schedules (`model.positional="nope_hybrid"`).

"Rope to Nope and Back Again: A New Hybrid Attention Strategy" (RNoPE-SWA) and
"Length Generalization of Causal Transformers without Position Encoding".

Per layer l, with kind_l = positional_schedule[l mod len] in {rope, nope}:

    q, k   <- g_q ⊙ q / rms(q),  g_k ⊙ k / rms(k)        (optional QK-Norm; rms over head_dim)
    q, k   <- R(pos) q, R(pos) k        if kind_l = rope  (layers/attention/rope.py, cfg.rope_*)
    q_h    <- τ_h q_h                                     (per-head temperature, folded into q)
    O_h     = softmax(τ_h q_h·k/√d + M_l) V               (M_l: window rope_window on RoPE layers)

so logits are softmax(τ_h q·k/√d) as in the NoPE paper, and the kernel is the
plain flash kernel (no bias).

Choices (open in the abstracts; recorded here):
  * Schedule: `positional_schedule` (AttentionConfig / model field), a
    comma-separated list of `rope` / `nope` cycled over layers. Default
    "rope,rope,rope,nope": our reading of RNoPE-SWA is 3 RoPE layers with a
    sliding window to 1 NoPE layer with full attention ([confirm] ratio and
    order against the paper; Cohere's Command A ships this 3:1 interleave).
  * Window: `rope_window` (model field, default None = full attention) is the
    sliding window of the RoPE layers only; the paper's recipe uses one
    ([confirm] 4096 tokens). NoPE layers keep `model.window` (normally None).
  * Temperature: τ_h = exp(log_tau_h), learned, per query head, initialised to
    option `head_temperature` (a positive number or H of them; default 1.0,
    which is the baseline). The NoPE paper *searches* τ_h with a
    parameter-efficient tuning of the otherwise frozen model: train only the
    `log_tau` parameters for that recipe.
  * QK-Norm (Std): option `qk_norm` (default False): RMS-normalise q and k
    over head_dim with learned per-channel scales g_q, g_k [head_dim] shared
    by the heads (init 1, as OLMo 2 / Gemma 3), eps option `qk_norm_eps`
    (1e-6); applied before RoPE, on every layer of the schedule.
Options are `model.attention_options.<name>`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.attention.config import AttentionConfig, layer_positional
from layers.attention.positional import PositionalEncoding, RoPE, register_positional


def rms_normalize(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(mean(x^2 over the last axis) + eps) * scale, computed in float32, in x.dtype."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _temperatures(value, num_heads: int) -> np.ndarray:
  try:
    tau = np.broadcast_to(np.asarray(value, np.float64), (num_heads,))
  except (TypeError, ValueError):
    tau = np.full((num_heads,), np.nan)
  if not np.all(tau > 0):
    raise ValueError(f"model.attention_options.head_temperature={value!r} must be a positive "
                     f"number or {num_heads} of them")
  return tau.astype(np.float32)


@register_positional("nope_hybrid")
class NoPEHybrid(PositionalEncoding):
  """The layer's kind (rope | nope) from the schedule, temperatures, optional QK-Norm."""

  def __init__(self, cfg: AttentionConfig, *, rngs: Optional[nnx.Rngs] = None):
    del rngs  # deterministic initialisation
    self.kind = layer_positional(cfg)
    self.rope = RoPE(cfg) if self.kind == "rope" else None
    pd = cfg.param_dtype
    tau = _temperatures(cfg.option("head_temperature", 1.0), cfg.num_heads)
    self.log_tau = nnx.Param(jnp.log(jnp.asarray(tau)).astype(pd), logical_axes=("heads",))
    qk_norm = cfg.bool_option("qk_norm", False)
    self.eps = float(cfg.option("qk_norm_eps", 1e-6))
    if not self.eps > 0:
      raise ValueError(f"model.attention_options.qk_norm_eps must be positive, got {self.eps}")
    if qk_norm:
      self.q_norm = nnx.Param(jnp.ones((cfg.head_dim,), pd), logical_axes=("head_dim",))
      self.k_norm = nnx.Param(jnp.ones((cfg.head_dim,), pd), logical_axes=("head_dim",))
    else:
      self.q_norm = self.k_norm = None

  def temperature(self) -> jax.Array:
    """τ [Hq], float32."""
    return jnp.exp(self.log_tau[...].astype(jnp.float32))

  def __call__(self, q: jax.Array, k: jax.Array, q_positions, kv_positions):
    if self.q_norm is not None:
      q = rms_normalize(q, self.q_norm[...], self.eps)
      k = rms_normalize(k, self.k_norm[...], self.eps)
    if self.rope is not None:
      q, k = self.rope(q, k, q_positions, kv_positions)
    q = (q.astype(jnp.float32) * self.temperature()[:, None]).astype(q.dtype)
    return q, k
