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


from layers.attention.rope import rope_frequencies  # noqa: E402
import pytest  # noqa: E402


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn", "llama3"])
def test_scaling_one_is_unscaled(kind):
  base, _ = rope_frequencies(64)
  got, factor = rope_frequencies(64, scaling=1.0, scaling_type=kind, original_max_len=512)
  np.testing.assert_array_equal(got, base)
  assert factor == 1.0


@pytest.mark.parametrize("kind", ["ntk", "yarn", "llama3"])
def test_extension_keeps_high_and_interpolates_low_frequencies(kind):
  base, _ = rope_frequencies(128, 10_000.0)
  got, factor = rope_frequencies(128, 10_000.0, scaling=8.0, scaling_type=kind,
                                 original_max_len=4096)
  np.testing.assert_allclose(got[0], base[0], rtol=1e-6)  # fastest rotation untouched
  np.testing.assert_allclose(got[-1], base[-1] / 8.0, rtol=1e-5)  # slowest: interpolated by s
  ratio = got / base
  assert np.all(np.diff(ratio) <= 1e-6) and ratio.min() >= 1 / 8 - 1e-6  # monotone in between
  assert factor == (0.1 * np.log(8.0) + 1.0 if kind == "yarn" else 1.0)


def test_yarn_attention_factor_scales_logits_by_its_square():
  q, k = _qk(3)
  f = 0.1 * np.log(4.0) + 1.0
  kw = dict(scaling=4.0, scaling_type="yarn", original_max_len=64)
  s = float(jnp.sum(apply_rope(q, jnp.array([[0]]), **kw) * apply_rope(k, jnp.array([[0]]), **kw)))
  np.testing.assert_allclose(s, f * f * float(jnp.sum(q * k)), rtol=1e-5)


def test_scaling_errors_name_the_setting():
  with pytest.raises(ValueError, match="rope_original_max_len"):
    rope_frequencies(64, scaling=2.0, scaling_type="yarn")
  with pytest.raises(ValueError, match="rope_scaling_type='cubic'"):
    rope_frequencies(64, scaling=2.0, scaling_type="cubic")
