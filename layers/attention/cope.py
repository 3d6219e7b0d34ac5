"""`cope`: Contextual Position Encoding (`model.positional="cope"`).

"Contextual Position Encoding: Learning to Count What's Important": the
position of key j seen from query i increments only on the tokens the query
selects, so a head can address "the i-th sentence" rather than "the i-th
token". For query i and key j (j <= i under the causal mask), per head:

    g_it  = sigmoid(s q_i . k_t)                                  gates
    p_ij  = min(sum_{t=j..i} g_it, p_max)                         contextual position
    e(p)  = (1 - w) e[floor(p)] + w e[ceil(p)],  w = p - floor(p) interpolated embedding
    z_ij  = s (q_i . k_j + q_i . e(p_ij)) + M_ij,   s = 1/sqrt(d)
    O_i   = softmax_j(z_ij) V

with learned embeddings e[0..p_max] (p_max + 1 rows, positions 0 .. p_max).
q . e(p) is computed as the interpolation of the p_max + 1 logits q . e[n],
never as a [Tq, Tk, D] array.

Confirmed from the authors' public code (facebookresearch/RAM,
projects/cope/src/cope/context_position.py), where the abstract is silent:
  * the gate logits are the attention logits scaled by 1/sqrt(d) (the paper's
    equations write sigmoid(q . k)), and the position logit q . e(p) is added
    before the 1/sqrt(d) scale (the code's default; its `--cope-nodiv` option
    adds it after), as written above;
  * gates of masked keys are zeroed before the sum (gates * attn_mask), so
    under any mask p_ij = sum over the *visible* t >= j; for a causal mask
    that is t = j..i. (Bidirectional masks count visible keys right of i too,
    as in the code; CoPE is defined for causal attention.);
  * positions are clipped at p_max = npos - 1 (the code's default npos is
    block_size + 1, "position 0 is possible"); floor and ceil carry no
    gradient, w does (gradients reach q and k through the gates);
  * e is one [p_max + 1, head_dim] table per layer, shared by all heads
    (the code folds heads into the batch and keeps one `pos_emb`), zeros at
    initialisation (so a fresh CoPE layer is NoPE and learns its positions).
    Heads still count differently: the gates are per head. Shared rather
    than per head: it is the code's choice and keeps the table small.
Open, our choices: p_max (option `cope_p_max`, default 64; the code's
default is the training context length, set it to that to match); q and k
are not rotated (CoPE replaces RoPE, as in the paper; no combination); GQA:
a query head gates against its KV head's keys. The code's variants with a
separate gate key (`--cope-sep-key`), value gates, CoPE on every K-th layer
and embeddings shared across layers are not implemented.

Paths. The reverse cumulative sum couples every key of a row, which breaks
online-softmax tiling (a tile's logits depend on the gates of all keys to its
right), so there is **no Pallas kernel**:
  * `implementation="reference"`: `cope_attention_reference`, the dense
    quadratic form (the specification); it can return the probabilities.
  * "auto" / "xla": `cope_attention`, a **query-chunked XLA path** with
    memory linear in T: `block_q` query rows at a time (lax.map) build their
    full [block_q, Tk] rows (logits, gates, reverse cumsum, interpolation,
    softmax), masks evaluated per block by `masking.visible` (no [T, T]
    mask). The block body is under jax.checkpoint, so the backward recomputes
    one block at a time: working set O(block_q * Tk + T * D + p_max * D).
    Gradients (q, k, v and e) are autodiff of the same math, tested against
    the reference.
  * "pallas*" / "cudnn" raise. (A flash variant would scan key tiles right to
    left carrying the running gate sum; not written.)
A query row with no visible key outputs 0. The paper's claim that CoPE solves
selective copy, counting and Flip-Flop where RoPE fails is a training result,
not a unit test here.

Options (`model.attention_options.<name>`):
  cope_p_max (int >= 1, 64): the largest position; e has cope_p_max + 1 rows.
  cope_block_q (int >= 1, 128): query rows per block on the chunked path.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import query_blocks
from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.attention.positional import PositionalEncoding, register_positional
from pallas_kernels.flash import reference as flash_reference


def _check_impl(implementation: str):
  query_blocks.refuse_kernels(
      "positional='cope'", implementation,
      "the reverse cumsum of its gates breaks online-softmax tiling")


def cope_positions(gate_logits: jax.Array, visible: Optional[jax.Array], p_max: int, *,
                   unit_gates: bool = False) -> jax.Array:
  """p_ij = min(sum_{visible t >= j} g_it, p_max) over the last (key) axis, float32.

  gate_logits: scaled logits s q.k [..., Tk]; visible: bool broadcasting to them, or None.
  unit_gates: g = 1 (every visible token counts), the relative-position special case.
  """
  g = jnp.ones_like(gate_logits) if unit_gates else jax.nn.sigmoid(gate_logits)
  if visible is not None:
    g = jnp.where(visible, g, 0.0)
  return jnp.minimum(jax.lax.cumsum(g, axis=g.ndim - 1, reverse=True), float(p_max))


def interpolate_position_logits(pos_logits: jax.Array, p: jax.Array) -> jax.Array:
  """(1 - w) L[floor p] + w L[ceil p], w = p - floor p: [..., npos] x [..., Tk] -> [..., Tk]."""
  lo = jnp.floor(p)
  w = p - lo
  lo_i = lo.astype(jnp.int32)
  hi_i = jnp.ceil(p).astype(jnp.int32)
  at = lambda idx: jnp.take_along_axis(pos_logits, idx, axis=-1)
  return (1.0 - w) * at(lo_i) + w * at(hi_i)


def _check_pos_emb(pos_emb, q):
  if pos_emb.ndim != 2 or pos_emb.shape[1] != q.shape[3] or pos_emb.shape[0] < 2:
    raise ValueError(f"pos_emb must be [p_max + 1 >= 2, head_dim={q.shape[3]}], "
                     f"got {tuple(pos_emb.shape)}")


def cope_bias_reference(q, k, pos_emb, mask: Optional[Mask] = None, *,
                        scale: Optional[float] = None, unit_gates: bool = False):
  """Dense (bias s q.e(p) [B, Hq, Tq, Tk], positions p [B, Hq, Tq, Tk]); masked entries kept."""
  flash_reference.check_qkv(q, k, k)
  _check_pos_emb(pos_emb, q)
  mask = Mask.bidirectional() if mask is None else mask
  b, tq, _, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  vis = mask.dense(b, tq, k.shape[1])  # [B|1, 1, Tq, Tk]
  p = cope_positions(flash_reference.dense_logits(q, k, scale), vis, pos_emb.shape[0] - 1,
                     unit_gates=unit_gates)
  qe = jnp.einsum("bqhd,nd->bhqn", q.astype(jnp.float32), pos_emb.astype(jnp.float32))
  return scale * interpolate_position_logits(qe, p), p


def cope_attention_reference(q, k, v, pos_emb, mask: Optional[Mask] = None, *,
                             scale: Optional[float] = None, unit_gates: bool = False,
                             return_probs: bool = False):
  """The specification (dense, quadratic): q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], pos_emb [npos, D].

  CoPE is softmax attention with the additive, q- and k-dependent bias s q.e(p): the dense
  bias goes to the flash reference, which adds s q.k, applies the mask and the softmax.
  """
  mask = Mask.bidirectional() if mask is None else mask
  bias, _ = cope_bias_reference(q, k, pos_emb, mask, scale=scale, unit_gates=unit_gates)
  return flash_reference.attention(
      q, k, v, mask_args=mask.mask_args(q.shape[0], q.shape[1], k.shape[1]), bias=bias,
      scale=scale, return_probs=return_probs)


def cope_attention(q, k, v, pos_emb, mask: Optional[Mask] = None, *,
                   scale: Optional[float] = None, block_q: int = 128, unit_gates: bool = False,
                   implementation: str = "auto") -> jax.Array:
  """The pure function (query-chunked XLA path, memory linear in T).

  q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], pos_emb [p_max + 1, D] (shared by the heads)
  -> [B,Tq,Hq,D]. scale s (default 1/sqrt(D)) scales the gate logits and the logits.
  unit_gates: every visible token counts (g = 1), CoPE's relative-position special case.
  implementation="reference" runs `cope_attention_reference`.
  """
  _check_impl(implementation)
  if implementation == "reference":
    return cope_attention_reference(q, k, v, pos_emb, mask, scale=scale, unit_gates=unit_gates)
  flash_reference.check_qkv(q, k, v)
  _check_pos_emb(pos_emb, q)
  mask = Mask.bidirectional() if mask is None else mask
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  rep = hq // hkv
  scale = d ** -0.5 if scale is None else scale
  p_max = pos_emb.shape[0] - 1
  kf, vf, ef = k.astype(jnp.float32), v.astype(jnp.float32), pos_emb.astype(jnp.float32)

  def block(qb, vis):  # qb [B, bq, Hq, D]
    qb = qb.reshape(*qb.shape[:2], hkv, rep, d).astype(jnp.float32)
    s = jnp.einsum("bqgrd,bkgd->bgrqk", qb, kf) * scale  # [B, Hkv, rep, bq, Tk]
    vis = query_blocks.group_heads(vis, hkv, rep)
    p = cope_positions(s, vis, p_max, unit_gates=unit_gates)
    qe = jnp.einsum("bqgrd,nd->bgrqn", qb, ef)  # [B, Hkv, rep, bq, p_max + 1]
    z = s + scale * interpolate_position_logits(qe, p)
    if vis is not None:
      z = jnp.where(vis, z, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    e = jnp.exp(z - jnp.where(jnp.isfinite(m), m, 0.0))
    den = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(den > 0, den, 1.0)  # a row with no visible key: all zero
    return jnp.einsum("bgrqk,bkgd->bqgrd", probs, vf).reshape(*qb.shape[:2], hq, d)

  out = query_blocks.map_query_blocks(block, q, block_q, mask.mask_args(b, tq, tk), tk)
  return out.astype(q.dtype)


def _positive_int_option(cfg: AttentionConfig, name: str, default: int) -> int:
  value = cfg.int_option(name, default)
  if value < 1:
    raise ValueError(f"model.attention_options.{name} must be a positive integer, got {value}")
  return value


@register_positional("cope")
class CoPE(PositionalEncoding):
  """Learned position table e [p_max + 1, head_dim] (per layer, shared by heads); owns the
  attention (layers/attention/positional.py (c)); q and k are not rotated."""

  owns_attention = True

  def __init__(self, cfg: AttentionConfig, *, rngs: Optional[nnx.Rngs] = None):
    del rngs  # zeros at initialisation, as the authors' code
    _check_impl(cfg.implementation)
    self.p_max = _positive_int_option(cfg, "cope_p_max", 64)
    self.block_q = _positive_int_option(cfg, "cope_block_q", 128)
    self.pos_emb = nnx.Param(jnp.zeros((self.p_max + 1, cfg.head_dim), cfg.param_dtype),
                             logical_axes=(None, "head_dim"))

  def attention(self, q: jax.Array, k: jax.Array, v: jax.Array, mask, *,
                implementation: str = "auto") -> jax.Array:
    return cope_attention(q, k, v, self.pos_emb[...], mask, block_q=self.block_q,
                          implementation=implementation)
