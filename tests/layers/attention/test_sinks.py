"""`sinks`: s -> -inf is `mha`; sinks stay visible under a sliding window; gradients reach them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, Mask, registry
from layers.attention.mha import MultiHeadAttention
from layers.attention.sinks import SinkAttention, sink_logit_attention, sink_token_attention
from tests.family_checks import (assert_causal, assert_lm_trains_one_step,
                                 assert_matches_reference)
from tests.numerics import rel_err

_fwd = nnx.jit(lambda m, x: m(x))


def _cfg(implementation="auto", window=None, **options):
  return AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, implementation=implementation,
                         window=window, options=options)


def _qkv(t=12, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (2, t, 4, 8)), jax.random.normal(ks[1], (2, t, 2, 8)),
          jax.random.normal(ks[2], (2, t, 2, 8)))


def _dense_reference(q, k, v, mask, sink_logits=None, sink_k=None, sink_v=None):
  """Explicit softmax over [sink rows; keys] with the sink columns always visible."""
  b, t = q.shape[:2]
  rep = q.shape[2] // k.shape[2]
  vis = jnp.broadcast_to(mask.dense(b, t, t), (b, 1, t, t))
  if sink_k is not None:
    k = jnp.concatenate([jnp.broadcast_to(sink_k[None], (b,) + sink_k.shape), k], 1)
    v = jnp.concatenate([jnp.broadcast_to(sink_v[None], (b,) + sink_v.shape), v], 1)
    vis = jnp.concatenate([jnp.ones((b, 1, t, sink_k.shape[0]), bool), vis], -1)
  k, v = jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(vis, s, -jnp.inf)
  if sink_logits is not None:  # an extra column with no value
    col = jnp.broadcast_to(sink_logits[None, :, None, None], s.shape[:3] + (1,))
    p = jax.nn.softmax(jnp.concatenate([col, s], -1), -1)[..., 1:]
  else:
    p = jax.nn.softmax(s, -1)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def test_very_negative_sink_logit_equals_mha():
  layer = SinkAttention(_cfg(sink="logit", sink_init=-1e9), rngs=nnx.Rngs(0))
  ref = MultiHeadAttention(_cfg(), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  assert rel_err(_fwd(layer, x), _fwd(ref, x)) < 1e-6


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_sink_logit_visible_under_sliding_window(impl):
  q, k, v = _qkv()
  s = jnp.array([0.5, -1.0, 2.0, 0.0])
  mask = Mask.sliding_window(3)
  f = jax.jit(lambda *a: sink_logit_attention(*a, mask, implementation=impl))
  got = f(q, k, v, s)
  assert rel_err(got, _dense_reference(q, k, v, mask, sink_logits=s)) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("mask", [
    Mask.sliding_window(3), Mask.make_causal(),
    Mask.make_causal().with_segments(jnp.array([[1] * 5 + [2] * 7] * 2))])
def test_sink_tokens_visible_under_any_mask(impl, mask):
  q, k, v = _qkv()
  ks = jax.random.split(jax.random.key(7), 2)
  sk, sv = jax.random.normal(ks[0], (2, 2, 8)), jax.random.normal(ks[1], (2, 2, 8))
  f = jax.jit(lambda *a: sink_token_attention(*a, implementation=impl))
  got = f(q, k, v, sk, sv, mask)
  assert rel_err(got, _dense_reference(q, k, v, mask, sink_k=sk, sink_v=sv)) < 1e-5


def test_sink_tokens_keep_fully_masked_rows_finite():
  q, k, v = _qkv()
  mask = Mask.bidirectional().with_padding(jnp.array([0, 12]))  # example 0 sees no key
  sk, sv = jnp.ones((1, 2, 8)), jnp.full((1, 2, 8), 3.0)
  out = jax.jit(lambda *a: sink_token_attention(*a, implementation="xla"))(q, k, v, sk, sv, mask)
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out[0], 3.0, rtol=1e-6)  # only the sink's value


@pytest.mark.parametrize("opts", [dict(sink="logit", sink_init=0.3),
                                  dict(sink="tokens", num_sink_tokens=2)])
def test_layer_xla_matches_reference_and_grads_reach_sinks(opts):
  layer = SinkAttention(_cfg("xla", window=4, **opts), rngs=nnx.Rngs(0))
  ref = SinkAttention(_cfg("reference", window=4, **opts), rngs=nnx.Rngs(0))
  if opts["sink"] == "tokens":  # move off the zero init so every gradient term is exercised
    for m in (layer, ref):
      m.sink_k[...] = jax.random.normal(jax.random.key(5), m.sink_k.shape)
      m.sink_v[...] = jax.random.normal(jax.random.key(6), m.sink_v.shape)
  x = jax.random.normal(jax.random.key(3), (2, 9, 32))
  g, _ = assert_matches_reference(layer, ref, x, call=_fwd)
  names = ["sink_logits"] if opts["sink"] == "logit" else ["sink_k", "sink_v"]
  for name in names:
    assert float(jnp.abs(getattr(g, name)[...]).min()) > 0


def test_bad_options_name_the_option():
  with pytest.raises(ValueError, match=r"model.attention_options.sink='drain'"):
    SinkAttention(_cfg(sink="drain"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model.attention_options.num_sink_tokens=0"):
    SinkAttention(_cfg(sink="tokens", num_sink_tokens=0), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("sink", ["logit", "tokens"])
def test_layer_is_causal(sink):
  layer = SinkAttention(_cfg(sink=sink), rngs=nnx.Rngs(0))
  assert_causal(layer, call=_fwd)


def test_registered_and_decoder_lm_trains_one_step():
  assert registry.get("sinks") is SinkAttention
  assert_lm_trains_one_step("sinks", (("sink", "tokens"),), num_layers=1, vocab=50)
