"""Giraffe's truncated basis (rope_scaling_type="truncated"): the band rule against an explicit
one; a cutoff keeping every frequency is plain RoPE; the zero band is not rotated (its scores do
not depend on position); shift invariance; linear scaling first; options and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, registry
from layers.attention.rope import apply_rope, rope_frequencies
from tests.numerics import rel_err

D = 16  # wavelengths 2 pi / theta_i at base 1e4: 6.3, 19.9, 62.8, 199, 628, 1987, 6283, 19869
L = 64  # cutoff: b = 2 pi / 64, a = b / 8, rho = b / 16


def _explicit(theta, cutoff, zero_ratio=8.0, rho_ratio=16.0):
  b = 2 * math.pi / cutoff
  a, rho = b / zero_ratio, b / rho_ratio
  return np.array([t if t >= b else (rho if t > a else 0.0) for t in theta])


def _x(seed, shape=(1, 1, 1, D)):
  return jax.random.normal(jax.random.key(seed), shape)


def test_bands_follow_the_rule():
  plain, _ = rope_frequencies(D)
  got, factor = rope_frequencies(D, scaling_type="truncated", original_max_len=L)
  np.testing.assert_allclose(got, _explicit(plain.astype(np.float64), L), rtol=1e-6)
  assert factor == 1.0
  b = 2 * math.pi / L
  np.testing.assert_array_equal(got[:3], plain[:3])  # wavelengths <= 64: kept
  np.testing.assert_allclose(got[3], b / 16, rtol=1e-6)  # 199 in (64, 512): rho
  np.testing.assert_array_equal(got[4:], 0.0)  # wavelengths >= 512: zero
  # the options move the cutoffs: a = b / 2 puts theta_3 in the zero band, rho = b / 4
  got2, _ = rope_frequencies(D, scaling_type="truncated", original_max_len=L,
                             truncate_zero_ratio=2.0, truncate_rho_ratio=4.0)
  np.testing.assert_allclose(got2, _explicit(plain.astype(np.float64), L, 2.0, 4.0), rtol=1e-6)
  assert got2[3] == 0.0
  got3, _ = rope_frequencies(D, scaling_type="truncated", original_max_len=L,
                             truncate_zero_ratio=100.0, truncate_rho_ratio=4.0)
  np.testing.assert_allclose(got3[3:6], b / 4, rtol=1e-6)  # a = b / 100: 199, 628, 1987 -> rho


def test_cutoff_keeping_every_frequency_is_plain_rope():
  plain, _ = rope_frequencies(D)
  long_cut = 10 ** 6  # b = 2 pi / 1e6 below the slowest frequency (wavelength 19869)
  got, _ = rope_frequencies(D, scaling_type="truncated", original_max_len=long_cut)
  np.testing.assert_array_equal(got, plain)
  x, pos = _x(0, (2, 5, 3, D)), jnp.array([[0, 3, 77, 1000, 65535], [1, 2, 3, 4, 5]])
  np.testing.assert_array_equal(
      apply_rope(x, pos, scaling_type="truncated", original_max_len=long_cut), apply_rope(x, pos))
  # with linear scaling s, truncation applies to theta / s (the authors' order)
  got_s, _ = rope_frequencies(D, scaling=4.0, scaling_type="truncated", original_max_len=L)
  lin, _ = rope_frequencies(D, scaling=4.0)
  np.testing.assert_allclose(got_s, _explicit(lin.astype(np.float64), L), rtol=1e-6)


def test_zero_band_is_not_rotated_and_scores_are_shift_invariant():
  kw = dict(scaling_type="truncated", original_max_len=L)
  low = np.r_[4:8, 12:16]  # channel pairs (i, i + D/2) of the zero band i = 4..7
  q, k = _x(1), _x(2)
  positions = [0, 5, 63, 1000, 123_456]
  for p in positions:
    np.testing.assert_array_equal(apply_rope(q, jnp.array([[p]]), **kw)[..., low], q[..., low])

  def score(pq, pk, dims=slice(None)):
    rq, rk = apply_rope(q, jnp.array([[pq]]), **kw), apply_rope(k, jnp.array([[pk]]), **kw)
    return float(jnp.sum(rq[..., dims] * rk[..., dims]))

  zero_band = float(jnp.sum(q[..., low] * k[..., low]))
  for pq, pk in [(0, 0), (5, 2), (2, 5), (70_000, 3), (3, 70_000)]:
    assert score(pq, pk, low) == zero_band  # no position dependence at all
  # the whole score depends on i - j only; the rotated bands do depend on it
  for shift in (1, 37, 100):  # float32 angles: small positions keep the test exact to ~1e-5
    np.testing.assert_allclose(score(5 + shift, 2 + shift), score(5, 2), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(score(2 + shift, 9 + shift), score(2, 9), rtol=1e-4, atol=1e-4)
  assert abs(score(5, 2) - score(9, 2)) > 1e-3


def test_layer_reads_the_options_and_names_bad_settings():
  x = jax.random.normal(jax.random.key(3), (1, 6, 32))

  def layer(**opts):
    cfg = AttentionConfig(d_model=32, num_heads=2, head_dim=D, implementation="xla",
                          rope_scaling_type="truncated", rope_original_max_len=L,
                          options=opts)
    return registry.get("mha")(cfg, rngs=nnx.Rngs(0))

  default, moved = layer(), layer(rope_truncate_zero_ratio=100.0, rope_truncate_rho_ratio=4.0)
  assert default.positional.kwargs["truncate_zero_ratio"] == 8.0
  assert moved.positional.kwargs["truncate_rho_ratio"] == 4.0
  ya, yb = nnx.jit(lambda m, x: m(x))(default, x), nnx.jit(lambda m, x: m(x))(moved, x)
  assert np.all(np.isfinite(ya)) and rel_err(ya, yb) > 1e-6  # same weights, other bands
  with pytest.raises(ValueError, match="rope_original_max_len"):
    AttentionConfig(d_model=32, num_heads=2, rope_scaling_type="truncated")
  with pytest.raises(ValueError, match="model.attention_options.rope_truncate_zero_ratio"):
    layer(rope_truncate_zero_ratio=0.5)
  with pytest.raises(ValueError, match="model.attention_options.rope_truncate_rho_ratio"):
    layer(rope_truncate_rho_ratio="big")
