"""`entmax`: alpha-entmax sparse attention with a learned alpha per head.

From "Adaptively Sparse Transformers" (Correia, Niculae and Martins, 2019).
Softmax is replaced by alpha-entmax, which can give keys *exactly* zero weight;
alpha is learned per head, so each head picks between softmax-like (alpha -> 1)
and sparsemax-like (alpha = 2) behaviour.

Equations (per query row, z_j = scale * q . k_j, masked keys excluded):

    entmax_alpha(z)_j = [(alpha - 1) z_j - tau]_+ ^ (1 / (alpha - 1)),   tau s.t. sum_j p_j = 1
    O_h = entmax_{alpha_h}(Q_h K_{g(h)}^T / sqrt(d) + M) V_{g(h)}
    alpha_h = 1 + sigmoid(a_h)   in (1, 2)

  * tau by bisection (the solver of the paper's code): with x = (alpha - 1)(z - max z),
    tau lies in [-1, -(1/n)^(alpha - 1)] (n visible keys); `n_iter` halvings
    (default 40: the bracket has length <= 1, so 2^-40 is far below float32
    resolution of tau), then p is renormalised to sum to one exactly.
  * Gradient (jax.custom_vjp, closed form). With s = {p > 0}, g_j = p_j^(2 - alpha):
        dz    = g * (dp - sum(g dp) / sum(g))
        dalpha = sum_j dp_j [ (p_j - g~_j) / (alpha - 1)^2 - (p_j log p_j - g~_j H) / (alpha - 1) ],
    g~ = g / sum(g), H = sum_j p_j log p_j (the alpha-gradient of the paper,
    Correia et al. 2019, Prop. 1). Both are tested against finite differences
    and against autodiff of an implicit-function form of the bisection.
  * Masked keys get p = 0 and zero gradient; a row with no visible key outputs 0.

Kernel: tau couples every key of a row, which breaks online-softmax tiling, so
there is **no Pallas kernel** here: the fast path is a **chunked XLA path linear
in T** -- queries are processed `block_q` rows at a time (lax.map), each block
building its full [block_q, Tk] rows, with masks evaluated per block by
`masking.visible` (no [T, T] mask). The block body is wrapped in jax.checkpoint,
so the backward recomputes the rows of one block at a time and memory stays
O(block_q * Tk + T * D). `implementation="reference"` runs the dense
quadratic form (the specification); "auto" / "xla" run the chunked path;
"pallas*" and "cudnn" raise (no such kernel exists).

What the paper leaves open / what is chosen here:
  * alpha range and parameterisation: 1 + sigmoid(a) in (1, 2) (as in the paper);
    for float32 stability alpha - 1 is clamped at >= 1e-3 inside the solver
    (below it (alpha - 1) z loses precision); the clamp has zero gradient.
  * initialisation: alpha_h = `alpha_init` (default 1.5) for every head.
  * solver: bisection with a fixed iteration count (no sort), as above.
  * GQA: alpha belongs to the query head.

Options (`model.attention_options.<name>`):
  alpha_init (float in (1, 2), 1.5): initial alpha of every head.
  learn_alpha (bool, True): if False alpha is a constant (stop_gradient).
  bisection_iters (int >= 1, 40): bisection steps for tau.
  block_q (int >= 1, 128): query rows per block on the chunked path.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import query_blocks, registry
from layers.attention.config import AttentionConfig
from layers.attention.masks import Mask
from layers.attention.mha import MultiHeadAttention
from pallas_kernels.flash import reference as flash_reference

_MIN_ALPHA_GAP = 1e-3


def _unbroadcast(g: jax.Array, shape) -> jax.Array:
  """Sums `g` down to `shape` (the inverse of broadcasting)."""
  shape = tuple(shape)
  extra = g.ndim - len(shape)
  if extra:
    g = jnp.sum(g, axis=tuple(range(extra)))
  axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
  if axes:
    g = jnp.sum(g, axis=axes, keepdims=True)
  return g.reshape(shape)


def _bisect(z: jax.Array, alpha: jax.Array, n_iter: int):
  """Returns (p, am1): entmax probabilities over the last axis and the clamped alpha - 1."""
  valid = z > -jnp.inf
  am1 = jnp.maximum(jnp.broadcast_to(alpha, z.shape[:-1] + (1,)) - 1.0, _MIN_ALPHA_GAP)
  zmax = jnp.max(jnp.where(valid, z, -jnp.inf), axis=-1, keepdims=True, initial=-jnp.inf)
  has_any = jnp.isfinite(zmax)
  x = jnp.where(valid, (z - jnp.where(has_any, zmax, 0.0)) * am1, -jnp.inf)  # max x = 0
  n = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1).astype(z.dtype)
  expo = 1.0 / am1

  def probs(tau):
    return jnp.where(valid, jnp.maximum(x - tau, 0.0) ** expo, 0.0)

  lo = jnp.full_like(zmax, -1.0)  # sum p(lo) >= 1 (the max alone gives 1)
  hi = -(1.0 / n) ** am1  # sum p(hi) <= 1

  def step(_, lohi):
    lo, hi = lohi
    mid = 0.5 * (lo + hi)
    f = jnp.sum(probs(mid), axis=-1, keepdims=True) - 1.0
    return jnp.where(f >= 0, mid, lo), jnp.where(f >= 0, hi, mid)

  lo, hi = jax.lax.fori_loop(0, n_iter, step, (lo, hi))
  p = probs(lo)
  s = jnp.sum(p, axis=-1, keepdims=True)
  p = jnp.where(has_any, p / jnp.where(s > 0, s, 1.0), 0.0)
  return p, am1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def entmax_bisect(z: jax.Array, alpha: jax.Array, n_iter: int = 40) -> jax.Array:
  """alpha-entmax over the last axis of z (float32); entries equal to -inf are masked.

  `alpha` broadcasts against z.shape[:-1] + (1,) (e.g. [H, 1, 1] for [B, H, Tq, Tk]).
  Rows with no finite entry give all zeros. Differentiable in z and alpha (closed form).
  """
  return _bisect(z, alpha, n_iter)[0]


def _entmax_fwd(z, alpha, n_iter):
  p, am1 = _bisect(z, alpha, n_iter)
  return p, (p, am1, alpha)


def _entmax_bwd(n_iter, res, dp):
  p, am1, alpha = res
  pos = p > 0
  g = jnp.where(pos, p ** (2.0 - (am1 + 1.0)), 0.0)  # p^(2 - alpha)
  gsum = jnp.sum(g, axis=-1, keepdims=True)
  gsafe = jnp.where(gsum > 0, gsum, 1.0)
  gdp = g * dp
  dz = gdp - g * (jnp.sum(gdp, axis=-1, keepdims=True) / gsafe)
  # d/dalpha (Correia et al. 2019); zero where alpha was clamped.
  plogp = jnp.where(pos, p * jnp.log(jnp.where(pos, p, 1.0)), 0.0)
  ent = jnp.sum(plogp, axis=-1, keepdims=True)
  gt = g / gsafe
  da = dp * ((p - gt) / am1 ** 2 - (plogp - gt * ent) / am1)
  da = jnp.sum(da, axis=-1, keepdims=True)
  da = jnp.where(am1 > _MIN_ALPHA_GAP, da, 0.0)
  da = jnp.where(gsum > 0, da, 0.0)
  return dz, _unbroadcast(da, jnp.shape(alpha)).astype(jnp.result_type(alpha))


entmax_bisect.defvjp(_entmax_fwd, _entmax_bwd)


def entmax_implicit_reference(z: jax.Array, alpha: jax.Array, n_iter: int = 40) -> jax.Array:
  """entmax with gradients by plain autodiff (a test oracle for the custom_vjp).

  tau* from bisection (stop_gradient), then one Newton step on
  f(tau) = sum_j [x_j - tau]_+^(1/(alpha-1)) - 1 whose derivative is held
  constant: at the root this is the implicit-function-theorem gradient of tau.
  """
  valid = z > -jnp.inf
  am1 = jnp.maximum(jnp.broadcast_to(alpha, z.shape[:-1] + (1,)) - 1.0, _MIN_ALPHA_GAP)
  zmax = jax.lax.stop_gradient(
      jnp.max(jnp.where(valid, z, -jnp.inf), axis=-1, keepdims=True, initial=-jnp.inf))
  has_any = jnp.isfinite(zmax)
  zs = jnp.where(valid, z - jnp.where(has_any, zmax, 0.0), 0.0)
  x = zs * am1
  p0 = jax.lax.stop_gradient(_bisect(z, alpha, n_iter)[0])
  pos = p0 > 0
  # tau* from p0 on its support: x_j - tau = p_j^(alpha - 1).
  base0 = jnp.where(pos, p0, 1.0) ** jax.lax.stop_gradient(am1)
  tau0 = jax.lax.stop_gradient(
      jnp.sum(jnp.where(pos, x - base0, 0.0), -1, keepdims=True)
      / jnp.maximum(jnp.sum(pos, -1, keepdims=True), 1))
  expo = 1.0 / am1

  def probs(tau):
    b = jnp.where(pos, x - tau, 1.0)
    return jnp.where(pos, b ** expo, 0.0)

  f = jnp.sum(probs(tau0), -1, keepdims=True) - 1.0
  dbase = jnp.where(pos, x - tau0, 1.0)
  fprime = jax.lax.stop_gradient(
      -jnp.sum(jnp.where(pos, expo * dbase ** (expo - 1.0), 0.0), -1, keepdims=True))
  tau = tau0 - f / jnp.where(fprime != 0, fprime, 1.0)
  p = probs(tau)
  return jnp.where(has_any, p, 0.0)


def _check_impl(implementation: str):
  query_blocks.refuse_kernels("entmax", implementation, "tau breaks online-softmax tiling")


def _alpha_heads(alpha, hq):
  alpha = jnp.asarray(alpha, jnp.float32)
  return jnp.broadcast_to(alpha, (hq,))


def entmax_attention_reference(q, k, v, alpha, mask: Optional[Mask] = None, *,
                               scale: Optional[float] = None, n_iter: int = 40,
                               return_probs: bool = False):
  """Dense specification: q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], alpha [Hq] (or scalar)."""
  flash_reference.check_qkv(q, k, v)
  mask = Mask.bidirectional() if mask is None else mask
  b, tq, hq, _ = q.shape
  vf = flash_reference.repeat_kv(v, hq).astype(jnp.float32)
  s = jnp.where(mask.dense(b, tq, k.shape[1]), flash_reference.dense_logits(q, k, scale), -jnp.inf)
  p = entmax_bisect(s, _alpha_heads(alpha, hq)[:, None, None], n_iter)
  out = jnp.einsum("bhqk,bkhd->bqhd", p, vf).astype(q.dtype)
  return (out, p) if return_probs else out


def entmax_attention(q, k, v, alpha, mask: Optional[Mask] = None, *,
                     scale: Optional[float] = None, n_iter: int = 40, block_q: int = 128,
                     implementation: str = "auto") -> jax.Array:
  """The pure function of the family (chunked XLA path, memory linear in T).

  q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], alpha [Hq] (or a scalar) -> [B,Tq,Hq,D].
  """
  _check_impl(implementation)
  if implementation == "reference":
    return entmax_attention_reference(q, k, v, alpha, mask, scale=scale, n_iter=n_iter)
  flash_reference.check_qkv(q, k, v)
  mask = Mask.bidirectional() if mask is None else mask
  b, tq, hq, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  rep = hq // hkv
  scale = d ** -0.5 if scale is None else scale
  alpha_g = _alpha_heads(alpha, hq).reshape(hkv, rep)[:, :, None, None]  # [Hkv, rep, 1, 1]
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)

  def block(qb, vis):  # qb [B, bq, Hq, D]
    qb = qb.reshape(*qb.shape[:2], hkv, rep, d).astype(jnp.float32)
    s = jnp.einsum("bqgrd,bkgd->bgrqk", qb, kf) * scale
    vis = query_blocks.group_heads(vis, hkv, rep)
    if vis is not None:
      s = jnp.where(vis, s, -jnp.inf)
    p = entmax_bisect(s, alpha_g, n_iter)
    return jnp.einsum("bgrqk,bkgd->bqgrd", p, vf).reshape(*qb.shape[:2], hq, d)

  out = query_blocks.map_query_blocks(block, q, block_q, mask.mask_args(b, tq, tk), tk)
  return out.astype(q.dtype)


def _option(cfg: AttentionConfig, name: str, default, check, what: str):
  value = cfg.option(name, default)
  if not check(value):
    raise ValueError(f"model.attention_options.{name} must be {what}, got {value!r}")
  return value


def _is_int(x):
  return isinstance(x, int) and not isinstance(x, bool)


@registry.register("entmax")
class EntmaxAttention(MultiHeadAttention):
  """`mha` projections + alpha-entmax (learned alpha per query head) in place of softmax."""

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    _check_impl(cfg.implementation)
    alpha_init = _option(
        cfg, "alpha_init", 1.5,
        lambda a: isinstance(a, (int, float)) and not isinstance(a, bool) and 1.0 < a < 2.0,
        "a number in (1, 2)")
    self.learn_alpha = _option(cfg, "learn_alpha", True, lambda x: isinstance(x, bool),
                               "true or false")
    self.n_iter = _option(cfg, "bisection_iters", 40, lambda x: _is_int(x) and x >= 1,
                          "a positive integer")
    self.block_q = _option(cfg, "block_q", 128, lambda x: _is_int(x) and x >= 1,
                           "a positive integer")
    u = alpha_init - 1.0
    logit = math.log(u / (1.0 - u))  # sigmoid(logit) = alpha_init - 1
    self.alpha_logit = nnx.Param(jnp.full((cfg.num_heads,), logit, cfg.param_dtype),
                                 logical_axes=("heads",))

  def alpha(self) -> jax.Array:
    a = 1.0 + jax.nn.sigmoid(self.alpha_logit[...].astype(jnp.float32))
    return a if self.learn_alpha else jax.lax.stop_gradient(a)

  def core(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask,
           positions: jax.Array) -> jax.Array:
    q, k = self.positional(q, k, positions, positions)
    return entmax_attention(q, k, v, self.alpha(), mask, n_iter=self.n_iter,
                            block_q=self.block_q, implementation=self.cfg.implementation)
