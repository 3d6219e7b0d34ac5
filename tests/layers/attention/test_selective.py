"""`selective`: tau == 1 is `mha`; folded q/v scaling == explicit logit scaling; grads; causality."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from layers.attention import AttentionConfig, Mask, registry
from layers.attention import selective as sel_mod
from layers.attention.mha import mha
from layers.attention.selective import SelectiveAttention, selective, selective_reference
from tests.family_checks import assert_causal, assert_lm_trains_one_step
from tests.numerics import rel_err


@nnx.jit
def _call(m, x):
  return m(x)


def _qkv(hq=4, hkv=2, t=11, d=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (2, t, hq, d))
  k = jax.random.normal(ks[1], (2, t, hkv, d))
  v = jax.random.normal(ks[2], (2, t, hkv, d))
  tau = jax.random.uniform(ks[3], (2, t, hq), minval=0.3, maxval=3.0)
  vs = jax.random.uniform(ks[4], (2, t, hkv), minval=0.2, maxval=2.0)
  return q, k, v, tau, vs


_sel, _mha, _sel_ref = jax.jit(selective), jax.jit(mha), jax.jit(selective_reference)


def test_unit_temperature_is_mha():
  q, k, v, tau, vs = _qkv()
  mask = Mask.make_causal()
  got = _sel(q, k, v, jnp.ones_like(tau), jnp.ones_like(vs), mask)
  assert rel_err(got, _mha(q, k, v, mask)) < 1e-6


@pytest.mark.parametrize("mask", [Mask.make_causal(), Mask.bidirectional(),
                                  Mask.sliding_window(3)])
def test_folded_equals_explicit_logit_scaling(mask):
  q, k, v, tau, vs = _qkv()
  assert rel_err(_sel(q, k, v, tau, vs, mask), _sel_ref(q, k, v, tau, vs, mask)) < 1e-5


def test_grads_fast_vs_reference():
  q, k, v, tau, vs = _qkv(seed=1)
  mask = Mask.make_causal()
  f = lambda fn: (lambda *a: jnp.sum(jnp.sin(fn(*a, mask))))
  g = jax.grad(f(_sel), argnums=(0, 1, 2, 3, 4))(q, k, v, tau, vs)
  g_ref = jax.grad(f(_sel_ref), argnums=(0, 1, 2, 3, 4))(q, k, v, tau, vs)
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5


def _layer(impl="auto", **options):
  cfg = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, implementation=impl,
                        options=options)
  return SelectiveAttention(cfg, rngs=nnx.Rngs(0))


def _perturb(layer, seed=7):
  """Moves the temperature parameters away from their identity init."""
  ks = iter(jax.random.split(jax.random.key(seed), 8))
  for name in ("tau_w", "tau_b", "tau_c", "val_w", "val_b"):
    p = getattr(layer, name)
    if p is not None:
      p[...] = p[...] + 0.5 * jax.random.normal(next(ks), p.shape)
  return layer


def test_fresh_layer_is_mha_with_same_weights():
  layer = _layer()
  ref = registry.get("mha")(layer.cfg, rngs=nnx.Rngs(0))
  ref.qkv, ref.out = layer.qkv, layer.out
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  assert rel_err(_call(layer, x), _call(ref, x)) < 1e-6


def test_layer_fast_vs_reference_outputs_and_grads():
  layer, ref_layer = _perturb(_layer()), _perturb(_layer("reference"))
  x = jax.random.normal(jax.random.key(3), (2, 9, 32))
  assert rel_err(_call(layer, x), _call(ref_layer, x)) < 1e-5
  assert rel_err(_call(layer, x), _call(registry.get("mha")(layer.cfg, rngs=nnx.Rngs(0)), x)) > 1e-3
  loss = lambda m: jnp.sum(jnp.sin(m(x)))
  g, g_ref = nnx.jit(nnx.grad(loss))(layer), nnx.jit(nnx.grad(loss))(ref_layer)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert rel_err(a, b) < 1e-5


def test_layer_is_causal():
  layer = _perturb(_layer())
  assert_causal(layer, call=_call)


def test_options_switch_parameters_off_and_bad_option_errors():
  layer = _layer(query_temperature=False, position_temperature=False, value_temperature=False)
  assert layer.tau_w is None and layer.tau_c is None and layer.val_w is None
  with pytest.raises(ValueError, match="model.attention_options.value_temperature"):
    _layer(value_temperature="yes")


def test_decoder_lm_runs_and_trains():
  assert_lm_trains_one_step("selective", (), num_layers=2, vocab=31)
  assert sel_mod.SelectiveAttention.family_id == "selective"
