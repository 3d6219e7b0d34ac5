"""`gaussian_adaptive`: the gate is the stated Gaussian; xi -> inf gives the identity (the layer
is `mha`); vectorised == per-head reference (outputs, grads); causality; IF; LM step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, registry
from layers.attention.gaussian_adaptive import (GaussianAdaptiveAttention, gaussian_adaptive,
                                                gaussian_adaptive_reference, gaussian_gate,
                                                importance_factor)
from layers.attention.mha import MultiHeadAttention
from tests.family_checks import (assert_causal, assert_lm_trains_one_step,
                                 assert_matches_reference)
from tests.numerics import rel_err


@nnx.jit
def _call(m, x):
  return m(x)


def _args(seed=0, shape=(2, 5, 12), heads=3):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], shape), 0.5 * jax.random.normal(ks[1], (heads,)),
          jax.random.uniform(ks[2], (heads,), minval=0.5, maxval=2.0))


def test_gate_is_the_stated_gaussian():
  x, mu, c = _args()
  g = np.asarray(gaussian_gate(x, mu, c))
  xn = np.asarray(x, np.float64).reshape(2, 5, 3, 4)
  mean, var = xn.mean(-1, keepdims=True), xn.var(-1, ddof=1, keepdims=True) + 1e-5
  want = np.exp(-(xn - (mean + np.asarray(mu)[:, None])) ** 2
                / (2 * np.asarray(c)[:, None] ** 2 * var))
  assert rel_err(g, want.reshape(g.shape)) < 1e-5
  assert float(g.max()) <= 1.0 and float(g.min()) > 0


@pytest.mark.parametrize("normalize", [False, True])
def test_vectorised_equals_per_head_reference_with_grads(normalize):
  x, mu, c = _args(seed=1)
  f = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(3 * fn(*a, normalize=normalize))),
                                  (0, 1, 2)))
  out = gaussian_adaptive(x, mu, c, normalize=normalize)
  out_ref, gate = gaussian_adaptive_reference(x, mu, c, normalize=normalize, return_gate=True)
  assert rel_err(out, out_ref) < 1e-6
  for a, b in zip(f(gaussian_adaptive)(x, mu, c), f(gaussian_adaptive_reference)(x, mu, c)):
    assert rel_err(a, b) < 1e-5
  if normalize:  # the authors' code: weights of a head sum to one
    np.testing.assert_allclose(gate.reshape(2, 5, 3, 4).sum(-1), 1.0, rtol=1e-6)


def test_infinite_variance_scale_is_identity():
  x, mu, _ = _args(seed=2)
  big = jnp.full((3,), 1e5)
  assert rel_err(gaussian_adaptive(x, mu, big), x) < 1e-7
  # normalised weights become uniform, 1 / (features per head)
  assert rel_err(gaussian_gate(x, mu, big, normalize=True), jnp.full(x.shape, 0.25)) < 1e-6


def _cfg(impl="auto", **options):
  return AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, implementation=impl,
                         options=options)


@pytest.mark.parametrize("placement", ["output", "input"])
def test_huge_variance_scale_layer_is_mha_with_same_weights(placement):
  layer = GaussianAdaptiveAttention(_cfg(placement=placement, initial_c=1e5), rngs=nnx.Rngs(0))
  ref = MultiHeadAttention(_cfg(), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  assert rel_err(_call(layer, x), _call(ref, x)) < 1e-6
  fresh = GaussianAdaptiveAttention(_cfg(placement=placement), rngs=nnx.Rngs(0))
  assert rel_err(_call(fresh, x), _call(ref, x)) > 1e-2  # c = 2 does reweight


@pytest.mark.parametrize("options", [dict(placement="output"),
                                     dict(placement="input", gaussian_heads=2, normalize=True)])
def test_layer_fast_vs_reference_with_grads_and_causal(options):
  layer = GaussianAdaptiveAttention(_cfg(**options), rngs=nnx.Rngs(0))
  ref = GaussianAdaptiveAttention(_cfg("reference", **options), rngs=nnx.Rngs(0))
  for m in (layer, ref):
    m.mean_offset[...] = jnp.linspace(-0.5, 0.5, m.mean_offset.shape[0])
  x = jax.random.normal(jax.random.key(3), (2, 9, 32))
  g, _ = assert_matches_reference(layer, ref, x, call=_call)
  assert float(jnp.abs(g.mean_offset[...]).min()) > 0 and float(jnp.abs(g.c[...]).min()) > 0
  assert_causal(layer, call=_call)


def test_gates_importance_factor_and_errors():
  layer = GaussianAdaptiveAttention(_cfg(), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(4), (2, 6, 32))
  gates = nnx.jit(lambda m, x: m.gates(x))(layer, x)
  assert gates.shape == (2, 6, 4, 8) and float(gates.max()) <= 1.0
  imp = importance_factor(gates.reshape(2, 6, 32))
  assert imp.shape == (32,) and float(imp.min()) == 0.0 and float(imp.max()) == 1.0
  for name, bad in [("placement", "middle"), ("initial_c", 0), ("normalize", 1),
                    ("gaussian_heads", 5), ("eps", -1.0)]:
    opts = dict(placement="input") if name == "gaussian_heads" else {}
    with pytest.raises(ValueError, match=f"model.attention_options.{name}"):
      GaussianAdaptiveAttention(_cfg(**opts, **{name: bad}), rngs=nnx.Rngs(0))


def test_registered_and_decoder_lm_trains_one_step():
  assert registry.get("gaussian_adaptive") is GaussianAdaptiveAttention
  assert_lm_trains_one_step("gaussian_adaptive", (), num_layers=1, vocab=50)
