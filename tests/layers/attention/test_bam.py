"""`bam`: β = 1, μ = 0 is ALiBi with slope 1/α; α -> ∞ is NoPE; parameter gradients match the
dense reference; causality; a DecoderLM step whose gradients reach α, β, μ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, registry
from layers.attention.alibi import alibi_bias, alibi_slopes
from layers.attention.bam import bam_bias
from tests.layers.attention.test_alibi import dense_attention, lm_train_step
from tests.numerics import rel_err


def layer(positional="bam", implementation="xla", **options):
  cfg = AttentionConfig(d_model=32, num_heads=4, head_dim=8, positional=positional,
                        implementation=implementation, options=options)
  return registry.get("mha")(cfg, rngs=nnx.Rngs(0))


def test_beta_one_mu_zero_is_alibi_with_slope_one_over_alpha():
  pos = jnp.arange(11)[None]
  alpha = jnp.array([0.5, 2.0, 7.0, 30.0])
  got = bam_bias(pos, pos, alpha, jnp.ones(4), jnp.zeros(4))
  assert rel_err(got, alibi_bias(pos, pos, 1.0 / alpha)) < 1e-6
  # The default initialisation (α = 1 / ALiBi slopes, β = 1, μ = 0) is the `alibi` layer.
  x = jax.random.normal(jax.random.key(0), (2, 9, 32))
  f = nnx.jit(lambda m, x: m(x))
  assert rel_err(f(layer(), x), f(layer("alibi"), x)) < 1e-5
  np.testing.assert_allclose(layer().positional.prior()[0], 1 / alibi_slopes(4), rtol=1e-6)


def test_alpha_to_infinity_is_nope():
  x = jax.random.normal(jax.random.key(1), (2, 9, 32))
  f = nnx.jit(lambda m, x: m(x))
  assert rel_err(f(layer(bam_alpha_init=1e30, bam_beta_init=1.7, bam_mu_init=0.4), x),
                 f(layer("nope"), x)) < 1e-6


@pytest.mark.parametrize("implementation", ["xla", "pallas_interpret", "pallas_tpu_interpret"])
def test_gradients_reach_alpha_beta_mu_and_match_reference(implementation):
  """XLA renders the prior dense; the Pallas kernels evaluate it per tile (distance_bias)."""
  lay = layer(implementation=implementation, bam_alpha_init=3.0, bam_beta_init=1.5,
              bam_mu_init=0.3)
  x = jax.random.normal(jax.random.key(2), (2, 10, 32))
  w = jax.random.normal(jax.random.key(3), (2, 10, 4, 8))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  mask = lay.resolve_mask(x, None, None)[0]

  def fast(m):  # the layer's own path: flash_attention(distance_bias=...)
    q, k, v = m.qkv(x)
    return jnp.sum(m.core(x, q, k, v, mask, pos) * w)

  q, k, v = lay.qkv(x)

  def reference(log_alpha, log_beta, mu):  # autodiff through the explicit dense formula
    a, b = jnp.exp(log_alpha), jnp.exp(log_beta)
    d = (pos[:, None, :, None] - pos[:, None, None, :]).astype(jnp.float32)
    per = lambda p: p[None, :, None, None]
    bias = -jnp.power(jnp.abs(d - per(mu)) / per(a), per(b))
    return jnp.sum(dense_attention(q, k, v, bias) * w)

  enc = lay.positional
  g_fast = nnx.jit(nnx.grad(fast))(lay)["positional"]
  g_ref = jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(
      enc.log_alpha[...], enc.log_beta[...], enc.mu[...])
  for name, gr in zip(("log_alpha", "log_beta", "mu"), g_ref):
    gf = g_fast[name][...]
    assert float(jnp.abs(gr).min()) > 0, name
    assert rel_err(gf, gr) < 1e-4, name


def test_no_nan_gradient_where_delta_equals_mu():
  pos = jnp.arange(6)[None]
  for beta in (0.5, 1.0, 2.0):
    g = jax.grad(lambda a, b, m: bam_bias(pos, pos, a, b, m).sum(), argnums=(0, 1, 2))(
        jnp.full(2, 2.0), jnp.full(2, beta), jnp.zeros(2))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in g)


def test_causal():
  lay = layer(bam_beta_init=2.0, bam_mu_init=-1.0)
  x = jax.random.normal(jax.random.key(4), (1, 12, 32))
  x2 = x.at[:, 7:].set(0.0)
  f = nnx.jit(lambda m, x: m(x))
  a, b = f(lay, x), f(lay, x2)
  assert rel_err(a[:, :7], b[:, :7]) < 1e-6 and float(jnp.abs(a[:, 7:] - b[:, 7:]).max()) > 1e-3


@pytest.mark.parametrize("options,match", [
    (dict(bam_alpha_init=0.0), "bam_alpha_init"), (dict(bam_alpha_init="x"), "bam_alpha_init"),
    (dict(bam_beta_init=-1.0), "bam_beta_init")])
def test_bad_settings_name_them(options, match):
  with pytest.raises(ValueError, match=match):
    layer(**options)


def test_decoder_lm_step_reaches_the_prior():
  model, grads = lm_train_step("bam")
  for l in range(2):
    g = grads["blocks"][l]["attention"]["positional"]
    for name in ("log_alpha", "log_beta", "mu"):
      assert float(jnp.abs(g[name][...]).max()) > 0, (l, name)
