"""`bam`: Bayesian Attention Mechanism (positional id, `model.positional="bam"`).

"Bayesian Attention Mechanism: A Probabilistic Framework for Positional
Encoding and Context Length Extrapolation": positional encoding is a prior
over the attended position, so with an additive score the attention weight
factors as p_ij ∝ p(content_ij) p_h(i - j), i.e. (Derived)

    logit_h(i, j) += log p_h(i - j).

NoPE is the uniform prior and ALiBi a Laplace prior. The new prior is a
Generalized Gaussian per head (Std (confirm); the normaliser is constant
over j and cancels in the softmax):

    log p_h(Δ) = -(|Δ - μ_h| / α_h)^β_h,    Δ = i - j,  α_h > 0, β_h > 0.

Special cases: β = 1, μ = 0 is ALiBi with slope 1/α (`alibi`);
α -> ∞ is NoPE (the bias goes to 0).

Choices (open in the abstract; recorded here):
  * Parameterisation: α_h = exp(log_alpha_h), β_h = exp(log_beta_h) (both
    positive), μ_h unconstrained; all three learned, per query head, per
    layer (owned by the attention layer, so they train and checkpoint with it).
  * Initialisation: α_h = 1 / m_h with m_h the ALiBi slopes, β_h = 1, μ_h = 0,
    so a fresh BAM layer *is* ALiBi. Options
    (`model.attention_options.<name>`): `bam_alpha_init` ("alibi" or a
    positive number), `bam_beta_init` (positive, 1.0), `bam_mu_init` (0.0).
  * A public implementation of GGD-BAM we read (its `AttentionPrior`, not
    verified to be the paper's final code) writes the same prior as
    -|Δ - μ'|^β · exp(s) with exp(s) initialised to the ALiBi slopes, β = 1,
    μ' = 2 sinh(loc) with loc = 0 and not trained by default, and one prior
    shared by all layers by default. exp(s) = α^(-β) maps it onto ours; the
    per-layer prior, the learned μ and the positive β are our choices.
  * |Δ - μ|^β at Δ = μ is 0 with zero gradient (a `where`, so no NaN for
    β <= 1, where the true derivative is unbounded).
  * Use with RoPE (the abstract leaves it open): not combined here; q, k are
    untouched.

The layer hands the prior to the attention kernel as a distance bias
(slope, power, center) = (α^-β, β, μ): the Pallas kernels and the XLA path
evaluate it per tile and return its parameter gradients, so memory stays
O(T) (layers/attention/positional.py).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.attention.alibi import alibi_slopes, relative_distance
from layers.attention.config import AttentionConfig
from layers.attention.positional import PositionalEncoding, register_positional


def bam_bias(q_positions: jax.Array, kv_positions: jax.Array, alpha: jax.Array,
             beta: jax.Array, mu: jax.Array) -> jax.Array:
  """The pure function: -(|i - j - μ_h| / α_h)^β_h, float32 [B, H, Tq, Tk] (dense).

  alpha, beta, mu: [H] (alpha, beta > 0).
  """
  per_head = lambda p: jnp.asarray(p, jnp.float32)[None, :, None, None]
  z = jnp.abs(relative_distance(q_positions, kv_positions) - per_head(mu)) / per_head(alpha)
  positive = z > 0
  zb = jnp.exp(per_head(beta) * jnp.log(jnp.where(positive, z, 1.0)))
  return -jnp.where(positive, zb, 0.0)


def _positive(name: str, value) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError):
    value = float("nan")
  if not value > 0:
    raise ValueError(f"model.attention_options.{name} must be a positive number")
  return value


@register_positional("bam")
class BAM(PositionalEncoding):
  """Learned Generalized Gaussian prior per head; q and k untouched."""

  has_bias = True

  def __init__(self, cfg: AttentionConfig, *, rngs: Optional[nnx.Rngs] = None):
    del rngs  # deterministic initialisation
    h = cfg.num_heads
    alpha_init = cfg.option("bam_alpha_init", "alibi")
    if isinstance(alpha_init, str):
      if alpha_init != "alibi":
        raise ValueError(f"model.attention_options.bam_alpha_init={alpha_init!r} must be "
                         "'alibi' or a positive number")
      alpha = 1.0 / alibi_slopes(h)
    else:
      alpha = np.full((h,), _positive("bam_alpha_init", alpha_init), np.float32)
    beta = _positive("bam_beta_init", cfg.option("bam_beta_init", 1.0))
    mu = float(cfg.option("bam_mu_init", 0.0))
    pd = cfg.param_dtype
    self.log_alpha = nnx.Param(jnp.log(jnp.asarray(alpha, jnp.float32)).astype(pd),
                               logical_axes=("heads",))
    self.log_beta = nnx.Param(jnp.full((h,), np.log(beta), pd), logical_axes=("heads",))
    self.mu = nnx.Param(jnp.full((h,), mu, pd), logical_axes=("heads",))

  def prior(self):
    """(alpha, beta, mu), each float32 [H]."""
    f32 = lambda p: p[...].astype(jnp.float32)
    return jnp.exp(f32(self.log_alpha)), jnp.exp(f32(self.log_beta)), f32(self.mu)

  def distance_bias(self):
    """(α^-β, β, μ): -(|Δ - μ| / α)^β = -α^-β |Δ - μ|^β, the same as `bam_bias`."""
    alpha, beta, mu = self.prior()
    return jnp.stack([jnp.exp(-beta * jnp.log(alpha)), beta, mu], axis=1)
