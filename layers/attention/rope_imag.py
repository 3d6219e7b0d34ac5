"""`rope_imag`: RoPE++, the imaginary extension of RoPE (`model.positional="rope_imag"`).

"Beyond Real: Imaginary Extension of Rotary Position Embeddings for
Long-Context LLMs" (code: github.com/OpenMOSS/rope_pp, where the method is
called RoPE++).

Complex form. Channel pairs (x_i, x_{i+d/2}) (the rotate-half layout of
layers/attention/rope.py) are z_i = x_i + i x_{i+d/2}; with query position m,
key position n, q~_i = z^q_i e^{i m theta_i} and k~_i = z^k_i e^{i n theta_i}:

    Re(sum_i q~_i conj(k~_i)) = RoPE(q) . RoPE(k)                      (RoPE's logit)
    Im(sum_i q~_i conj(k~_i)) = (J RoPE(q)) . RoPE(k) = RoPE(J q) . RoPE(k),
    J (a, b) = (b, -a) per pair                                        (Derived)

i.e. per pair Re = (q.k) cos((m-n) theta) + (q x k) sin((m-n) theta) and
Im = (q.k) sin((m-n) theta) - (q x k) cos((m-n) theta), q x k = q_a k_b - q_b k_a.

Combination rule (confirmed from the authors' code, rope_pp's
`modeling_llama_rope_pp.py`, `LlamaAttention.apply_rotary_pos_emb`, and its
README: the imaginary component is re-injected "as a new group of attention
heads computed in parallel with the real attentions"). The imaginary score is
*not* added to the real one; every projected query head h becomes two
attention heads, each with its own softmax, sharing h's query projection and
h's KV head g(h):

    O_{h,re} = softmax(Re(q~_h k~_g^*) / sqrt(d) + M) V_g
    O_{h,im} = softmax(Im(q~_h k~_g^*) / sqrt(d) + M) V_g
    y        = concat_h(O_{h,re}, O_{h,im}) W_O           (W_O reads 2 Hq heads)

The heads are interleaved (re_0, im_0, re_1, im_1, ...), the order of the
code's `torch.stack([q_rope, q_imag], dim=2)`, and the imaginary query is the
code's `q * sin - rotate_half(q) * cos`, which is J RoPE(q) above.

Why this is more than RoPE: a fixed Re + lambda Im would be RoPE on
(I + lambda J) q, which W_Q already spans (FAMILIES.md's caution). Here the
two components get separate softmaxes, and the imaginary head is tied to the
real one (same W_Q, W_K, W_V), so it is not a re-parameterisation of a RoPE
layer of the same size. (An *untied* imaginary-only head would be: RoPE on
J W_Q. The code's ablation modes `imagh` / `imago` / `imagx`, which replace
some heads' real score by the imaginary one without tying, are therefore not
implemented.)

The paper's two configurations are head-count presets of this one rule:
  * RoPE++_EC (equal cache; the code's `imag2`): num_heads Hq and
    num_kv_heads Hkv as configured, 2 Hq attention heads, W_O over 2 Hq heads.
  * RoPE++_EH (equal heads; `imag1`): set num_heads = H/2 and
    num_kv_heads = Hkv/2 (with an explicit head_dim): H attention heads from
    half the QKV parameters and half the KV cache.
The RoPE settings (rope_base, rope_scaling, rope_scaling_type, ...) apply to
both components (YaRN's attention factor too, as in the code).

"Imaginary weight": the paper has none; the imaginary heads enter the layer
only through their rows of W_O, and with those rows zero the layer is `rope`
exactly (tested).

Kernel: this is a (q, k) transform (layers/attention/positional.py (a)) that
widens the heads ((d), `heads_per_query = 2`), so it runs on every flash
backend unchanged: with 2 Hq query heads and Hkv KV heads the kernels' GQA
rule maps heads 2h and 2h + 1 to KV head g(h). Costs: 2x score and value
FLOPs, no extra KV memory. Only the `mha` core runs it (families that
override `core` refuse it).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention.config import AttentionConfig
from layers.attention.positional import PositionalEncoding, RoPE, register_positional
from layers.attention.rope import rope_frequencies


def imaginary_rotation(x: jax.Array) -> jax.Array:
  """J per channel pair in the rotate-half layout: (a, b) -> (b, -a), i.e. z -> -i z."""
  d = x.shape[-1]
  return jnp.concatenate([x[..., d // 2:], -x[..., : d // 2]], axis=-1)


def real_and_imaginary_queries(q_rot: jax.Array) -> jax.Array:
  """Rotated queries [B, T, H, D] -> [B, T, 2H, D]: (RoPE(q_h), J RoPE(q_h)) adjacent per head.

  Against RoPE(k), head 2h scores Re(q~ k~*) and head 2h + 1 scores Im(q~ k~*).
  """
  b, t, h, d = q_rot.shape
  return jnp.stack([q_rot, imaginary_rotation(q_rot)], axis=3).reshape(b, t, 2 * h, d)


@register_positional("rope_imag")
class RoPEImag(PositionalEncoding):
  """RoPE on q and k, then each query head doubled into its real and imaginary head."""

  heads_per_query = 2

  def __init__(self, cfg: AttentionConfig, *, rngs: Optional[nnx.Rngs] = None):
    del rngs
    if cfg.head_dim % 2:
      raise ValueError(f"positional='rope_imag' needs an even head_dim, got {cfg.head_dim}")
    # Validates the scaling settings at construction (AttentionConfig does so only for 'rope').
    rope_frequencies(cfg.head_dim, cfg.rope_base, scaling=cfg.rope_scaling,
                     scaling_type=cfg.rope_scaling_type,
                     original_max_len=cfg.rope_original_max_len)
    self.rope = RoPE(cfg)

  def __call__(self, q: jax.Array, k: jax.Array, q_positions, kv_positions):
    q, k = self.rope(q, k, q_positions, kv_positions)
    return real_and_imaginary_queries(q), k
