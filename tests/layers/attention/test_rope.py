"""RoPE: relative-position property, scaling, and agreement of cached vs recomputed positions."""

import jax
import jax.numpy as jnp
import numpy as np

from layers.attention.rope import apply_rope


def _qk(seed=0, d=16):
  kq, kk = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kq, (1, 1, 1, d)), jax.random.normal(kk, (1, 1, 1, d))


def test_scores_depend_only_on_relative_position():
  q, k = _qk()
  def score(pq, pk):
    rq = apply_rope(q, jnp.array([[pq]]))
    rk = apply_rope(k, jnp.array([[pk]]))
    return float(jnp.sum(rq * rk))
  np.testing.assert_allclose(score(5, 2), score(105, 102), rtol=1e-4)
  np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-6)


def test_linear_scaling_divides_positions():
  q, _ = _qk(1)
  np.testing.assert_allclose(apply_rope(q, jnp.array([[8]]), scaling=4.0),
                             apply_rope(q, jnp.array([[2]])), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(apply_rope(q, jnp.array([[3]]), scaling=1.0),
                                apply_rope(q, jnp.array([[3]])))


def test_norm_preserved_and_position_zero_identity():
  q, _ = _qk(2)
  np.testing.assert_allclose(apply_rope(q, jnp.array([[0]])), q, rtol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, jnp.array([[77]]))),
                             jnp.linalg.norm(q), rtol=1e-5)
