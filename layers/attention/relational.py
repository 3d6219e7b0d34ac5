"""`relational`: dual attention, sensory heads plus relational heads.

From "Disentangling and Integrating Relational and Sensory Information in
Transformer Architectures" (Altabaa and Lafferty, 2024; the Dual Attention
Transformer, code github.com/Awni00/dual-attention). Multi-head attention is
split into two kinds of heads: *sensory* heads are standard attention (they
route features of the attended objects); *relational* heads route the
relations between the receiver and the attended sender, tagged with a symbol
that identifies the sender.

Equations (query head h, kv head g = g(h), as in `mha`):

    sensory h:     O_ih = sum_j alpha_ijh v_jg                              (the `mha` core)
    relational h:  O_ih = sum_j alpha_ijh ( r(x_i, x_j) W_r^h + s_j W_s^g )
                   alpha_ijh = softmax_j(q_ih . k_jg / sqrt(D) + M_ij)        (same q/k projections)
                   r(x_i, x_j)_l = <phi_l(x_i), psi_l(x_j)> / sqrt(p),  l = 1 .. d_r
                   phi_l(x) = x W_phi,l,  psi_l(x) = x W_psi,l   (d_model -> p, no bias)
    y = concat_h(O_h) W_O

Confirmed against the authors' code (relational_attention.py,
dual_attention.py, symbol_retrieval.py, read in this session): attention
scores from their own q/k projections with RoPE and 1/sqrt(head_dim); d_r
relations shared by all relational heads, each an inner product of p-dim
projections scaled by 1/sqrt(p) (p = head_dim * n_rel / d_r by default,
d_r = n_rel by default), no activation ("identity", their default); a per-head
W_r^h: R^{d_r} -> R^{head_dim}; the symbols pass through the value projection
W_s = W_v; symmetric relations (psi = phi) optional; the default symbol
retriever of their language models is *symbolic attention*:

    s_j = concat_m softmax((x_j W_q^sym + b)_m F_m^T / sqrt(d_model / n_m)) S_m,

multi-head attention (n_m heads) from the token to a learned library of
`num_symbols` template features F and symbols S (per token: causal-safe).

Fast path: since r is an inner product and alpha sums over j,

    sum_j alpha_ij r(x_i, x_j)_l = < phi_l(x_i), sum_j alpha_ij psi_l(x_j) > / sqrt(p),

so each relational head is *one* ordinary attention call (the flash kernel,
any mask, GQA) whose values are [psi_1(x_j), ..., psi_{d_r}(x_j), s_j W_s^g]
(width d_r p + head_dim), followed by a per-query contraction with phi(x_i)
and W_r. Memory is that of the flash path (O(T (d_r p + D)) per head, linear
in T); no [T, T, d_r] relation tensor is built. `relational_attention_reference`
builds the explicit pairwise r_ij and alpha (the specification) and the
tests compare the two, outputs and gradients.

Choices here (open in the paper or differing from the code):
  * heads: the layer's Hq query heads are split, the *last* `relational_heads`
    are relational (a multiple of the GQA group Hq / Hkv so that sensory and
    relational heads own whole KV heads); 0 relational heads is exactly
    `mha` with the same parameters. Relational heads reuse the layer's q/k
    projections for alpha and its v projection as W_s (applied to the symbols
    instead of x), so a model can switch families without new q/k/v shapes.
  * output projection: one W_O over all concatenated heads (the code has a
    separate output projection per head type, a block-diagonal special case).
  * symbol retriever per layer (the code shares one across layers by default).
  * `symbols="positional"`: a learned table indexed by the token's position
    (packed segments restart it), clipped at `max_positions - 1`.
  * init: symbolic-attention templates and symbols N(0, 1) (as the code),
    W_r fan-in normal, phi/psi fan-in truncated normal.

Options (`model.attention_options.<name>`):
  relational_heads (int, default Hq // 2 rounded down to a multiple of Hq / Hkv),
  relation_dim (d_r, default relational_heads), relation_proj_dim (p, default
  head_dim * relational_heads // relation_dim), symmetric (bool, False),
  symbols ("symbolic_attention" | "positional", default "symbolic_attention"),
  num_symbols (int, 64), symbol_heads (int, 4; must divide d_model),
  max_positions (int, 4096; positional symbols only).
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
from layers.attention.mha import MultiHeadAttention, mha
from layers.linear import Linear
from pallas_kernels.flash import api as flash_api
from pallas_kernels.flash import reference as flash_reference

SYMBOLS = ("symbolic_attention", "positional")


def _check(q, k, phi, psi, sv, w_r):
  flash_reference.check_qkv(q, k, sv)
  b, tq, hq, d = q.shape
  tk = k.shape[1]
  if phi.ndim != 4 or phi.shape[:2] != (b, tq) or psi.shape != (b, tk) + phi.shape[2:]:
    raise ValueError(f"phi must be [B, Tq, d_r, p] and psi [B, Tk, d_r, p]; got {phi.shape}, "
                     f"{psi.shape} for q {q.shape}, k {k.shape}")
  if w_r.shape != (hq, phi.shape[2], sv.shape[3]):
    raise ValueError(f"w_r must be [Hq, d_r, Dv] = {(hq, phi.shape[2], sv.shape[3])}, got "
                     f"{w_r.shape}")


def relational_attention_reference(q, k, phi, psi, sv, w_r, mask: Optional[Mask] = None, *,
                                   scale: Optional[float] = None,
                                   rel_scale: Optional[float] = None):
  """Explicit pairwise specification: sum_j alpha_ij (r_ij W_r^h + sv_j).

  q [B,Tq,Hq,D], k [B,Tk,Hkv,D] (attention); phi [B,Tq,d_r,p], psi [B,Tk,d_r,p]
  (relations); sv [B,Tk,Hkv,Dv] (projected symbols); w_r [Hq,d_r,Dv] -> [B,Tq,Hq,Dv].
  """
  _check(q, k, phi, psi, sv, w_r)
  mask = Mask.bidirectional() if mask is None else mask
  b, tq, hq, _ = q.shape
  rel_scale = phi.shape[3] ** -0.5 if rel_scale is None else rel_scale
  _, alpha = flash_reference.attention(q, k, sv, mask_args=mask.mask_args(b, tq, k.shape[1]),
                                       scale=scale, return_probs=True)  # [B, Hq, Tq, Tk]
  f32 = jnp.float32
  r = jnp.einsum("bilp,bjlp->bijl", phi.astype(f32), psi.astype(f32)) * rel_scale  # [B,Tq,Tk,d_r]
  msg_r = jnp.einsum("bhij,bijl,hld->bihd", alpha, r, w_r.astype(f32))
  msg_s = jnp.einsum("bhij,bjhd->bihd", alpha, flash_reference.repeat_kv(sv, hq).astype(f32))
  return (msg_r + msg_s).astype(q.dtype)


def relational_attention(q, k, phi, psi, sv, w_r, mask: Optional[Mask] = None, *,
                         scale: Optional[float] = None, rel_scale: Optional[float] = None,
                         implementation: str = "auto"):
  """The pure function of the relational heads: one attention call with psi as values.

  Shapes as `relational_attention_reference`. sum_j alpha_ij <phi_l(x_i), psi_l(x_j)>
  = <phi_l(x_i), sum_j alpha_ij psi_l(x_j)>, so the values are [psi (d_r p), sv].
  """
  if implementation == "reference":
    return relational_attention_reference(q, k, phi, psi, sv, w_r, mask, scale=scale,
                                          rel_scale=rel_scale)
  _check(q, k, phi, psi, sv, w_r)
  mask = Mask.bidirectional() if mask is None else mask
  b, tk, hkv, dv = sv.shape
  dr, p = phi.shape[2], phi.shape[3]
  rel_scale = p ** -0.5 if rel_scale is None else rel_scale
  psi_v = jnp.broadcast_to(psi.reshape(b, tk, 1, dr * p), (b, tk, hkv, dr * p))
  values = jnp.concatenate([psi_v.astype(sv.dtype), sv], axis=-1)
  o = flash_api.flash_attention(q, k, values, scale=scale, implementation=implementation,
                                **mask.kernel_args())  # [B, Tq, Hq, d_r p + Dv]
  f32 = jnp.float32
  psi_bar = o[..., :dr * p].astype(f32).reshape(o.shape[:3] + (dr, p))
  r_bar = jnp.einsum("bqlp,bqhlp->bqhl", phi.astype(f32), psi_bar) * rel_scale
  out = jnp.einsum("bqhl,hld->bqhd", r_bar, w_r.astype(f32)) + o[..., dr * p:].astype(f32)
  return out.astype(q.dtype)


def symbolic_attention(x, w_q, b_q, templates, library, num_heads: int):
  """Symbol retrieval by attention to a learned library (per token).

  x [B, T, d]; w_q [d, d], b_q [d]; templates, library [n_s, d] -> symbols [B, T, d].
  """
  bsz, t, d = x.shape
  dh = d // num_heads
  f32 = jnp.float32
  query = (x.astype(f32) @ w_q.astype(f32) + b_q.astype(f32)).reshape(bsz, t, num_heads, dh)
  keys = templates.astype(f32).reshape(-1, num_heads, dh)
  vals = library.astype(f32).reshape(-1, num_heads, dh)
  p = jax.nn.softmax(jnp.einsum("btmd,smd->btms", query, keys) / math.sqrt(dh), axis=-1)
  return jnp.einsum("btms,smd->btmd", p, vals).reshape(bsz, t, d).astype(x.dtype)


def _positive_int(cfg, name, default):
  value = cfg.int_option(name, default)
  if value < 1:
    raise ValueError(f"model.attention_options.{name} must be >= 1, got {value}")
  return value


@registry.register("relational")
class RelationalAttention(MultiHeadAttention):
  """Dual attention: `mha` sensory heads + relational heads (see module doc)."""

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)  # q/k/v/o first: same weights as `mha` per seed
    hq, hkv, d, dm, pd = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model,
                          cfg.param_dtype)
    rep = hq // hkv
    n_rel = cfg.int_option("relational_heads", (hq // 2) // rep * rep)
    if not 0 <= n_rel <= hq or n_rel % rep:
      raise ValueError(
          f"model.attention_options.relational_heads={n_rel} must be in [0, num_heads={hq}] and a "
          f"multiple of num_heads / num_kv_heads = {rep} (relational heads own whole KV heads)")
    self.n_rel = n_rel
    if n_rel == 0:
      return
    self.relation_dim = _positive_int(cfg, "relation_dim", n_rel)
    self.relation_proj_dim = _positive_int(cfg, "relation_proj_dim",
                                           max(1, d * n_rel // self.relation_dim))
    self.symmetric = cfg.bool_option("symmetric", False)
    self.symbols_kind = cfg.option("symbols", "symbolic_attention")
    if self.symbols_kind not in SYMBOLS:
      raise ValueError(
          f"model.attention_options.symbols={self.symbols_kind!r} is not one of {SYMBOLS}")
    dr, p = self.relation_dim, self.relation_proj_dim
    kw = dict(dtype=cfg.dtype, param_dtype=pd, rngs=rngs)
    self.phi = Linear(dm, (dr, p), axes=("embed", None, None), **kw)
    self.psi = None if self.symmetric else Linear(dm, (dr, p), axes=("embed", None, None), **kw)
    self.w_r = nnx.Param(jax.random.normal(rngs.params(), (n_rel, dr, d), pd) / math.sqrt(dr),
                         logical_axes=("heads", None, "head_dim"))
    if self.symbols_kind == "symbolic_attention":
      n_s = _positive_int(cfg, "num_symbols", 64)
      self.symbol_heads = _positive_int(cfg, "symbol_heads", 4)
      if dm % self.symbol_heads:
        raise ValueError(f"model.attention_options.symbol_heads={self.symbol_heads} must divide "
                         f"d_model={dm}")
      self.sym_q = Linear(dm, dm, axes=("embed", None), use_bias=True, **kw)
      self.templates = nnx.Param(jax.random.normal(rngs.params(), (n_s, dm), pd),
                                 logical_axes=(None, "embed"))
      self.library = nnx.Param(jax.random.normal(rngs.params(), (n_s, dm), pd),
                               logical_axes=(None, "embed"))
    else:
      self.max_positions = _positive_int(cfg, "max_positions", 4096)
      self.symbol_table = nnx.Param(jax.random.normal(rngs.params(), (self.max_positions, dm), pd),
                                    logical_axes=(None, "embed"))

  def symbols(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """s_j [B, T, d_model] for every token."""
    if self.symbols_kind == "positional":
      idx = jnp.clip(positions, 0, self.max_positions - 1)
      return jnp.take(self.symbol_table[...], idx, axis=0).astype(self.cfg.dtype)
    sym_q = self.sym_q
    bias = sym_q.bias[...]
    return symbolic_attention(x, sym_q.kernel[...], bias, self.templates[...], self.library[...],
                              self.symbol_heads)

  def core(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask,
           positions: jax.Array) -> jax.Array:
    if self.n_rel == 0:
      return super().core(x, q, k, v, mask, positions)
    cfg = self.cfg
    hs = cfg.num_heads - self.n_rel
    kvs = hs // (cfg.num_heads // cfg.num_kv_heads)
    q, k = self.positional(q, k, positions, positions)
    phi = self.phi(x)
    psi = phi if self.psi is None else self.psi(x)
    sv = self.qkv.v(self.symbols(x, positions))[:, :, kvs:]  # W_s = W_v, on the symbols
    rel = relational_attention(q[:, :, hs:], k[:, :, kvs:], phi, psi, sv, self.w_r[...], mask,
                               implementation=cfg.implementation)
    if hs == 0:
      return rel
    sens = mha(q[:, :, :hs], k[:, :, :kvs], v[:, :, :kvs], mask,
               implementation=cfg.implementation)
    return jnp.concatenate([sens, rel], axis=2)

  def train_flops_per_token(self, seq_len: int) -> float:
    """Sensory heads as `mha`; relational heads attend over values of width d_r p + D."""
    cfg = self.cfg
    if self.n_rel == 0:
      return super().train_flops_per_token(seq_len)
    d = cfg.head_dim
    dv = self.relation_dim * self.relation_proj_dim + d
    hs = cfg.num_heads - self.n_rel
    return 6.0 * (hs * 2 * d + self.n_rel * (d + dv)) * seq_len
