"""`neural`: Neural Attention, a feed-forward network in place of the dot-product score.

From "Neural Attention: A Novel Mechanism for Enhanced Expressive Power in
Transformer Models" (DiGiugno and Mahmood, 2025; code
github.com/awayfromzel/neural-attention-research). Only the attention matrix
changes: the score of query i and key j is a small MLP of the pair instead of
q_i . k_j, then the usual softmax over the visible keys and value sum.

Equations, per query head h (kv head g(h) = floor(h Hkv / Hq)):

    a_ih  = q_ih W_a^h + b^h                                    [F_1]   (per query token)
    c_jh  = k_jg W_b^h                                          [F_1]   (per key token)
    z_ijh = act(a_ih + c_jh)                                    the pair layer
    z_ijh = act(z_ijh W_l^h + b_l^h),  l = 2 .. L               optional deeper pair layers
    s_ijh = z_ijh . w_out^h                                     the score
    O_ih  = sum_j softmax_j(s_ijh + M_ij) v_jg
    y     = concat_h(O_h) W_O

A first layer on the concatenation [q_i; k_j] is exactly W_a q_i + W_b k_j + b,
so the per-token projections are computed once (O(T F_1)) and only the add,
the activation and the deeper layers run per pair.

Confirmed against the authors' code (NeuralAttention.py, read in this
session): scores come from an MLP on concat(q_i, k_j) with ReLU, a softmax
over keys, no 1/sqrt(d) scale, values as usual. Their MLP is
[q_proj(q); k_proj(k)] -> Linear(2p, p) -> ReLU -> Linear(p, p/2) -> ReLU ->
Linear(p/2, 1), p = head_dim // 32, with the down-projections q_proj / k_proj
and the MLP shared by all heads.

What is chosen here (the paper leaves width/depth/sharing to the experiment):
  * the bias-free linear down-projections before the first layer are folded
    into W_a, W_b (a product of linear maps; it only changes the
    parameterisation, and a rank limit that hidden <= head_dim already implies);
  * the final scalar bias is dropped: a constant added to every score of a
    row cancels in the softmax;
  * option `hidden` (default head_dim: the brief's "small, e.g. head_dim";
    the authors' code uses head_dim // 32 then half of it): an int for one
    pair layer (the standard s = w^T act(W_a q + W_b k + b)), or a tuple of
    widths for deeper pair MLPs (`hidden=(2, 1)` is the authors' net at head_dim 64);
  * option `activation` (default "relu", the authors' code): relu | gelu |
    silu | tanh | linear. With "tanh" and one layer this is Bahdanau's additive
    attention per head; with "linear" the query term is a per-row constant, so
    the scores reduce to a query-independent softmax over u_h . k_j (tested);
  * option `share_heads` (default False: per-head networks as the brief asks;
    True: one network for all heads, as in the authors' code);
  * the layer's positional encoding (RoPE by default) rotates q and k before
    the network (the authors' LM used absolute position embeddings instead).
  * init: W_a, W_b fan-in normal (std 1/sqrt(head_dim)), deeper layers and
    w_out fan-in normal, biases 0.

Kernel path. The pairwise MLP is not a matrix product of q and k, so the
flash kernel cannot run it, and its cost is O(Tq Tk Hq F) per layer
(F = F_1 + sum_l F_l F_{l+1} + F_L). There is **no Pallas kernel**:
  * `implementation="reference"`: the dense form, all [B, Tq, Tk, Hq, F_1]
    pair features at once (the specification; can return probabilities);
  * "auto" / "xla": a **query-chunked XLA path**: `lax.map` over blocks of
    `block_q` queries, each building its [B, block_q, Tk, Hq, F_1] pair
    features, masked by `masking.visible` (no [T, T] mask), softmax and value
    sum. The block body is wrapped in `jax.checkpoint`, so the backward
    recomputes one block at a time: memory O(B block_q Tk Hq F_max + B T Hq (F_1 + D)),
    linear in T;
  * "pallas*" / "cudnn" raise.
  Rows with no visible key output 0 with zero gradient.

Options (`model.attention_options.<name>`): hidden, activation, share_heads,
block_q (int >= 1, default 64).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import query_blocks, registry
from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.attention.mha import MultiHeadAttention
from pallas_kernels.flash import reference as flash_reference

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "linear": lambda x: x,
}


class ScoreNet(NamedTuple):
  """Parameters of the score MLP; the leading axis is Hq (per head) or 1 (shared).

  w_q, w_k [H, D, F_1]; b [H, F_1]; hidden: ((w [H, F_l, F_{l+1}], b [H, F_{l+1}]), ...);
  w_out [H, F_L].
  """
  w_q: jax.Array
  w_k: jax.Array
  b: jax.Array
  hidden: Tuple[Tuple[jax.Array, jax.Array], ...]
  w_out: jax.Array


def _check_impl(implementation: str):
  query_blocks.refuse_kernels("neural", implementation, "an MLP score is not a q.k product")


def _heads(net: ScoreNet, hq: int) -> ScoreNet:
  """Broadcasts a shared (leading axis 1) network to Hq heads, float32."""
  f = lambda x: jnp.broadcast_to(x.astype(jnp.float32), (hq,) + x.shape[1:])
  return ScoreNet(f(net.w_q), f(net.w_k), f(net.b), tuple((f(w), f(b)) for w, b in net.hidden),
                  f(net.w_out))


def _features(q, k, net: ScoreNet):
  """Per-token first-layer features: a [B, Tq, Hq, F_1] (bias included), c [B, Tk, Hq, F_1]."""
  hq = q.shape[2]
  a = jnp.einsum("bqhd,hdf->bqhf", q.astype(jnp.float32), net.w_q) + net.b
  c = jnp.einsum("bkhd,hdf->bkhf", flash_reference.repeat_kv(k, hq).astype(jnp.float32), net.w_k)
  return a, c


def _pair_scores(a, c, net: ScoreNet, act):
  """a [B, bq, Hq, F_1], c [B, Tk, Hq, F_1] -> scores [B, Hq, bq, Tk] (float32)."""
  z = act(a[:, :, None] + c[:, None])  # [B, bq, Tk, Hq, F_1]
  for w, b in net.hidden:
    z = act(jnp.einsum("bqkhf,hfg->bqkhg", z, w) + b)
  return jnp.einsum("bqkhf,hf->bhqk", z, net.w_out)


def _masked_softmax(s, vis):
  """Softmax over the last axis of s where `vis` (None: all visible); empty rows give 0."""
  if vis is not None:
    s = jnp.where(vis, s, -jnp.inf)
  return flash_reference.softmax_with_sink(s)[0]


def neural_attention_reference(q, k, v, net: ScoreNet, mask: Optional[Mask] = None, *,
                               activation: str = "relu", return_probs: bool = False):
  """Dense specification: q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D] -> [B,Tq,Hq,D] (+ probs [B,Hq,Tq,Tk])."""
  flash_reference.check_qkv(q, k, v)
  mask = Mask.bidirectional() if mask is None else mask
  b, tq, hq, _ = q.shape
  net = _heads(net, hq)
  a, c = _features(q, k, net)
  s = _pair_scores(a, c, net, ACTIVATIONS[activation])
  p = _masked_softmax(s, mask.dense(b, tq, k.shape[1]))
  vf = flash_reference.repeat_kv(v, hq).astype(jnp.float32)
  out = jnp.einsum("bhqk,bkhd->bqhd", p, vf).astype(q.dtype)
  return (out, p) if return_probs else out


def neural_attention(q, k, v, net: ScoreNet, mask: Optional[Mask] = None, *,
                     activation: str = "relu", block_q: int = 64,
                     implementation: str = "auto") -> jax.Array:
  """The pure function of the family (query-chunked XLA path, memory linear in T).

  q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], `net` a ScoreNet -> [B,Tq,Hq,D].
  """
  _check_impl(implementation)
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r} is not one of {tuple(ACTIVATIONS)}")
  if implementation == "reference":
    return neural_attention_reference(q, k, v, net, mask, activation=activation)
  flash_reference.check_qkv(q, k, v)
  mask = Mask.bidirectional() if mask is None else mask
  b, tq, hq, d = q.shape
  tk = k.shape[1]
  act = ACTIVATIONS[activation]
  net = _heads(net, hq)
  a, c = _features(q, k, net)  # O(T Hq F_1), outside the loop
  vf = flash_reference.repeat_kv(v, hq).astype(jnp.float32)

  def block(ab, vis):  # ab [B, bq, Hq, F_1]
    p = _masked_softmax(_pair_scores(ab, c, net, act), vis)  # [B, Hq, bq, Tk]
    return jnp.einsum("bhqk,bkhd->bqhd", p, vf)

  out = query_blocks.map_query_blocks(block, a, block_q, mask.mask_args(b, tq, tk), tk)
  return out.astype(q.dtype)


def _is_int(x):
  return isinstance(x, int) and not isinstance(x, bool)


def _widths(cfg: AttentionConfig) -> Tuple[int, ...]:
  hidden = cfg.option("hidden", cfg.head_dim)
  widths = (hidden,) if _is_int(hidden) else tuple(hidden) if isinstance(
      hidden, (tuple, list)) else ()
  if not widths or not all(_is_int(w) and w >= 1 for w in widths):
    raise ValueError(f"model.attention_options.hidden must be a positive integer or a tuple of "
                     f"them, got {hidden!r}")
  return widths


@registry.register("neural")
class NeuralAttention(MultiHeadAttention):
  """`mha` projections + an MLP score network per head (see module doc)."""

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)  # q/k/v/o first: same weights as `mha` per seed
    _check_impl(cfg.implementation)
    self.widths = _widths(cfg)
    self.activation = cfg.option("activation", "relu")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"model.attention_options.activation={self.activation!r} is not one of "
                       f"{tuple(ACTIVATIONS)}")
    self.share_heads = cfg.bool_option("share_heads", False)
    self.block_q = cfg.int_option("block_q", 64)
    if self.block_q < 1:
      raise ValueError(f"model.attention_options.block_q must be >= 1, got {self.block_q}")
    h = 1 if self.share_heads else cfg.num_heads
    d, pd, f1 = cfg.head_dim, cfg.param_dtype, self.widths[0]

    def normal(shape, fan_in, axes):
      w = jax.random.normal(rngs.params(), shape, pd) / math.sqrt(fan_in)
      return nnx.Param(w, logical_axes=axes)

    self.w_q = normal((h, d, f1), d, ("heads", "head_dim", None))
    self.w_k = normal((h, d, f1), d, ("heads", "head_dim", None))
    self.b = nnx.Param(jnp.zeros((h, f1), pd), logical_axes=("heads", None))
    self.hidden_w = nnx.List([normal((h, fi, fo), fi, ("heads", None, None))
                              for fi, fo in zip(self.widths[:-1], self.widths[1:])])
    self.hidden_b = nnx.List([nnx.Param(jnp.zeros((h, fo), pd), logical_axes=("heads", None))
                              for fo in self.widths[1:]])
    self.w_out = normal((h, self.widths[-1]), self.widths[-1], ("heads", None))

  def net(self) -> ScoreNet:
    return ScoreNet(self.w_q[...], self.w_k[...], self.b[...],
                    tuple((w[...], b[...]) for w, b in zip(self.hidden_w, self.hidden_b)),
                    self.w_out[...])

  def core(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask,
           positions: jax.Array) -> jax.Array:
    q, k = self.positional(q, k, positions, positions)
    return neural_attention(q, k, v, self.net(), mask, activation=self.activation,
                            block_q=self.block_q, implementation=self.cfg.implementation)

  def train_flops_per_token(self, seq_len: int) -> float:
    """Pairwise score-MLP and value FLOPs per token, forward + backward (3x forward).

    Forward per (query, key, head): add + activation of the pair layer (2 F_1),
    deeper layers (2 F_l F_{l+1}), the output dot (2 F_L), the value sum (2 D).
    The per-token W_a q / W_b k products are parameter FLOPs, not counted here.
    """
    w = self.widths
    pair = 2 * w[0] + sum(2 * a * b for a, b in zip(w[:-1], w[1:])) + 2 * w[-1]
    return 3.0 * self.cfg.num_heads * (pair + 2 * self.cfg.head_dim) * seq_len
