"""`moh`: all heads with unit gates is `mha`; unselected heads give exactly 0; aux loss; grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, Mask, registry
from layers.attention.mha import mha
from layers.attention.moh import MixtureOfHeadAttention, moh, moh_reference
from tests.family_checks import assert_causal, assert_lm_trains_one_step
from tests.numerics import rel_err


@nnx.jit
def _call(m, x):
  return m(x)


def _qkv(hq=4, hkv=2, t=10, d=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (2, t, hq, d)), jax.random.normal(ks[1], (2, t, hkv, d)),
          jax.random.normal(ks[2], (2, t, hkv, d)),
          jax.random.uniform(ks[3], (2, t, hq), minval=0.0, maxval=2.0))


_moh, _mha, _moh_ref = jax.jit(moh), jax.jit(mha), jax.jit(moh_reference)


def test_unit_gates_are_mha():
  q, k, v, _ = _qkv()
  mask = Mask.make_causal()
  assert rel_err(_moh(q, k, v, jnp.ones(q.shape[:3]), mask), _mha(q, k, v, mask)) == 0.0


def test_unselected_head_contributes_zero_and_gets_no_gradient():
  q, k, v, gates = _qkv()
  gates = gates.at[:, 3:7, 1].set(0.0)  # head 1 unselected for tokens 3..6
  mask = Mask.make_causal()
  out = _moh(q, k, v, gates, mask)
  assert float(jnp.abs(out[:, 3:7, 1]).max()) == 0.0
  q2 = q.at[:, 3:7, 1].set(50.0)  # the unselected head's queries have no influence
  assert rel_err(_moh(q2, k, v, gates, mask), out) == 0.0
  gq = jax.grad(lambda q: jnp.sum(jnp.sin(_moh(q, k, v, gates, mask))))(q)
  assert float(jnp.abs(gq[:, 3:7, 1]).max()) == 0.0
  assert float(jnp.abs(gq[:, 3:7, 0]).max()) > 0.0


def test_fast_vs_reference_outputs_and_grads():
  q, k, v, gates = _qkv(seed=1)
  mask = Mask.sliding_window(4)
  assert rel_err(_moh(q, k, v, gates, mask), _moh_ref(q, k, v, gates, mask)) < 1e-5
  f = lambda fn: (lambda *a: jnp.sum(jnp.sin(fn(*a, mask))))
  g = jax.grad(f(_moh), argnums=(0, 1, 2, 3))(q, k, v, gates)
  g_ref = jax.grad(f(_moh_ref), argnums=(0, 1, 2, 3))(q, k, v, gates)
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5


def _cfg(impl="auto", **options):
  return AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, implementation=impl,
                         options=options)


def _mha_twin(layer):
  ref = registry.get("mha")(layer.cfg, rngs=nnx.Rngs(0))
  ref.qkv, ref.out = layer.qkv, layer.out
  return ref


@pytest.mark.parametrize("options", [dict(num_shared_heads=0, top_k=4),
                                     dict(num_shared_heads=4, top_k=0),
                                     dict(num_shared_heads=2, top_k=2)])
def test_all_heads_selected_with_uniform_router_is_mha(options):
  layer = MixtureOfHeadAttention(_cfg(router_init_scale=0.0, **options), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 9, 32))
  gates, _, _ = layer.gates(x)
  np.testing.assert_allclose(gates, 1.0, rtol=1e-6)
  assert rel_err(_call(layer, x), _call(_mha_twin(layer), x)) < 1e-6


def test_from_mha_continue_tuning():
  base = registry.get("mha")(_cfg(), rngs=nnx.Rngs(5))
  x = jax.random.normal(jax.random.key(2), (2, 9, 32))
  full = MixtureOfHeadAttention.from_mha(base, _cfg(num_shared_heads=1, top_k=3), rngs=nnx.Rngs(1))
  assert rel_err(_call(full, x), _call(base, x)) < 1e-6
  sparse = MixtureOfHeadAttention.from_mha(base, _cfg(num_shared_heads=2, top_k=1),
                                           rngs=nnx.Rngs(1))
  gates, _, sel = sparse.gates(x)
  assert np.all(np.asarray((gates > 0).sum(-1)) == 3)  # 2 shared + top-1 of 2 routed
  assert np.all(np.asarray(sel.sum(-1)) == 1)
  y = _call(sparse, x)
  assert np.all(np.isfinite(y)) and rel_err(y, _call(base, x)) > 1e-3
  with pytest.raises(ValueError, match="num_heads"):
    MixtureOfHeadAttention.from_mha(base, AttentionConfig(d_model=32, num_heads=8),
                                    rngs=nnx.Rngs(1))


def test_aux_loss_is_sown_finite_and_minimal_for_uniform_router():
  x = jax.random.normal(jax.random.key(3), (2, 16, 32))
  uniform = MixtureOfHeadAttention(_cfg(num_shared_heads=1, top_k=1, router_init_scale=0.0),
                                   rngs=nnx.Rngs(0))
  uniform(x)
  aux_u = nnx.pop(uniform, nnx.Intermediate)["aux_loss"][0]
  assert np.isfinite(float(aux_u)) and abs(float(aux_u) - 1.0) < 1e-6  # = top_k
  skewed = MixtureOfHeadAttention(_cfg(num_shared_heads=1, top_k=1, router_init_scale=0.0),
                                  rngs=nnx.Rngs(0))
  # Every token prefers routed head 0 (its logit is sum |x| > 0, the others 0).
  kern = skewed.router_routed.kernel
  kern[...] = jnp.zeros_like(kern[...]).at[:, 0].set(1.0)
  x_pos = jnp.abs(x)
  skewed(x_pos)
  aux_s = nnx.pop(skewed, nnx.Intermediate)["aux_loss"][0]
  assert float(aux_s) > float(aux_u) + 0.5


def test_layer_fast_vs_reference_outputs_and_grads():
  layer = MixtureOfHeadAttention(_cfg(num_shared_heads=1, top_k=2), rngs=nnx.Rngs(0))
  ref = MixtureOfHeadAttention(_cfg("reference", num_shared_heads=1, top_k=2), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(4), (2, 9, 32))
  assert rel_err(_call(layer, x), _call(ref, x)) < 1e-5
  loss = lambda m: jnp.sum(jnp.sin(m(x)))
  g, g_ref = nnx.jit(nnx.grad(loss))(layer), nnx.jit(nnx.grad(loss))(ref)
  leaves = jax.tree.leaves(g)
  for a, b in zip(leaves, jax.tree.leaves(g_ref)):
    assert rel_err(a, b) < 1e-5
  assert float(jnp.abs(g.router_routed.kernel[...]).max()) > 0.0  # routers learn via the gates


def test_layer_is_causal():
  layer = MixtureOfHeadAttention(_cfg(), rngs=nnx.Rngs(0))
  assert_causal(layer, call=_call)


@pytest.mark.parametrize("options,match", [
    (dict(num_shared_heads=5), "model.attention_options.num_shared_heads"),
    (dict(num_shared_heads=1, top_k=4), "model.attention_options.top_k"),
    (dict(num_shared_heads=4, top_k=1), "model.attention_options.top_k"),
    (dict(top_k=1.5), "model.attention_options.top_k"),
])
def test_bad_options_error(options, match):
  with pytest.raises(ValueError, match=match):
    MixtureOfHeadAttention(_cfg(**options), rngs=nnx.Rngs(0))


def test_decoder_lm_runs_and_trains():
  assert_lm_trains_one_step("moh", (), num_layers=2, vocab=31)
