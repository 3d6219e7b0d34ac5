"""Rotary position embeddings, "RoFormer: Enhanced Transformer with Rotary Position Embedding".

Each pair of channels (i, i + d/2) ("rotate-half" layout, as in Llama and the
Hugging Face checkpoints) is rotated by the angle p * theta_i, with
theta_i = base^(-2i/d):

    x'_i       = x_i cos(p theta_i) - x_{i+d/2} sin(p theta_i)
    x'_{i+d/2} = x_{i+d/2} cos(p theta_i) + x_i sin(p theta_i)

Context extension by a factor s rescales the frequencies (`scaling_type`):
  * linear  ("position interpolation"; "Giraffe: Adventures in Expanding
    Context Lengths in LLMs" finds it the best method): theta_i / s,
    i.e. positions p -> p / s.
  * ntk     (NTK-aware scaling): base -> base * s^(d / (d - 2)); the highest
    frequency is kept and the lowest is divided by exactly s.
  * yarn    ("YaRN: Efficient Context Window Extension of Large Language
    Models"): per frequency, a ramp between keeping theta_i (wavelengths
    shorter than L / beta_fast, L the original context) and theta_i / s
    (wavelengths longer than L / beta_slow), beta_fast = 32, beta_slow = 1;
    q and k are both multiplied by 0.1 ln s + 1, so logits by its square.
  * llama3  (the Llama 3.1 rule): theta_i kept for wavelengths < L / 4,
    divided by s for wavelengths > L, smoothly interpolated between.
  * truncated ("Giraffe: Adventures in Expanding Context Lengths in LLMs",
    the truncated basis): after the linear rule theta_i / s (s = 1: none),

        theta*_i = theta_i   if theta_i >= b          (high frequencies kept)
                   rho       if a < theta_i < b       (middle band: one slow frequency)
                   0         if theta_i <= a          (low band: not rotated at all)

    with b = 2 pi / L, a = b / r_a, rho = b / r_rho (L = original_max_len;
    r_a = truncate_zero_ratio = 8, r_rho = truncate_rho_ratio = 16 by default).
    A kept frequency completes at least one turn within L; the zeroed channels
    carry no position, so they score the same at every distance.
    Confirmed from the authors' code (github.com/abacusai/Long-Context,
    python/models/interpolate.py, `truncate_frequency` and
    `ScaledLlamaRotaryEmbedding`): `--truncate-pos` is "the context length at
    which to truncate wavelengths", cutoff t = 2 pi / truncate_pos = b, zero
    band below t / 8 = a, middle band set to 2 pi / (16 truncate_pos) = rho,
    applied after the linear scale. Note rho = b / 16 < a = b / 8: the middle
    band rotates slower than any kept frequency, still not zero. The paper's
    text was not available here: the three-band rule is the paper's as quoted
    in the issue, the factors 8 and 16 (the defaults) are the code's, not
    checked against the paper's experiments. Boundaries as the paper's rule
    (theta_i <= a -> 0); the code zeroes theta_i < a (they differ only at
    equality). Our choice: the cutoff length L is the model's
    `rope_original_max_len` (required), the code's `--truncate-pos`.
The formulas follow the published reference implementations (the Hugging
Face `rope_utils` rules; the authors' code for `truncated`), which the
checkpoints they shipped with use.
Angles are computed in float32 from integer positions, so cached and
recomputed positions agree.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

SCALING_TYPES = ("linear", "ntk", "yarn", "llama3", "truncated")
TRUNCATE_ZERO_RATIO = 8.0  # b / a of the truncated basis (the Giraffe code's 8)
TRUNCATE_RHO_RATIO = 16.0  # b / rho (the Giraffe code's 16)


def rope_frequencies(head_dim: int, base: float = 10_000.0, *, scaling: float = 1.0,
                     scaling_type: str = "linear",
                     original_max_len: Optional[int] = None,
                     truncate_zero_ratio: float = TRUNCATE_ZERO_RATIO,
                     truncate_rho_ratio: float = TRUNCATE_RHO_RATIO) -> Tuple[np.ndarray, float]:
  """(theta [head_dim / 2] float32, attention_factor) for the given scaling rule.

  truncate_zero_ratio (b / a >= 1) and truncate_rho_ratio (b / rho > 0) are read only by
  scaling_type="truncated".
  """
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  if scaling_type not in SCALING_TYPES:
    raise ValueError(f"rope_scaling_type={scaling_type!r} is not one of {SCALING_TYPES}")
  if scaling <= 0:
    raise ValueError(f"rope_scaling must be positive, got {scaling}")
  if base <= 0:
    raise ValueError(f"rope_base must be positive, got {base}")
  d = head_dim
  exponents = np.arange(0, d, 2, dtype=np.float64) / d
  theta = base ** -exponents
  if scaling_type == "truncated":
    return truncated_basis(theta / scaling, original_max_len, truncate_zero_ratio,
                           truncate_rho_ratio).astype(np.float32), 1.0
  if scaling == 1.0:
    return theta.astype(np.float32), 1.0
  if scaling_type == "linear":
    return (theta / scaling).astype(np.float32), 1.0
  if scaling_type == "ntk":
    return ((base * scaling ** (d / (d - 2))) ** -exponents).astype(np.float32), 1.0
  if not original_max_len:
    raise ValueError(f"rope_scaling_type={scaling_type!r} needs rope_original_max_len "
                     "(the context length the model was trained at)")
  wavelen = 2 * math.pi / theta
  if scaling_type == "yarn":
    beta_fast, beta_slow = 32.0, 1.0

    def dim_of(rotations):  # the channel index whose wavelength fits `rotations` in L
      return d * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_of(beta_fast)), 0)
    high = min(math.ceil(dim_of(beta_slow)), d - 1)
    ramp = np.clip((np.arange(d // 2) - low) / max(high - low, 1e-3), 0.0, 1.0)
    keep = 1.0 - ramp  # 1: keep theta (high frequencies), 0: interpolate
    theta = theta / scaling * (1 - keep) + theta * keep
    return theta.astype(np.float32), 0.1 * math.log(scaling) + 1.0
  # llama3
  low_factor, high_factor = 1.0, 4.0
  low_wavelen, high_wavelen = original_max_len / low_factor, original_max_len / high_factor
  smooth = (original_max_len / wavelen - low_factor) / (high_factor - low_factor)
  scaled = np.where(wavelen > low_wavelen, theta / scaling, theta)
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  theta = np.where(medium, (1 - smooth) * theta / scaling + smooth * theta, scaled)
  return theta.astype(np.float32), 1.0


def truncated_basis(theta: np.ndarray, cutoff_len: Optional[int],
                    zero_ratio: float = TRUNCATE_ZERO_RATIO,
                    rho_ratio: float = TRUNCATE_RHO_RATIO) -> np.ndarray:
  """Giraffe's truncated basis of frequencies theta (float64): keep theta >= b, rho in
  (a, b), 0 at or below a; b = 2 pi / cutoff_len, a = b / zero_ratio, rho = b / rho_ratio."""
  if not cutoff_len or cutoff_len <= 0:
    raise ValueError("rope_scaling_type='truncated' needs rope_original_max_len (the context "
                     "length L; wavelengths longer than L are truncated)")
  if not zero_ratio >= 1:
    raise ValueError(f"truncate_zero_ratio (b / a) must be >= 1, got {zero_ratio}")
  if not rho_ratio > 0:
    raise ValueError(f"truncate_rho_ratio (b / rho) must be positive, got {rho_ratio}")
  b = 2 * math.pi / cutoff_len
  a, rho = b / zero_ratio, b / rho_ratio
  return np.where(theta >= b, theta, np.where(theta > a, rho, 0.0))


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10_000.0,
               scaling: float = 1.0, scaling_type: str = "linear",
               original_max_len: Optional[int] = None,
               truncate_zero_ratio: float = TRUNCATE_ZERO_RATIO,
               truncate_rho_ratio: float = TRUNCATE_RHO_RATIO) -> jax.Array:
  """x: [B, T, H, D]; positions: [B, T] integers. Returns x rotated, in x.dtype."""
  d = x.shape[-1]
  theta, factor = rope_frequencies(d, base, scaling=scaling, scaling_type=scaling_type,
                                   original_max_len=original_max_len,
                                   truncate_zero_ratio=truncate_zero_ratio,
                                   truncate_rho_ratio=truncate_rho_ratio)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(theta)  # [B, T, D/2]
  cos = (factor * jnp.cos(angles))[:, :, None, :]
  sin = (factor * jnp.sin(angles))[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
