"""`perceiver_resampler`: N outputs for any input length; permutation-invariant without position
embeddings; padding == truncation; an all-padding example is defined; the Flamingo equations with
its [x; L] key order; flash == reference twin (outputs, parameter and input gradients); errors."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from layers.attention import AttentionConfig
from layers.attention.cross_attention import cross_attention_reference
from layers.attention.perceiver_resampler import PerceiverResampler
from tests.numerics import rel_err

D, DIN, N, T = 32, 24, 3, 7
_call = nnx.jit(lambda m, x, lengths=None, mask=None: m(x, lengths=lengths, mask=mask))


def _cfg(impl="xla"):
  return AttentionConfig(d_model=D, num_heads=4, num_kv_heads=2, implementation=impl)


def _resampler(impl="xla", **kw):
  kw = dict(dict(num_latents=N, num_layers=2, mlp_dim=64, d_input=DIN), **kw)
  return PerceiverResampler(_cfg(impl), rngs=nnx.Rngs(0), **kw)


def _x(seed=0, t=T, b=2, d=DIN):
  return jax.random.normal(jax.random.key(seed), (b, t, d))


def test_output_has_n_tokens_for_any_input_length():
  r = _resampler()
  for t in (1, 4, 13):
    assert _call(r, _x(t=t)).shape == (2, N, D)
  assert r.latents.get_metadata()["logical_axes"] == ("latents", "embed")


def test_permutation_invariant_without_positions_not_with():
  x = _x(1)
  perm = jax.random.permutation(jax.random.key(2), T)
  lengths = jnp.array([T, T])
  mask = jnp.ones((2, T), bool).at[0, 2].set(False).at[1, 5].set(False)
  r = _resampler()
  y = _call(r, x, lengths, mask)
  assert rel_err(_call(r, x[:, perm], lengths, mask[:, perm]), y) < 1e-5
  with_pe = _resampler(num_positions=16)
  with_pe.position_embedding[...] = jax.random.normal(jax.random.key(3), (16, D))
  y_pe = _call(with_pe, x, lengths, mask)
  assert rel_err(_call(with_pe, x[:, perm], lengths, mask[:, perm]), y_pe) > 1e-3


def test_padding_equals_truncation_and_all_padding_is_defined():
  r = _resampler()
  x = _x(4)
  junk = 100.0 * _x(5)
  lengths = jnp.array([T, 4])
  x_pad = jnp.where(jnp.arange(T)[None, :, None] < lengths[:, None, None], x, junk)
  mask = jnp.ones((2, T), bool)
  y = _call(r, x_pad, lengths, mask)
  assert rel_err(y[1], _call(r, x[1:, :4], jnp.array([4]), jnp.ones((1, 4), bool))[0]) < 1e-5
  assert rel_err(y[0], _call(r, x, lengths, mask)[0]) == 0.0
  # A boolean mask hides the same tokens.
  y_mask = _call(r, x_pad, jnp.array([T, T]), jnp.arange(T)[None] < lengths[:, None])
  assert rel_err(y_mask, y) < 1e-6
  # No real input: the latents attend to themselves only, the same for any input.
  empty = _call(r, x_pad, jnp.array([0, 0]), mask)
  assert bool(jnp.all(jnp.isfinite(empty)))
  assert rel_err(empty[0], empty[1]) < 1e-6
  assert rel_err(_call(r, junk, jnp.array([0, 0]), mask), empty) < 1e-6


def test_matches_the_flamingo_equations():
  """Flamingo's pseudo-code, keys [x; L] (inputs first), the module's own parameters."""
  r = _resampler(num_layers=1)
  x = _x(6)
  mask = jnp.ones((2, T), bool).at[1, 3:].set(False)

  def flamingo(m, x):
    layer = m.layers[0]
    xin = m.input_proj(x)
    lat = jnp.broadcast_to(m.latents[...][None], (2, N, D))
    q_in = layer.latent_norm(lat)
    kv_in = jnp.concatenate([layer.input_norm(xin), q_in], axis=1)
    att = layer.attention
    o = cross_attention_reference(
        att.q(q_in), att.k(kv_in), att.v(kv_in),
        context_mask=jnp.concatenate([mask, jnp.ones((2, N), bool)], axis=1))
    lat = lat + att.out(o)
    lat = lat + layer.mlp(layer.mlp_norm(lat))
    return m.final_norm(lat)

  want = nnx.jit(flamingo)(r, x)
  assert rel_err(_call(r, x, None, mask), want) < 1e-5


def test_flash_matches_reference_twin_with_grads():
  r, twin = _resampler("xla"), _resampler("reference")
  x = _x(7)
  lengths, mask = jnp.array([T, 5]), jnp.ones((2, T), bool).at[0, 1].set(False)

  def run(m):
    def loss(m, x):
      y = m(x, lengths=lengths, mask=mask)
      return jnp.sum(jnp.sin(y)), y
    (_, y), g = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(m, x)
    return y, jax.tree.leaves(g)

  (y, g), (y_ref, g_ref) = run(r), run(twin)
  assert rel_err(y, y_ref) < 1e-5
  assert len(g) == len(g_ref)
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5
  dx = g[-1]
  assert float(jnp.abs(dx[1, 5:]).max()) == 0.0 and float(jnp.abs(dx[0, 1]).max()) == 0.0
  assert float(jnp.abs(dx[1, :5]).min(axis=-1).min()) > 0.0


def test_same_width_input_has_no_projection():
  r = _resampler(d_input=None, num_layers=1, final_norm=False)
  assert r.input_proj is None and r.final_norm is None
  assert _call(r, _x(8, d=D)).shape == (2, N, D)


@pytest.mark.parametrize("kw,match", [
    (dict(num_latents=0), r"num_latents must be a positive integer"),
    (dict(num_layers=-1), r"num_layers must be a positive integer"),
    (dict(d_input=0), r"d_input must be a positive integer"),
    (dict(mlp_kind="tanh"), r"unknown mlp kind 'tanh'"),
    (dict(norm="batchnorm"), r"unknown norm 'batchnorm'"),
])
def test_bad_settings_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    _resampler(**kw)


def test_bad_calls_are_named():
  r = _resampler(num_positions=8)
  x = _x()
  cases = [
      (lambda: r(x[..., :16]), r"x must be \[batch, tokens, d_input=24\], got \(2, 7, 16\)"),
      (lambda: r(x, lengths=jnp.array([3])), r"lengths must be \[batch\] = \(2,\)"),
      (lambda: r(x, lengths=jnp.array([3, 9])),
       r"lengths must lie in \[0, tokens 7\], got values in \[3, 9\]"),
      (lambda: r(x, mask=jnp.ones((2, 5), bool)), r"mask must be \[batch, tokens\] = \(2, 7\)"),
      (lambda: r(x, mask=jnp.ones((2, T), jnp.int32)), r"mask must be boolean"),
      (lambda: r(_x(t=9)), r"x has 9 tokens, more than num_positions=8"),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=match):
      fn()
