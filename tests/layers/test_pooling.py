"""Pooling-head registry and shared pieces: lookup, option errors, masks, masked mean/softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import pooling
from layers.attention.attentive_probe import AttentiveProbe
from layers.attention.lowrank_pool import LowRankPool


def test_registered_ids():
  assert pooling.names() == ["attentive_probe", "lowrank_pool", "mean"]
  assert pooling.get("attentive_probe") is AttentiveProbe
  assert pooling.get("lowrank_pool") is LowRankPool
  assert AttentiveProbe.pooling_id == "attentive_probe"


def test_unknown_head_and_option_name_the_setting():
  with pytest.raises(ValueError,
                     match=r"unknown pooling head 'gap'.*model.pooling.*attentive_probe"):
    pooling.get("gap")
  with pytest.raises(ValueError, match=r"model.pooling_options.rank is not an option of pooling "
                                       r"'attentive_probe'.*num_queries"):
    pooling.make_pooling("attentive_probe", 16, rngs=nnx.Rngs(0), rank=2)


def test_make_pooling_builds_with_options():
  head = pooling.make_pooling("lowrank_pool", 16, num_classes=3, rngs=nnx.Rngs(0), num_heads=2,
                              rank=3)
  assert isinstance(head, LowRankPool) and head.rank == 3 and head.out_dim == 32
  x = jnp.ones((2, 5, 16))
  assert head(x).shape == (2, 3) and head.pool(x).shape == (2, 32)


def test_masked_mean_and_softmax():
  x = jax.random.normal(jax.random.key(0), (3, 6, 4))
  lengths = jnp.array([6, 2, 0])
  got = pooling.masked_mean(x, lengths=lengths)
  np.testing.assert_allclose(got[0], x[0].mean(0), rtol=1e-6)
  np.testing.assert_allclose(got[1], x[1, :2].mean(0), rtol=1e-6)
  assert float(jnp.abs(got[2]).max()) == 0.0  # no real token: zeros, not NaN
  mask = jnp.array([[1, 0, 1, 0, 1, 0]] * 3, bool)
  both = pooling.masked_mean(x, mask=mask, lengths=jnp.array([6, 3, 6]))
  np.testing.assert_allclose(both[1], x[1, jnp.array([0, 2])].mean(0), rtol=1e-6)
  p = pooling.masked_softmax(jnp.zeros((2, 4)), jnp.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool))
  np.testing.assert_allclose(p, [[0.5, 0.5, 0, 0], [0, 0, 0, 0]])


def test_mean_head():
  head = pooling.make_pooling("mean", 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 4))
  np.testing.assert_allclose(head(x, lengths=jnp.array([5, 1])),
                             jnp.stack([x[0].mean(0), x[1, 0]]), rtol=1e-6)
  assert pooling.num_params(head) == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask=jnp.ones((2, 4), bool)), r"mask must be \[batch, tokens\] = \(2, 5\)"),
    (dict(mask=jnp.ones((2, 5), jnp.int32)), r"mask must be boolean"),
    (dict(lengths=jnp.ones((3,), jnp.int32)), r"lengths must be \[batch\] = \(2,\)"),
    (dict(lengths=jnp.ones((2,), jnp.float32)), r"lengths must be integers"),
])
def test_bad_masks_are_named(kwargs, match):
  head = pooling.make_pooling("mean", 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=match):
    head(jnp.ones((2, 5, 4)), **kwargs)


def test_bad_token_shapes_are_named():
  head = pooling.make_pooling("mean", 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\[batch, tokens, d_model\]"):
    head(jnp.ones((5, 4)))
  with pytest.raises(ValueError, match=r"width 3, the head was built for d_model=4"):
    head(jnp.ones((2, 5, 3)))
