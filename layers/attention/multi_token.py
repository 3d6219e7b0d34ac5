"""`multi_token`: Multi-Token Attention (MTA), convolutions over queries, keys and heads.

From "Multi-Token Attention" (Golovneva, Wang, Weston, Sukhbaatar, 2025).
Single-token attention weighs key j by one (q_i, k_j) similarity; MTA lets
nearby queries, keys and heads affect each weight:

    A^_h[i, j] = scale * q_{i,h} . k_{j,g(h)}                                  logits
    L_h[i, j]  = sum_{a<cq} sum_{b<ck} theta_h[a, b] * Mask_0(A^_h)[i - a, j + b - ck//2]
                                                                            key-query conv
    Mask_0(A^)[i', j'] = A^[i', j'] if (i', j') visible (and 0 <= i' < Tq, 0 <= j' < Tk) else 0
    W_h[i, j]  = softmax_j( Mask_-inf(L_h)[i, j] )                            (-inf where (i, j) invisible)
    W'_{n*G+o} = sum_{u<G} mix_n[o, u] * W_{n*G+u}                            head mixing in groups of G
    O_h        = W'_h V_{g(h)}
    O_h        <- depth_scale * gamma_h * RMSNorm(O_h)                        group norm (per head)

Causality: the conv in the query axis only reads the current and the cq - 1
*previous* queries, and every source logit is zeroed (Mask_0) unless its own
(query, key) pair is visible, so a key in the future of query i - a never
contributes; the conv's key halo may still read a key j + b - ck//2 > j, but only
if it is visible to the *source* query i - a <= i, hence never a key after i.
After the conv the target mask is applied with -inf (Mask_-inf), as in the
paper's "masked to 0 before and to -inf after". This is the stricter of the two
readings (the paper's indicator 1[i >= j - j'] would also admit keys visible to
i but not to i - a); it keeps every mask kind (windows, segments, padding) exact.

With theta_h = delta (theta_h[0, ck//2] = 1), mix = identity and no group norm,
the layer is exactly `mha` (tested). Parameters are initialised that way
(the delta / identity initialisation), so a fresh layer with group_norm=False
equals `mha` with the same projections.

What is chosen here, checked against the authors' released code
(github.com/facebookresearch/RAM, projects/mta/mta_transformer.py and
configs/*_mta.yaml):
  * kernel sizes: option kq_kernel=(cq, ck), default (6, 11), the released
    configs' query_kernel_size / key_kernel_size; the key window is centred
    (their pad_key="both": ck//2 keys each side for odd ck), the query window
    reads the cq - 1 previous queries. Confirmed.
  * masking: source logits zeroed where invisible before the conv, -inf after
    it; the conv is initialised to the identity (their init_method="identity").
    Confirmed.
  * head mixing: one learned [G, G] matrix per group of G = head_group adjacent
    query heads, identity-initialised, on the weights after softmax
    (head_mix="post", their head_kernel_size) or on the logits before it
    (head_mix="pre", their pre_sm_linear_head, which mixes all heads:
    head_group = num_heads). Their 300M-1B configs use G = num_heads; our
    default G = 2 keeps the layer cheap at small head counts.
  * group norm: RMSNorm over head_dim of each head's output, eps 1e-5, with one
    gain [D] shared by all heads (their `subln = RMSNorm(head_dim)`), times the
    depth scale 1 - lambda_init(l), lambda_init(l) = 0.8 - 0.6 exp(-0.3 l)
    (l = cfg.layer, 0-based; the Differential Transformer schedule, their
    `layer_norm_rescale`). Their released configs turn the depth scale off
    (layer_norm_rescale: false): depth_scale=1.0 gives that.
  * output gate (option gate="scalar", default "none"): their add_gating with
    gate_1d, o_h <- o_h * sigmoid(w . o_h + b), w [D] and b shared by all
    heads, after the group norm; the released configs turn it on.
  * not implemented: their optional second key-query conv on the weights after
    softmax (after_sm_query/key_kernel_size), which would need a second halo of
    query rows on the chunked path; and their use of MTA in every fourth layer
    only, which is a model pattern here (model.attention="mha,mha,multi_token,mha").

Kernel: the conv couples neighbouring rows of logits *before* the softmax,
which breaks online-softmax tiling over keys, so there is **no Pallas kernel**
here: the fast path is a **chunked XLA path linear in T**. Queries are processed
`block_q` rows at a time (lax.map); each block builds its full logit rows
[block_q + cq - 1, Tk] (a halo of cq - 1 previous query rows), masks them per
block with `masking.visible`, convolves (lax.conv, depthwise), masks, softmaxes
and mixes heads. The block body is wrapped in jax.checkpoint so the backward
recomputes one block at a time: memory O((block_q + cq) * Hq * Tk + T * D).
`implementation="reference"` runs the dense quadratic form (explicit shifted
sums, the specification); "auto" / "xla" run the chunked path; "pallas*"
and "cudnn" raise (no such kernel exists).

Options (`model.attention_options.<name>`):
  kq_kernel ((int, int), (6, 11)): (cq, ck) query and key kernel sizes, >= 1.
  head_group (int, 2): heads per mixing group; must divide num_heads (1: no mixing).
  head_mix ("post" | "pre" | "none", "post"): where head mixing acts.
  group_norm (bool, True): per-head RMSNorm with depth scaling.
  depth_scale (float or None, None): overrides 1 - lambda_init(cfg.layer).
  gate ("none" | "scalar", "none"): the scalar sigmoid gate on each head's output.
  block_q (int, 128): query rows per block on the chunked path.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import query_blocks, registry
from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.attention.mha import MultiHeadAttention
from pallas_kernels.flash import masking
from pallas_kernels.flash import reference as flash_reference

HEAD_MIX = ("post", "pre", "none")
GATES = ("none", "scalar")
NORM_EPS = 1e-5  # the authors' subln RMSNorm


def _check_impl(implementation: str):
  query_blocks.refuse_kernels("multi_token", implementation,
                              "the key-query conv breaks online-softmax tiling")


def _mix_heads(w: jax.Array, mix: jax.Array, head_axis: int) -> jax.Array:
  """w [..., Hq (at head_axis), ...] mixed within groups: mix [Hq/G, G, G] (out, in)."""
  n, g, _ = mix.shape
  w = jnp.moveaxis(w, head_axis, -1)
  shp = w.shape
  w = w.reshape(shp[:-1] + (n, g))
  w = jnp.einsum("...nu,nou->...no", w, mix.astype(w.dtype))
  return jnp.moveaxis(w.reshape(shp), -1, head_axis)


def group_rms_norm(o: jax.Array, gamma: Optional[jax.Array], depth_scale: float,
                   eps: float = NORM_EPS) -> jax.Array:
  """Per-head RMSNorm over head_dim of o [B, T, Hq, D], times gamma ([D], shared by the heads,
  or [Hq, D]) and depth_scale."""
  of = o.astype(jnp.float32)
  of = of * jax.lax.rsqrt(jnp.mean(of * of, axis=-1, keepdims=True) + eps)
  if gamma is not None:
    of = of * gamma.astype(jnp.float32)
  return (of * depth_scale).astype(o.dtype)


def depth_scale_for_layer(layer: int) -> float:
  """1 - lambda_init(l), lambda_init(l) = 0.8 - 0.6 exp(-0.3 l) (0-based l)."""
  return 1.0 - (0.8 - 0.6 * math.exp(-0.3 * layer))


def _check_params(q, k, v, kq_kernel, head_mix_w, head_mix):
  flash_reference.check_qkv(q, k, v)
  hq = q.shape[2]
  if kq_kernel.ndim != 3 or kq_kernel.shape[0] != hq:
    raise ValueError(f"kq_kernel must be [Hq={hq}, cq, ck], got {kq_kernel.shape}")
  if head_mix not in HEAD_MIX:
    raise ValueError(f"head_mix must be one of {HEAD_MIX}, got {head_mix!r}")
  if head_mix != "none":
    if (head_mix_w is None or head_mix_w.ndim != 3 or head_mix_w.shape[1] != head_mix_w.shape[2]
        or head_mix_w.shape[0] * head_mix_w.shape[1] != hq):
      raise ValueError(
          f"head_mix_w must be [Hq/G, G, G] with Hq={hq}, got "
          f"{None if head_mix_w is None else head_mix_w.shape}")


def multi_token_attention_reference(q, k, v, kq_kernel, head_mix_w=None,
                                    mask: Optional[Mask] = None, *, head_mix: str = "post",
                                    scale: Optional[float] = None, return_probs: bool = False):
  """Dense specification (explicit shifted sums). Returns per-head outputs [B, Tq, Hq, D].

  q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], kq_kernel theta [Hq, cq, ck], head_mix_w [Hq/G, G, G].
  The group norm is not part of the attention function (see `group_rms_norm`).
  """
  _check_params(q, k, v, kq_kernel, head_mix_w, head_mix)
  mask = Mask.bidirectional() if mask is None else mask
  b, tq, hq, d = q.shape
  tk = k.shape[1]
  vf = flash_reference.repeat_kv(v, hq).astype(jnp.float32)
  s = flash_reference.dense_logits(q, k, scale)
  vis = mask.dense(b, tq, tk)
  s0 = jnp.where(vis, s, 0.0)  # Mask_0
  _, cq, ck = kq_kernel.shape
  c = ck // 2
  theta = kq_kernel.astype(jnp.float32)
  padded = jnp.pad(s0, ((0, 0), (0, 0), (cq - 1, 0), (c, ck - 1 - c)))
  conv = jnp.zeros_like(s0)
  for a in range(cq):
    for bb in range(ck):
      # padded[i + cq - 1 - a, j + bb] = s0[i - a, j + bb - c]
      win = padded[:, :, cq - 1 - a:cq - 1 - a + tq, bb:bb + tk]
      conv = conv + theta[None, :, a, bb, None, None] * win
  logits = jnp.where(vis, conv, -jnp.inf)  # Mask_-inf
  if head_mix == "pre":
    logits = jnp.where(vis, _mix_heads(jnp.where(vis, logits, 0.0), head_mix_w, 1), -jnp.inf)
  p, _ = flash_reference.softmax_with_sink(logits)
  if head_mix == "post":
    p = _mix_heads(p, head_mix_w, 1)
  out = jnp.einsum("bhqk,bkhd->bqhd", p, vf).astype(q.dtype)
  return (out, p) if return_probs else out


def multi_token_attention(q, k, v, kq_kernel, head_mix_w=None, mask: Optional[Mask] = None, *,
                          head_mix: str = "post", scale: Optional[float] = None,
                          block_q: int = 128, implementation: str = "auto") -> jax.Array:
  """The pure function of the family: chunked XLA path, memory linear in T.

  Same arguments and result as `multi_token_attention_reference`.
  """
  _check_impl(implementation)
  if implementation == "reference":
    return multi_token_attention_reference(q, k, v, kq_kernel, head_mix_w, mask,
                                           head_mix=head_mix, scale=scale)
  _check_params(q, k, v, kq_kernel, head_mix_w, head_mix)
  mask = Mask.bidirectional() if mask is None else mask
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  rep = hq // hkv
  scale = d ** -0.5 if scale is None else scale
  _, cq, ck = kq_kernel.shape
  c = ck // 2
  bq = max(1, min(block_q, tq))
  nb = -(-tq // bq)
  rows = bq + cq - 1
  margs = mask.mask_args(b, tq, tk)
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  kv_idx = jnp.arange(tk)
  # Depthwise conv weights (OIHW, cross-correlation): flip the query axis so that
  # out[i] reads in[i - a] with theta[a].
  w = jnp.flip(kq_kernel.astype(jnp.float32), axis=1)[:, None]  # [Hq, 1, cq, ck]

  # Query blocks with a halo of cq - 1 previous rows: [nb, B, rows, Hq, D].
  qp = jnp.pad(q, ((0, 0), (cq - 1, nb * bq - tq), (0, 0), (0, 0)))
  gather = jnp.arange(nb)[:, None] * bq + jnp.arange(rows)[None, :]  # padded-row index
  q_blocks = jnp.moveaxis(jnp.take(qp, gather, axis=1), 1, 0)  # [nb, B, rows, Hq, D]
  starts = jnp.arange(nb) * bq

  def vis_rows(idx):
    vis = masking.visible(margs, idx, kv_idx, tk)
    ok = ((idx >= 0) & (idx < tq))[None, None, :, None]
    return ok if vis is None else vis & ok  # [B|1, H|1, n, Tk]

  @jax.checkpoint
  def block(args):
    qb, start = args
    qb = qb.reshape(b, rows, hkv, rep, d).astype(jnp.float32)
    s = jnp.einsum("bqgrd,bkgd->bgrqk", qb, kf) * scale
    s = s.reshape(b, hq, rows, tk)
    src = start - (cq - 1) + jnp.arange(rows)
    s0 = jnp.where(vis_rows(src), s, 0.0)  # Mask_0 (and zero rows before the sequence)
    conv = jax.lax.conv_general_dilated(
        s0, w, window_strides=(1, 1), padding=((0, 0), (c, ck - 1 - c)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=hq,
        precision=jax.lax.Precision.HIGHEST)  # [B, Hq, bq, Tk]
    tvis = vis_rows(start + jnp.arange(bq))
    logits = jnp.where(tvis, conv, -jnp.inf)
    if head_mix == "pre":
      logits = jnp.where(tvis, _mix_heads(jnp.where(tvis, logits, 0.0), head_mix_w, 1), -jnp.inf)
    p, _ = flash_reference.softmax_with_sink(logits)
    if head_mix == "post":
      p = _mix_heads(p, head_mix_w, 1)
    p = p.reshape(b, hkv, rep, bq, tk)
    return jnp.einsum("bgrqk,bkgd->bqgrd", p, vf)

  out = jax.lax.map(block, (q_blocks, starts))  # [nb, B, bq, Hkv, rep, D]
  out = jnp.moveaxis(out, 0, 1).reshape(b, nb * bq, hq, d)[:, :tq]
  return out.astype(q.dtype)


def _is_int(x):
  return isinstance(x, int) and not isinstance(x, bool)


def _bad(name, what, value):
  return ValueError(f"model.attention_options.{name} must be {what}, got {value!r}")


@registry.register("multi_token")
class MultiTokenAttention(MultiHeadAttention):
  """`mha` projections + key-query conv, head mixing and group norm (see module doc)."""

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    _check_impl(cfg.implementation)
    hq, d, pd = cfg.num_heads, cfg.head_dim, cfg.param_dtype
    kqk = cfg.option("kq_kernel", (6, 11))
    if not (isinstance(kqk, (tuple, list)) and len(kqk) == 2
            and all(_is_int(x) and x >= 1 for x in kqk)):
      raise _bad("kq_kernel", "a pair of positive integers (cq, ck)", kqk)
    cq, ck = int(kqk[0]), int(kqk[1])
    g = cfg.option("head_group", 2)
    if not (_is_int(g) and g >= 1 and hq % g == 0):
      raise _bad("head_group", f"a positive integer dividing num_heads={hq}", g)
    self.head_mix = cfg.option("head_mix", "post")
    if self.head_mix not in HEAD_MIX:
      raise _bad("head_mix", f"one of {HEAD_MIX}", self.head_mix)
    self.group_norm = cfg.option("group_norm", True)
    if not isinstance(self.group_norm, bool):
      raise _bad("group_norm", "true or false", self.group_norm)
    ds = cfg.option("depth_scale", None)
    if ds is not None and not (isinstance(ds, (int, float)) and not isinstance(ds, bool)):
      raise _bad("depth_scale", "a number or null", ds)
    self.depth_scale = (depth_scale_for_layer(getattr(cfg, "layer", 0)) if ds is None
                        else float(ds))
    self.gate = cfg.option("gate", "none")
    if self.gate not in GATES:
      raise _bad("gate", f"one of {GATES}", self.gate)
    self.block_q = cfg.option("block_q", 128)
    if not (_is_int(self.block_q) and self.block_q >= 1):
      raise _bad("block_q", "a positive integer", self.block_q)
    theta = jnp.zeros((hq, cq, ck), pd).at[:, 0, ck // 2].set(1.0)  # delta kernel
    self.kq_kernel = nnx.Param(theta, logical_axes=("heads", None, None))
    self.head_mix_w = (nnx.Param(jnp.broadcast_to(jnp.eye(g, dtype=pd), (hq // g, g, g)),
                                 logical_axes=(None, None, None))
                       if self.head_mix != "none" else None)
    self.norm_gamma = (nnx.Param(jnp.ones((d,), pd), logical_axes=("head_dim",))
                       if self.group_norm else None)
    if self.gate == "scalar":
      # The authors initialise w like the projections (truncated normal, std dim^-0.5).
      w = d ** -0.5 * jax.random.truncated_normal(rngs.params(), -3.0, 3.0, (d,), pd)
      self.gate_w = nnx.Param(w, logical_axes=("head_dim",))
      self.gate_b = nnx.Param(jnp.zeros((), pd))
    else:
      self.gate_w = self.gate_b = None

  def core(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask,
           positions: jax.Array) -> jax.Array:
    q, k = self.positional(q, k, positions, positions)
    mix = None if self.head_mix_w is None else self.head_mix_w[...]
    o = multi_token_attention(q, k, v, self.kq_kernel[...], mix, mask, head_mix=self.head_mix,
                              block_q=self.block_q, implementation=self.cfg.implementation)
    if self.group_norm:
      o = group_rms_norm(o, self.norm_gamma[...], self.depth_scale)
    if self.gate_w is not None:
      g = jnp.einsum("bthd,d->bth", o.astype(jnp.float32), self.gate_w[...].astype(jnp.float32))
      o = o * jax.nn.sigmoid(g + self.gate_b[...].astype(jnp.float32))[..., None].astype(o.dtype)
    return o
