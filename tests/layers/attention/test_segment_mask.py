"""`segment_mask`: one masked pass == N separate passes; packed == unpacked; fast == dense rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig
from layers.attention.mha import MultiHeadAttention
from layers.attention.segment_mask import (QUERY, SegmentMaskAttention, pack_layouts,
                                           segment_attention, segment_attention_reference,
                                           segment_layout, segment_visible_dense)
from tests.family_checks import assert_lm_trains_one_step
from tests.numerics import rel_err

P, SEGS, Q = 3, (4, 2, 5), 3
T = P + sum(SEGS) + Q


def _layer(impl="auto", **options):
  cfg = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, implementation=impl,
                        options=dict(segment_layout=(P, SEGS, Q), **options))
  return SegmentMaskAttention(cfg, rngs=nnx.Rngs(0))


@nnx.jit
def _plain(layer, x):
  return MultiHeadAttention.__call__(layer, x, positions=jnp.arange(x.shape[1])[None])


@nnx.jit
def _call(layer, x, layout=None):
  return layer(x, layout=layout)


def _grad(loss, m):
  return nnx.jit(nnx.grad(loss))(m)


def test_dense_rule_is_the_layout():
  vis = np.asarray(segment_visible_dense(segment_layout(P, SEGS, Q), causal=False))[0, 0]
  starts = np.cumsum((P,) + SEGS)
  for i, (s, l) in enumerate(zip(starts[:-1], SEGS)):
    row = vis[s]
    assert row[:P].all() and row[s:s + l].all()
    assert row.sum() == P + l  # nothing of other segments or the query
  assert vis[T - 1].all()  # the query sees everything
  assert not vis[:P, P:].any()  # the prefix sees only itself


def test_one_masked_pass_equals_separate_passes():
  layer = _layer()
  x = jax.random.normal(jax.random.key(0), (1, T, 32))
  y = _call(layer, x)
  start = P
  for l in SEGS:
    xi = jnp.concatenate([x[:, :P], x[:, start:start + l]], axis=1)
    yi = _plain(layer, xi)  # [prefix; seg_i] alone, plain causal mha, same weights
    assert rel_err(y[:, start:start + l], yi[:, P:]) < 1e-5
    assert rel_err(y[:, :P], yi[:, :P]) < 1e-5
    start += l
  # With one segment the layout is plain causal attention, query included.
  one = SegmentMaskAttention(AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2,
                                             options=dict(segment_layout=(2, [5], 3))),
                             rngs=nnx.Rngs(0))
  assert rel_err(_call(one, x[:, :10]), _plain(one, x[:, :10])) < 1e-5


@pytest.mark.parametrize("rescale", [False, True])
def test_packed_equals_unpacked(rescale):
  specs = [(3, [4, 2], 2), (2, [3, 3, 1], 3)]
  packed = pack_layouts(specs, pad_to=24)
  layer = _layer(rescale=rescale)
  x = jax.random.normal(jax.random.key(1), (1, 24, 32))
  y = _call(layer, x, layout=packed)
  start = 0
  for p, s, q in specs:
    n = p + sum(s) + q
    yi = _call(layer, x[:, start:start + n], layout=segment_layout(p, s, q))
    assert rel_err(y[:, start:start + n], yi) < 1e-5
    start += n


@pytest.mark.parametrize("causal,rescale,align", [(True, False, "left"), (False, True, "right"),
                                                  (True, True, "right")])
def test_fast_vs_reference_outputs_and_grads(causal, rescale, align):
  layout = pack_layouts([(3, [4, 2, 5], 3), (1, [2, 2], 2)], align=align)
  t = layout.shape[1]
  ks = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(ks[0], (1, t, 4, 8))
  k = jax.random.normal(ks[1], (1, t, 2, 8))
  v = jax.random.normal(ks[2], (1, t, 2, 8))
  kw = dict(causal=causal, rescale=rescale)
  fast = jax.jit(lambda q, k, v, lay: segment_attention(q, k, v, lay, **kw))
  ref = jax.jit(lambda q, k, v, lay: segment_attention_reference(q, k, v, lay, **kw))
  assert rel_err(fast(q, k, v, layout), ref(q, k, v, layout)) < 1e-5
  f = lambda fn: (lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, layout))))
  g = jax.jit(jax.grad(f(fast), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(f(ref), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5


def test_rescale_makes_n_identical_segments_count_as_one():
  # Structured Prompting: N copies of one group, each weighted 1/N, equal the group once.
  ks = jax.random.split(jax.random.key(3), 4)
  pre, seg, qry = (jax.random.normal(kk, (1, n, 32)) for kk, n in zip(ks, (2, 4, 3)))
  layer = SegmentMaskAttention(
      AttentionConfig(d_model=32, num_heads=4, options=dict(rescale=True)), rngs=nnx.Rngs(0))
  x3 = jnp.concatenate([pre, seg, seg, seg, qry], axis=1)
  x1 = jnp.concatenate([pre, seg, qry], axis=1)
  y3 = _call(layer, x3, layout=segment_layout(2, [4, 4, 4], 3))
  y1 = _call(layer, x1, layout=segment_layout(2, [4], 3))
  assert rel_err(y3[:, -3:], y1[:, -3:]) < 1e-5
  plain = SegmentMaskAttention(AttentionConfig(d_model=32, num_heads=4), rngs=nnx.Rngs(0))
  assert rel_err(_call(plain, x3, layout=segment_layout(2, [4, 4, 4], 3))[:, -3:], y1[:, -3:]) > 1e-3


def test_layer_fast_vs_reference_and_grads():
  layer, ref = _layer(rescale=True), _layer("reference", rescale=True)
  x = jax.random.normal(jax.random.key(4), (2, T, 32))
  assert rel_err(_call(layer, x), _call(ref, x)) < 1e-5
  loss = lambda m: jnp.sum(jnp.sin(m(x)))
  for a, b in zip(jax.tree.leaves(_grad(loss, layer)), jax.tree.leaves(_grad(loss, ref))):
    assert rel_err(a, b) < 1e-5


def test_layer_is_causal():
  layer = _layer()
  x = jax.random.normal(jax.random.key(1), (1, T, 32))
  x2 = x.at[:, 12:].set(jax.random.normal(jax.random.key(2), (1, T - 12, 32)))
  y, y2 = _call(layer, x), _call(layer, x2)
  np.testing.assert_allclose(y[:, :12], y2[:, :12], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(y[:, 12:] - y2[:, 12:]).max()) > 1e-3


def test_shared_positions():
  lay = segment_layout(2, [3, 1], 2, align="left")
  np.testing.assert_array_equal(lay.positions[0], [0, 1, 2, 3, 4, 2, 5, 6])
  lay = segment_layout(2, [3, 1], 2, align="right")
  np.testing.assert_array_equal(lay.positions[0], [0, 1, 2, 3, 4, 4, 5, 6])
  assert int((lay.group == QUERY).sum()) == 2


@pytest.mark.parametrize("options,match", [
    (dict(segment_layout="abc"), "model.attention_options.segment_layout"),
    (dict(segment_layout=(1, [0], 1)), "model.attention_options.segment_layout"),
    (dict(segment_layout=(1, [2], 1), segment_align="middle"), "model.attention_options.segment_align"),
    (dict(rescale=1), "model.attention_options.rescale"),
])
def test_bad_options_error(options, match):
  with pytest.raises(ValueError, match=match):
    SegmentMaskAttention(AttentionConfig(d_model=32, num_heads=4, options=options),
                         rngs=nnx.Rngs(0))


def test_decoder_lm_runs_and_trains():
  assert_lm_trains_one_step("segment_mask", (("segment_layout", (2, (3, 3), 3)),), num_layers=2, vocab=31)
