"""`entmax`: alpha -> 1 ~ softmax; alpha = 2 == sparsemax; exact zeros; closed-form grads;
chunked path == dense reference (outputs and grads); causality; a DecoderLM step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, Mask, registry
from layers.attention.entmax import (EntmaxAttention, entmax_attention,
                                     entmax_attention_reference, entmax_bisect,
                                     entmax_implicit_reference)
from tests.family_checks import assert_causal, assert_lm_trains_one_step, random_qkv
from tests.numerics import rel_err

_ent = jax.jit(entmax_bisect)
_ent_impl = jax.jit(entmax_implicit_reference)
_att = jax.jit(entmax_attention, static_argnames=("block_q",))
_att_ref = jax.jit(entmax_attention_reference)


@nnx.jit
def _call(m, x):
  return m(x)


def _sparsemax(z):
  """Sort-based sparsemax (Martins & Astudillo 2016), the direct formula."""
  zs = jnp.sort(z, axis=-1)[..., ::-1]
  ks = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
  cs = jnp.cumsum(zs, axis=-1)
  support = 1 + ks * zs > cs
  kz = jnp.sum(support, axis=-1, keepdims=True)
  tau = (jnp.take_along_axis(cs, kz - 1, axis=-1) - 1) / kz
  return jnp.maximum(z - tau, 0)


def _scores(shape=(6, 16), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def test_alpha_near_one_is_softmax():
  # For alpha = 1 + e, [1 + e(z - c)]^(1/e) = exp(z - c) * exp(-e (z - c)^2 / 2 + O(e^2)), so
  # the probabilities differ from softmax by a relative O(e R^2 / 2), R = score range
  # (~5 for 16 standard normals): about 1e-2 relative for e = 1e-3, i.e. < 2e-3 absolute
  # on probabilities <= ~0.3. The error must also shrink ~linearly with e.
  z = _scores()
  sm = jax.nn.softmax(z, axis=-1)
  err3 = float(jnp.abs(_ent(z, jnp.float32(1.001)) - sm).max())
  err2 = float(jnp.abs(_ent(z, jnp.float32(1.01)) - sm).max())
  assert err3 < 2e-3
  assert err3 < err2 / 5


def test_alpha_two_is_sparsemax_with_exact_zeros():
  z = 2.0 * _scores(seed=1)
  p = _ent(z, jnp.float32(2.0))
  np.testing.assert_allclose(p, _sparsemax(z), atol=2e-6)
  assert int(jnp.sum(p == 0)) > 0
  # gradients of the closed form == autodiff of the sort-based sparsemax
  w = _scores(seed=2)
  g = jax.grad(lambda z: jnp.sum(w * entmax_bisect(z, jnp.float32(2.0))))(z)
  g_ref = jax.grad(lambda z: jnp.sum(w * _sparsemax(z)))(z)
  assert rel_err(g, g_ref) < 1e-5


@pytest.mark.parametrize("alpha", [1.2, 1.5, 1.8])
def test_rows_sum_to_one_exact_zeros_and_masked_keys(alpha):
  z = 3.0 * _scores(seed=3)
  z = z.at[:, :4].set(-jnp.inf)  # masked keys
  p = _ent(z, jnp.float32(alpha))
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
  assert bool(jnp.all(p[:, :4] == 0))
  assert int(jnp.sum(p[:, 4:] == 0)) > 0  # exact zeros among visible keys
  # p_j = [(alpha-1) z_j - tau]_+^(1/(alpha-1)) with one tau per row
  on = p > 0
  base = jnp.where(on, p, 1.0) ** (alpha - 1) - (alpha - 1) * jnp.where(on, z, 0.0)
  tau = -base
  tau_row = jnp.sum(jnp.where(on, tau, 0), -1) / jnp.sum(on, -1)
  assert float(jnp.max(jnp.abs(jnp.where(on, tau - tau_row[:, None], 0)))) < 1e-5


def test_closed_form_grads_match_implicit_autodiff_and_finite_differences():
  z = 2.0 * _scores((4, 12), seed=4)
  z = z.at[0, :3].set(-jnp.inf)
  alpha = jnp.array([1.2, 1.5, 1.7, 1.95])[:, None]
  w = _scores((4, 12), seed=5)
  loss = lambda fn: (lambda z, a: jnp.sum(w * fn(z, a)))
  gz, ga = jax.jit(jax.grad(loss(entmax_bisect), (0, 1)))(z, alpha)
  gz_r, ga_r = jax.jit(jax.grad(loss(entmax_implicit_reference), (0, 1)))(z, alpha)
  np.testing.assert_allclose(_ent(z, alpha), _ent_impl(z, alpha), atol=1e-6)
  assert rel_err(gz, gz_r) < 1e-4 and rel_err(ga, ga_r) < 1e-4
  assert bool(jnp.all(gz[0, :3] == 0))
  # central finite differences in float32 (step 1e-3; error O(h^2) + rounding ~1e-4)
  f = jax.jit(loss(entmax_bisect))
  zf = jnp.where(jnp.isfinite(z), z, 0.0)
  dz = jax.random.normal(jax.random.key(6), z.shape) * jnp.isfinite(z)
  h = 1e-3
  fd_z = (f(jnp.where(jnp.isfinite(z), zf + h * dz, z), alpha)
          - f(jnp.where(jnp.isfinite(z), zf - h * dz, z), alpha)) / (2 * h)
  np.testing.assert_allclose(float(jnp.sum(jnp.where(jnp.isfinite(z), gz, 0) * dz)),
                             float(fd_z), rtol=2e-2, atol=2e-3)
  for i in range(4):
    e = jnp.zeros_like(alpha).at[i].set(h)
    fd_a = (f(z, alpha + e) - f(z, alpha - e)) / (2 * h)
    np.testing.assert_allclose(float(ga[i, 0]), float(fd_a), rtol=2e-2, atol=2e-3)


_qkv = random_qkv


_ALPHA = jnp.array([1.1, 1.4, 1.7, 2.0])


_MASKS = (Mask.bidirectional(), Mask.sliding_window(4))


def test_chunked_equals_reference_forward():
  q, k, v = _qkv()

  @jax.jit
  def both(q, k, v, a):  # 13 rows in blocks of 4: the last block is padded
    return [(entmax_attention(q, k, v, a, m, block_q=4),
             entmax_attention_reference(q, k, v, a, m, return_probs=True)) for m in _MASKS]

  for m, (out, (out_ref, p)) in zip(_MASKS, both(q, k, v, _ALPHA)):
    assert rel_err(out, out_ref) < 1e-5
    assert int(jnp.sum((p == 0) & m.dense(2, 13, 13))) > 0  # sparse among visible keys
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)


def test_chunked_equals_reference_grads_and_fully_masked_rows():
  q, k, v = _qkv(seed=1)
  mask = Mask.sliding_window(5).with_padding(jnp.array([13, 0]))  # batch 1 sees no key
  loss = lambda fn: (lambda *a: jnp.sum(jnp.sin(fn(*a))))
  chunked = lambda q, k, v, a: entmax_attention(q, k, v, a, mask, block_q=4)
  ref = lambda q, k, v, a: entmax_attention_reference(q, k, v, a, mask)

  @jax.jit
  def run(q, k, v, a):
    return (chunked(q, k, v, a), ref(q, k, v, a),
            jax.grad(loss(chunked), (0, 1, 2, 3))(q, k, v, a),
            jax.grad(loss(ref), (0, 1, 2, 3))(q, k, v, a))

  out, out_ref, g, g_ref = run(q, k, v, _ALPHA)
  assert rel_err(out, out_ref) < 1e-5
  assert bool(jnp.all(out[1] == 0))
  for a, b in zip(g, g_ref):
    assert bool(jnp.all(jnp.isfinite(a)))
    assert rel_err(a, b) < 1e-4
  assert bool(jnp.all(g[0][1] == 0)) and float(jnp.abs(g[3]).max()) > 0


def _layer(impl="auto", **options):
  cfg = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, implementation=impl,
                        options={"block_q": 4, **options})
  layer = EntmaxAttention(cfg, rngs=nnx.Rngs(0))
  layer.alpha_logit[...] = jnp.array([-2.0, -0.5, 0.5, 2.0])
  return layer


def test_layer_fast_vs_reference_and_causal():
  layer, ref = _layer(), _layer("reference")
  x = 2.0 * jax.random.normal(jax.random.key(3), (2, 10, 32))
  assert rel_err(_call(layer, x), _call(ref, x)) < 1e-5
  assert_causal(layer, call=_call)


def test_fixed_alpha_has_zero_gradient_and_bad_options_error():
  layer = _layer(learn_alpha=False)
  x = jax.random.normal(jax.random.key(3), (1, 6, 32))
  g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(layer)
  assert bool(jnp.all(g.alpha_logit[...] == 0))
  for name, bad in [("alpha_init", 2.5), ("learn_alpha", "yes"), ("bisection_iters", 0),
                    ("block_q", 0)]:
    with pytest.raises(ValueError, match=f"model.attention_options.{name}"):
      _layer(**{name: bad})
  with pytest.raises(ValueError, match="no implementation='pallas' kernel"):
    _layer("pallas")
  fresh = EntmaxAttention(AttentionConfig(d_model=32, num_heads=4, options={"alpha_init": 1.25}),
                          rngs=nnx.Rngs(0))
  np.testing.assert_allclose(fresh.alpha(), 1.25, rtol=1e-6)


def test_decoder_lm_grad_step():
  assert_lm_trains_one_step("entmax", (("block_q", 8),), num_layers=2, vocab=31)
  assert registry.get("entmax") is EntmaxAttention
