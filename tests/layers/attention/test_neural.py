"""`neural`: chunked == dense reference (outputs, grads, masks, empty rows); the score is an MLP,
not a q.k product (tanh == Bahdanau additive attention; linear == query-independent softmax);
causality; options; a DecoderLM step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, Mask, registry
from layers.attention.neural import (NeuralAttention, ScoreNet, neural_attention,
                                     neural_attention_reference)
from tests.family_checks import (assert_causal, assert_lm_trains_one_step,
                                 assert_matches_reference, random_qkv)
from tests.numerics import rel_err


@nnx.jit
def _call(m, x):
  return m(x)


def _net(hq=4, d=8, widths=(6,), seed=0, shared=False):
  h = 1 if shared else hq
  ks = iter(jax.random.split(jax.random.key(seed), 8))
  n = lambda shape, fan: jax.random.normal(next(ks), shape) / np.sqrt(fan)
  hidden = tuple((n((h, fi, fo), fi), 0.1 * n((h, fo), 1))
                 for fi, fo in zip(widths[:-1], widths[1:]))
  return ScoreNet(n((h, d, widths[0]), d), n((h, d, widths[0]), d), 0.3 * n((h, widths[0]), 1),
                  hidden, 2.0 * n((h, widths[-1]), widths[-1]))


_MASKS = (Mask.make_causal(), Mask.sliding_window(4))


def test_chunked_equals_reference_outputs_and_grads():
  q, k, v = random_qkv(t=13)
  net = _net(widths=(6, 3))
  # 13 rows in blocks of 4: the last block is padded; batch 1 sees no key at all.
  masks = _MASKS + (Mask.sliding_window(5).with_padding(jnp.array([13, 0])),)
  loss = lambda fn, m: (lambda q, k, v, net: jnp.sum(jnp.sin(fn(q, k, v, net, m))))
  chunked = lambda q, k, v, net, m: neural_attention(q, k, v, net, m, block_q=4)

  @jax.jit
  def run(q, k, v, net):
    return [(chunked(q, k, v, net, m), neural_attention_reference(q, k, v, net, m),
             jax.grad(loss(chunked, m), (0, 1, 2, 3))(q, k, v, net),
             jax.grad(loss(neural_attention_reference, m), (0, 1, 2, 3))(q, k, v, net))
            for m in masks]

  for out, out_ref, g, g_ref in run(q, k, v, net):
    assert rel_err(out, out_ref) < 1e-5
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      assert bool(jnp.all(jnp.isfinite(a)))
      assert rel_err(a, b) < 1e-5
  out_pad, _, g_pad, _ = run(q, k, v, net)[-1]
  assert bool(jnp.all(out_pad[1] == 0)) and bool(jnp.all(g_pad[0][1] == 0))


def test_tanh_is_additive_attention_written_directly():
  """activation="tanh", one layer: s_ij = w . tanh(W_a q_i + W_b k_j + b) (Bahdanau), per head."""
  q, k, v = random_qkv(t=9, seed=1)
  net = _net(seed=1)
  kr, vr = np.repeat(np.asarray(k), 2, axis=2), np.repeat(np.asarray(v), 2, axis=2)
  w_q, w_k, b, w_out = (np.asarray(x, np.float64) for x in (net.w_q, net.w_k, net.b, net.w_out))
  s = np.zeros((2, 4, 9, 9))
  for h in range(4):
    for i in range(9):
      for j in range(9):
        z = np.asarray(q[:, i, h], np.float64) @ w_q[h] + kr[:, j, h] @ w_k[h] + b[h]
        s[:, h, i, j] = np.tanh(z) @ w_out[h]
  s = np.where(np.tril(np.ones((9, 9), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhqk,bkhd->bqhd", p, np.asarray(vr))
  got = jax.jit(neural_attention, static_argnames=("activation", "block_q"))(
      q, k, v, net, Mask.make_causal(), activation="tanh", block_q=4)
  assert rel_err(got, want) < 1e-5


def test_linear_activation_is_a_query_independent_softmax_not_dot_product():
  """act = identity: s_ij = w.(W_a q_i + b) + (W_b w) . k_j; the first term is constant per row,
  so the weights are softmax_j(u_h . k_j) with u_h = W_b^h w^h whatever the query."""
  q, k, v = random_qkv(t=11, seed=2)
  net = _net(seed=2)
  f = jax.jit(neural_attention, static_argnames=("activation", "block_q"))
  got = f(q, k, v, net, Mask.bidirectional(), activation="linear", block_q=4)
  u = jnp.einsum("hdf,hf->hd", net.w_k, net.w_out)  # [Hq, D]
  logits = jnp.einsum("bkhd,hd->bhk", jnp.repeat(k, 2, axis=2), u)
  want = jnp.einsum("bhk,bkhd->bhd", jax.nn.softmax(logits, -1), jnp.repeat(v, 2, axis=2))
  assert rel_err(got, jnp.broadcast_to(want[:, None], got.shape)) < 1e-5
  q2 = jax.random.normal(jax.random.key(9), q.shape)
  assert rel_err(f(q2, k, v, net, Mask.bidirectional(), activation="linear", block_q=4), got) < 1e-5
  # ReLU makes it depend on the query again (not a dot product in disguise either way).
  relu = lambda qq: f(qq, k, v, net, Mask.bidirectional(), activation="relu", block_q=4)
  assert rel_err(relu(q2), relu(q)) > 1e-2


def _layer(impl="auto", **options):
  cfg = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, implementation=impl,
                        options={"block_q": 4, **options})
  return NeuralAttention(cfg, rngs=nnx.Rngs(0))


def test_layer_fast_vs_reference_with_grads_and_causal():
  layer, ref = _layer(share_heads=True), _layer("reference", share_heads=True)
  x = jax.random.normal(jax.random.key(3), (2, 9, 32))
  g, _ = assert_matches_reference(layer, ref, x, call=_call)
  assert float(jnp.abs(g.w_q[...]).max()) > 0 and float(jnp.abs(g.b[...]).max()) > 0
  assert_causal(layer, call=_call)


def test_params_options_and_errors():
  layer = _layer()
  assert layer.w_q.shape == (4, 8, 8) and layer.w_out.shape == (4, 8) and len(layer.hidden_w) == 0
  shared = _layer(share_heads=True, hidden=(2, 1))
  assert shared.w_q.shape == (1, 8, 2) and shared.hidden_w[0].shape == (1, 2, 1)
  for name, bad in [("hidden", 0), ("hidden", (4, "x")), ("activation", "cubic"),
                    ("share_heads", "yes"), ("block_q", 0)]:
    with pytest.raises(ValueError, match=f"model.attention_options.{name}"):
      _layer(**{name: bad})
  with pytest.raises(ValueError, match="no implementation='pallas' kernel"):
    _layer("pallas")
  assert layer.train_flops_per_token(16) == 3.0 * 4 * (2 * 8 + 2 * 8 + 2 * 8) * 16


def test_registered_and_decoder_lm_trains_one_step():
  assert registry.get("neural") is NeuralAttention
  assert_lm_trains_one_step("neural", (("block_q", 8), ("hidden", 4)), num_layers=1, vocab=50)
