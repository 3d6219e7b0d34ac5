"""The `mha` layer: head layouts are one layer, masked keys have no influence, causality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, Mask, registry
from layers.attention.mha import mha, mha_probs
from tests.numerics import rel_err


def _qkv(hq, hkv, t=12, d=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (2, t, hq, d)), jax.random.normal(ks[1], (2, t, hkv, d)),
          jax.random.normal(ks[2], (2, t, hkv, d)))


@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_gqa_equals_mha_with_repeated_kv(hkv):
  q, k, v = _qkv(4, hkv)
  rep = 4 // hkv
  got = mha(q, k, v, Mask.make_causal())
  ref = mha(q, jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2), Mask.make_causal())
  assert rel_err(got, ref) < 1e-5


def test_masked_keys_have_no_influence_or_gradient():
  q, k, v = _qkv(2, 2)
  mask = Mask.bidirectional().with_padding(jnp.array([7, 12]))
  f = lambda k, v: jnp.sum(mha(q, k, v, mask) ** 2)
  gk, gv = jax.grad(f, argnums=(0, 1))(k, v)
  assert float(jnp.abs(gk[0, 7:]).max()) == 0.0 and float(jnp.abs(gv[0, 7:]).max()) == 0.0
  k2 = k.at[0, 7:].set(100.0)
  assert rel_err(mha(q, k2, v, mask), mha(q, k, v, mask)) == 0.0


def test_probs_rows_sum_to_one_and_respect_mask():
  q, k, v = _qkv(2, 1)
  p = mha_probs(q, k, v, Mask.make_causal())
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
  assert float(jnp.triu(p[0, 0], 1).max()) == 0.0


def _layer(**kw):
  cfg = AttentionConfig(d_model=32, num_heads=4, **kw)
  return registry.get("mha")(cfg, rngs=nnx.Rngs(0)), cfg


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_layer_is_causal(kv_heads):
  layer, _ = _layer(num_kv_heads=kv_heads)
  x = jax.random.normal(jax.random.key(1), (1, 10, 32))
  y = layer(x)
  x2 = x.at[:, 6:].set(jax.random.normal(jax.random.key(2), (1, 4, 32)))
  y2 = layer(x2)
  np.testing.assert_allclose(y[:, :6], y2[:, :6], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(y[:, 6:] - y2[:, 6:]).max()) > 1e-3


def test_layer_xla_matches_reference_with_grads():
  layer, cfg = _layer(num_kv_heads=2)
  ref_layer = registry.get("mha")(
      AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, implementation="reference"),
      rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 9, 32))
  loss = lambda m: jnp.sum(jnp.sin(m(x)))
  g = nnx.grad(loss)(layer)
  g_ref = nnx.grad(loss)(ref_layer)
  assert rel_err(layer(x), ref_layer(x)) < 1e-5
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert rel_err(a, b) < 1e-4


def test_sqa_style_layout_is_the_same_layer():
  # Fewer query heads than d_model / head_dim: one layer, FLOPs follow num_heads.
  layer, cfg = _layer(num_kv_heads=1, head_dim=4)
  assert layer(jnp.ones((1, 5, 32))).shape == (1, 5, 32)
  assert layer.qkv.q.kernel.shape == (32, 4, 4)


@pytest.mark.parametrize("kw,match", [
    (dict(num_heads=6, num_kv_heads=4, head_dim=8), "num_heads=6 is not a multiple of num_kv_heads=4"),
    (dict(num_heads=5), "d_model=32 is not divisible by num_heads=5"),
    (dict(num_heads=4, implementation="magic"), "implementation='magic'"),
])
def test_bad_head_layout_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    AttentionConfig(d_model=32, **kw)
