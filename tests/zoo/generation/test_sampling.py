"""Sampling functions: temperature, top-k, top-p (nucleus), greedy; pure and seeded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.generation import sampling

LOGITS = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15],
                            [0.2, 0.2, 0.2, 0.2, 0.2]]))


def kept(filtered):
  return np.asarray(jnp.isfinite(filtered))


def test_top_k_keeps_exactly_k_even_with_ties():
  for k in (1, 2, 3, 5):
    mask = kept(sampling.top_k_filter(LOGITS, k))
    np.testing.assert_array_equal(mask.sum(-1), [k, k])  # the tied row too
  np.testing.assert_array_equal(kept(sampling.top_k_filter(LOGITS, 2))[0],
                                [False, True, False, True, False])
  assert kept(sampling.top_k_filter(LOGITS, 99)).all()  # k past the vocabulary keeps all


def test_top_k_leaves_the_kept_logits_unchanged():
  f = sampling.top_k_filter(LOGITS, 3)
  np.testing.assert_array_equal(jnp.where(jnp.isfinite(f), f, 0),
                                jnp.where(jnp.isfinite(f), LOGITS, 0))


@pytest.mark.parametrize("p, want", [
    (0.4, [False, True, False, False, False]),  # 0.4 alone reaches 0.4
    (0.41, [False, True, False, True, False]),  # 0.4 + 0.3
    (0.7, [False, True, False, True, False]),
    (0.71, [False, True, False, True, True]),  # + 0.15
    (0.96, [True, True, True, True, True]),
    (0.01, [False, True, False, False, False]),  # the top token always stays
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, want):
  np.testing.assert_array_equal(kept(sampling.top_p_filter(LOGITS, p))[0], want)


def test_top_p_mass_is_at_least_p_and_minimal():
  logits = jax.random.normal(jax.random.key(0), (64, 50)) * 2
  probs = np.asarray(jax.nn.softmax(logits))
  for p in (0.3, 0.8, 0.95):
    mask = kept(sampling.top_p_filter(logits, p))
    mass = (probs * mask).sum(-1)
    assert (mass >= p - 1e-6).all()
    smallest_kept = np.where(mask, probs, np.inf).min(-1)
    assert (mass - smallest_kept < p).all()  # dropping any kept token falls below p


def test_temperature_scales_logits():
  np.testing.assert_allclose(sampling.apply_temperature(LOGITS, 0.5), LOGITS * 2, rtol=1e-6)
  hot = jax.nn.softmax(sampling.apply_temperature(LOGITS[0], 10.0))
  cold = jax.nn.softmax(sampling.apply_temperature(LOGITS[0], 0.1))
  assert float(hot.max()) < 0.25 and float(cold.max()) > 0.9


def test_greedy_is_argmax_and_ignores_the_key():
  for seed in range(3):
    np.testing.assert_array_equal(sampling.sample(jax.random.key(seed), LOGITS[:1]), [1])


def test_sampling_is_seeded_and_draws_only_kept_tokens():
  logits = jnp.tile(LOGITS[:1], (4000, 1))
  draw = lambda seed: np.asarray(sampling.sample(jax.random.key(seed), logits, temperature=1.0,
                                                 top_k=3, top_p=0.8))
  a, b = draw(0), draw(0)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, draw(1))
  counts = np.bincount(a, minlength=5) / len(a)
  # top-k=3 keeps (0.4, 0.3, 0.15), renormalised (0.47, 0.35, 0.18); top-p=0.8 over those
  # keeps the first two (0.47 + 0.35 >= 0.8), renormalised again.
  np.testing.assert_array_equal(counts[[0, 2, 4]], 0)
  np.testing.assert_allclose(counts[[1, 3]], [4 / 7, 3 / 7], atol=0.03)


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"), (dict(top_p=0.0), "top_p")])
def test_bad_settings_name_the_argument(kw, msg):
  with pytest.raises(ValueError, match=msg):
    sampling.sample(jax.random.key(0), LOGITS, **{"temperature": 1.0, **kw})
