"""`attentive_probe`: efficient probing (EP) and the multi-head attentive probe, as pooling heads.

From "Attention, Please! Revisiting Attentive Probing for Masked Image Modeling"
(Psomas et al., 2025; code: github.com/billpsomas/efficient-probing,
`poolings/ep.py` and `probe_heads.py`). A probe reads the frozen patch tokens
X = [x_1 .. x_T] (x_t in R^d) of an encoder and trains only itself.

EP, "a multi-query cross-attention mechanism that eliminates redundant
projections" (variant="ep", the default). M learned queries q_j in R^d attend
over the tokens directly: no query projection (the queries are parameters in
the input space), no key projection (the tokens are the keys), no output
projection (the classifier follows). With H heads splitting the feature dim
(q_{j,h}, x_{t,h} in R^{d/H}; EP's code uses H = 1):

    a_{j,h} = softmax_t( q_{j,h} . x_{t,h} / sqrt(d/H) + pad_t )        (pad_t = -inf on padding)
    v_t     = x_t W_V in R^{d'}, viewed as [H, M, e] with e = d' / (H M)
    y[h, j] = sum_t a_{j,h,t} v_t[h, j]                                  (combine="concat")
    pooled  = flatten(y) in R^{d'},   logits = pooled W_c + b_c

so each query aggregates its own d'/M slice of the values and the slices are
concatenated, as in the paper's Fig. 1 ("attention predictor outputs a_j are
used ... to aggregate value features V into sub-vectors y_j, forming the final
output y").

Confirmed from the authors' code (poolings/ep.py, probe_heads.py):
  * the value projection is kept: W_V = nn.Linear(d, d // d_out, bias=False),
    d' = d / d_out (d_out = 1 by default, so d' = d);
  * outputs are concatenated (x_cls.view(B, C')), not averaged;
  * scale (d/H)^-0.5, queries initialised N(0, 0.02^2), 32 queries by default,
    H = 1 (its `attn.squeeze(1)` only works for one head);
  * the probe is pooling -> BatchNorm1d(d', affine=False) -> Linear(d', classes).
    The non-affine BatchNorm is a training-protocol choice left to the caller
    here (batch statistics are not part of a reusable layer); the classifier
    reads the pooled vector directly.
Open choices, marked (standard formulation picked as the default):
  * combine="mean": every query aggregates the whole value vector and the M
    outputs are averaged (the "outputs averaged" reading in FAMILIES.md; not
    what EP's code does);
  * value_proj=False: the tokens are the values too (no projection at all;
    "transformation-free" taken literally);
  * num_heads > 1 splits keys/queries along the feature dim as above (EP's code
    cannot run it).

The attention runs through `pallas_kernels.flash_attention` with Tq = M
queries, Tk = T tokens, no causal mask and the padding as `kv_lengths` (or
segment ids for a boolean mask), so it runs on every backend. The kernel
computes each query against the full per-head value width d'/H and the
"concat" slice is then taken: the value matmul costs M x T x d', the same
order as the scores (M x T x d). The Pallas kernels take head dims up to 256:
EP's single head over a ViT-B feature (d/H = 768) is declined by them and
"auto" runs the memory-efficient XLA path (logged once); num_heads with
d/H <= 256 reaches the kernels (a different probe: H attention maps per query).

The multi-head attentive probe (variant="mha", for comparison): the standard
multi-head cross-attention probe of MAE / V-JEPA / big_vision "MAP" heads,

    Q = P W_Q,  K = X W_K,  V = X W_V      (P: [M, d] learned, H heads of d/H)
    y_j = concat_h softmax(Q_{j,h} K_h^T / sqrt(d/H) + pad) V_h  W_O
    with mlp_dim: y_j <- y_j + MLP(LayerNorm(y_j))   (big_vision's MAP block; the LayerNorm's
                                              eps `norm_eps`, the MLP's `mlp_activation`)
    pooled = mean_j y_j                      (one query, M = 1, by default)

It has 4 d^2 projection parameters where EP has d d'; `num_params` compares them.

Gradients to the encoder are cut by `stop_gradient=True` (the default: a probe
reads frozen features; pass False to train the encoder through the head).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from layers import pooling
from layers.linear import Linear
from layers.mlp import MLP
from layers.norms import LayerNorm
from pallas_kernels.flash import api as flash_api

VARIANTS = ("ep", "mha")
COMBINES = ("concat", "mean")
DEFAULT_QUERIES = {"ep": 32, "mha": 1}


def _check_probe_shapes(x, queries, values, num_heads, combine):
  b, t = pooling.check_tokens(x)
  d = x.shape[-1]
  if queries.ndim != 2 or queries.shape[-1] != d:
    raise ValueError(f"queries must be [num_queries, d_model={d}], got {queries.shape}")
  m = queries.shape[0]
  if values.ndim != 3 or values.shape[:2] != (b, t):
    raise ValueError(f"values must be [batch={b}, tokens={t}, value_dim], got {values.shape}")
  pooling.check_positive("num_heads", num_heads)
  pooling.check_choice("combine", combine, COMBINES)
  if d % num_heads:
    raise ValueError(f"d_model={d} is not divisible by num_heads={num_heads}")
  dv = values.shape[-1]
  pieces = num_heads * (m if combine == "concat" else 1)
  if dv % pieces:
    raise ValueError(
        f"value_dim={dv} is not divisible by num_heads x num_queries = {pieces} "
        f"(combine={combine!r} gives each query and head its own slice)" if combine == "concat"
        else f"value_dim={dv} is not divisible by num_heads={num_heads}")
  return b, t, d, m, dv


def _combine(out, b, m, h, dv, combine):
  """Per-(query, head) outputs [B, M, H, dv/H] -> pooled [B, dv] (layout [H, M, e] or [H, dv/H])."""
  if combine == "mean":
    return jnp.mean(out, axis=1).reshape(b, dv)
  e = dv // (h * m)
  out = out.reshape(b, m, h, m, e)
  diag = jnp.diagonal(out, axis1=1, axis2=3)  # [B, H, e, M]: query j keeps its own slice j
  return jnp.moveaxis(diag, -1, 2).reshape(b, dv)


def efficient_probe(x: jax.Array, queries: jax.Array, values: jax.Array, *, num_heads: int = 1,
                    combine: str = "concat", mask: Optional[jax.Array] = None,
                    lengths: Optional[jax.Array] = None, scale: Optional[float] = None,
                    implementation: str = "auto") -> jax.Array:
  """EP pooling through `flash_attention`: x [B, T, d] (the keys), queries [M, d],
  values [B, T, d'] (x W_V, or x) -> pooled [B, d'] (equations in the module docstring).

  mask: boolean [B, T], True = real token; lengths: [B] real tokens 0..len-1.
  """
  b, t, d, m, dv = _check_probe_shapes(x, queries, values, num_heads, combine)
  h = num_heads
  q = jnp.broadcast_to(queries.astype(x.dtype).reshape(1, m, h, d // h), (b, m, h, d // h))
  k = x.reshape(b, t, h, d // h)
  v = values.astype(x.dtype).reshape(b, t, h, dv // h)
  out = flash_api.flash_attention(
      q, k, v, scale=scale, implementation=implementation,
      **pooling.flash_mask_kwargs(mask, lengths, b, m, t))
  return _combine(out, b, m, h, dv, combine)


def efficient_probe_reference(x: jax.Array, queries: jax.Array, values: jax.Array, *,
                              num_heads: int = 1, combine: str = "concat",
                              mask: Optional[jax.Array] = None,
                              lengths: Optional[jax.Array] = None, scale: Optional[float] = None,
                              return_weights: bool = False):
  """The specification of `efficient_probe` in plain jnp (dense scores [B, M, H, T]).

  return_weights: also return the attention a [B, M, H, T] (the probe's attention maps).
  """
  b, t, d, m, dv = _check_probe_shapes(x, queries, values, num_heads, combine)
  h = num_heads
  scale = (d // h) ** -0.5 if scale is None else scale
  q = queries.astype(jnp.float32).reshape(m, h, d // h)
  k = x.astype(jnp.float32).reshape(b, t, h, d // h)
  s = scale * jnp.einsum("jhc,bthc->bjht", q, k)
  valid = pooling.valid_tokens(mask, lengths, b, t)
  a = pooling.masked_softmax(s, None if valid is None else valid[:, None, None, :])
  vals = values.astype(jnp.float32)
  if combine == "concat":
    e = dv // (h * m)
    y = jnp.einsum("bjht,bthje->bhje", a, vals.reshape(b, t, h, m, e))
  else:
    y = jnp.mean(jnp.einsum("bjht,bthc->bjhc", a, vals.reshape(b, t, h, dv // h)), axis=1)
  y = y.reshape(b, dv).astype(x.dtype)
  return (y, a) if return_weights else y


def cross_attention_pool(q: jax.Array, k: jax.Array, v: jax.Array, *,
                         mask: Optional[jax.Array] = None, lengths: Optional[jax.Array] = None,
                         implementation: str = "auto") -> jax.Array:
  """The MHA probe's core: q [B, M, H, D] against k/v [B, T, H, D] over the real tokens
  (non-causal, padding as kv_lengths / segment ids) -> [B, M, H, D]."""
  b, m, t = q.shape[0], q.shape[1], k.shape[1]
  return flash_api.flash_attention(q, k, v, implementation=implementation,
                                   **pooling.flash_mask_kwargs(mask, lengths, b, m, t))


@pooling.register_pooling("attentive_probe")
class AttentiveProbe(pooling.PoolingHead):
  """EP (variant="ep") or the multi-head attentive probe (variant="mha") + optional classifier.

  Options: num_queries (M; default 32 for EP, as its code, 1 for MHA), num_heads
  (H; default 1 for EP, 8 for MHA where d divides), value_dim (d'; EP only,
  default d), value_proj (EP: keep W_V, default True), combine ("concat" | "mean"),
  mlp_dim (MHA: the MAP block's MLP width; None: no MLP), norm_eps / mlp_activation
  (MHA with mlp_dim: its LayerNorm eps, default 1e-6, and MLP activation, default tanh
  GELU; SigLIP's head takes the encoder's), use_bias (projection biases), stop_gradient
  (default True: a probe on frozen features), implementation (the flash backend).
  Parameters: EP: queries [M, d] ("queries", "embed"), W_V [d, d'] ("embed", None);
  MHA: queries, W_Q/W_K/W_V [d, H, d/H] ("embed", "heads", "head_dim"), W_O.
  """

  def __init__(self, d_model: int, *, num_classes: Optional[int] = None, variant: str = "ep",
               num_queries: Optional[int] = None, num_heads: Optional[int] = None,
               value_dim: Optional[int] = None, value_proj: bool = True, combine: str = "concat",
               mlp_dim: Optional[int] = None, norm_eps: float = 1e-6,
               mlp_activation: Optional[str] = None, use_bias: bool = False,
               stop_gradient: bool = True,
               implementation: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    pooling.check_positive("d_model", d_model)
    self.variant = pooling.check_choice("variant", variant, VARIANTS)
    self.combine = pooling.check_choice("combine", combine, COMBINES)
    self.implementation = pooling.check_implementation(implementation)
    if not isinstance(value_proj, bool):
      raise ValueError(f"value_proj must be true or false, got {value_proj!r}")
    m = DEFAULT_QUERIES[variant] if num_queries is None else num_queries
    self.num_queries = pooling.check_positive("num_queries", m)
    if num_heads is None:
      num_heads = 1 if variant == "ep" else (8 if d_model % 8 == 0 else 1)
    self.num_heads = h = pooling.check_positive("num_heads", num_heads)
    if d_model % h:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={h}")
    self.dtype = dtype
    init = 0.02 * jax.random.normal(rngs.params(), (m, d_model), param_dtype)
    self.queries = nnx.Param(init, logical_axes=("queries", "embed"))
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if variant == "ep":
      if mlp_dim is not None:
        raise ValueError("mlp_dim is an option of variant='mha' (the MAP block), not of 'ep'")
      if value_dim is not None:
        pooling.check_positive("value_dim", value_dim)
        if not value_proj and value_dim != d_model:
          raise ValueError(f"value_proj=False uses the tokens as values, so value_dim must be "
                           f"d_model={d_model} (or unset), got {value_dim}")
      dv = d_model if value_dim is None else value_dim
      pieces = h * m if combine == "concat" else h
      if dv % pieces:
        raise ValueError(
            f"value_dim={dv} must be divisible by num_heads x num_queries = {h} x {m} with "
            f"combine='concat' (each query reads its own slice); change num_queries or value_dim"
            if combine == "concat" else
            f"value_dim={dv} must be divisible by num_heads={h}")
      self.value = Linear(d_model, dv, axes=("embed", None), **kw) if value_proj else None
      out_dim = dv
    else:
      if value_dim is not None or not value_proj or combine != "concat":
        raise ValueError("value_dim / value_proj / combine are options of variant='ep'; "
                         "variant='mha' projects Q, K, V to heads of d_model / num_heads and "
                         "averages its queries")
      hd = d_model // h
      proj = dict(axes=("embed", "heads", "head_dim"), **kw)
      self.q = Linear(d_model, (h, hd), **proj)
      self.k = Linear(d_model, (h, hd), **proj)
      self.v = Linear(d_model, (h, hd), **proj)
      self.o = Linear((h, hd), d_model, axes=("heads", "head_dim", "embed"), **kw)
      if mlp_dim is not None:
        pooling.check_positive("mlp_dim", mlp_dim)
        self.norm = LayerNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(d_model, mlp_dim, kind="gelu", activation=mlp_activation, use_bias=True,
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      else:
        self.norm = self.mlp = None
      out_dim = d_model
    self._init_head(d_model, out_dim, num_classes, stop_gradient, dtype, param_dtype, rngs)

  def pool_features(self, x, mask, lengths):
    x = x.astype(self.dtype)
    if self.variant == "ep":
      values = x if self.value is None else self.value(x)
      return efficient_probe(x, self.queries[...].astype(self.dtype), values,
                             num_heads=self.num_heads, combine=self.combine, mask=mask,
                             lengths=lengths, implementation=self.implementation)
    b = x.shape[0]
    q = jnp.broadcast_to(self.q(self.queries[...].astype(self.dtype))[None],
                         (b,) + (self.num_queries, self.num_heads, self.d_model // self.num_heads))
    o = cross_attention_pool(q, self.k(x), self.v(x), mask=mask, lengths=lengths,
                             implementation=self.implementation)
    y = self.o(o)  # [B, M, d]
    if self.mlp is not None:
      y = y + self.mlp(self.norm(y))
    return jnp.mean(y, axis=1)

  def attention_weights(self, x: jax.Array, *, mask: Optional[jax.Array] = None,
                        lengths: Optional[jax.Array] = None) -> jax.Array:
    """EP's attention maps a [B, M, H, T] from the reference path (diagnostics, plots)."""
    if self.variant != "ep":
      raise ValueError("attention_weights is implemented for variant='ep'")
    x = pooling.features(x, True).astype(self.dtype)
    values = x if self.value is None else self.value(x)
    _, a = efficient_probe_reference(x, self.queries[...], values, num_heads=self.num_heads,
                                     combine=self.combine, mask=mask, lengths=lengths,
                                     return_weights=True)
    return a
