"""`relational`: 0 relational heads == `mha` exactly; the attention-over-psi identity == explicit
pairwise relations (outputs and grads, masks, GQA); symbolic attention; causality; LM step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, Mask, registry
from layers.attention.mha import MultiHeadAttention
from layers.attention.relational import (RelationalAttention, relational_attention,
                                         relational_attention_reference, symbolic_attention)
from tests.family_checks import (assert_causal, assert_lm_trains_one_step,
                                 assert_matches_reference)
from tests.numerics import rel_err


@nnx.jit
def _call(m, x):
  return m(x)


def _inputs(hq=4, hkv=2, t=11, d=8, dr=3, p=5, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  n = lambda i, shape: jax.random.normal(ks[i], shape)
  return (2.0 * n(0, (2, t, hq, d)), n(1, (2, t, hkv, d)), n(2, (2, t, dr, p)),
          n(3, (2, t, dr, p)), n(4, (2, t, hkv, d)), n(5, (hq, dr, d)))


def test_identity_path_equals_explicit_pairwise_relations_with_grads():
  args = _inputs()
  masks = (Mask.sliding_window(3), Mask.make_causal().with_padding(jnp.array([11, 0])))  # batch 1: no visible key
  loss = lambda fn, m: (lambda *a: jnp.sum(jnp.sin(fn(*a, m))))
  fast = lambda *a: relational_attention(*a[:-1], a[-1], implementation="xla")

  @jax.jit
  def run(*a):
    return [(fast(*a, m), relational_attention_reference(*a, m),
             jax.grad(loss(fast, m), tuple(range(6)))(*a),
             jax.grad(loss(relational_attention_reference, m), tuple(range(6)))(*a))
            for m in masks]

  for out, out_ref, g, g_ref in run(*args):
    assert rel_err(out, out_ref) < 1e-5
    for a, b in zip(g, g_ref):
      assert bool(jnp.all(jnp.isfinite(a)))
      assert rel_err(a, b) < 1e-5
  assert bool(jnp.all(run(*args)[-1][0][1] == 0))


def test_reference_is_the_stated_sum_written_out():
  q, k, phi, psi, sv, w_r = _inputs(hq=2, hkv=1, t=5, d=4, dr=2, p=3, seed=1)
  got = relational_attention_reference(q, k, phi, psi, sv, w_r, Mask.make_causal())
  q, k, phi, psi, sv, w_r = (np.asarray(a, np.float64) for a in (q, k, phi, psi, sv, w_r))
  want = np.zeros(got.shape)
  for b in range(2):
    for h in range(2):
      for i in range(5):
        s = np.array([q[b, i, h] @ k[b, j, 0] / 2.0 for j in range(i + 1)])
        a = np.exp(s - s.max())
        a /= a.sum()
        for j in range(i + 1):
          r = np.array([phi[b, i, l] @ psi[b, j, l] for l in range(2)]) / np.sqrt(3)
          want[b, i, h] += a[j] * (r @ w_r[h] + sv[b, j, 0])
  assert rel_err(got, want) < 1e-5


def test_symbolic_attention_is_per_head_softmax_over_the_library():
  ks = jax.random.split(jax.random.key(2), 5)
  x = jax.random.normal(ks[0], (1, 3, 8))
  w, b = jax.random.normal(ks[1], (8, 8)), jax.random.normal(ks[2], (8,))
  tmpl, lib = jax.random.normal(ks[3], (5, 8)), jax.random.normal(ks[4], (5, 8))
  got = symbolic_attention(x, w, b, tmpl, lib, 2)
  qx = x @ w + b
  for m in range(2):
    sl = slice(4 * m, 4 * m + 4)
    p = jax.nn.softmax(qx[..., sl] @ tmpl[:, sl].T / 2.0, axis=-1)
    assert rel_err(got[..., sl], p @ lib[:, sl]) < 1e-5


def _cfg(impl="auto", **options):
  return AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, implementation=impl,
                         options=options)


def test_zero_relational_heads_is_mha_with_same_parameters():
  layer = RelationalAttention(_cfg(relational_heads=0), rngs=nnx.Rngs(0))
  ref = MultiHeadAttention(_cfg(), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  assert rel_err(_call(layer, x), _call(ref, x)) == 0.0
  assert len(jax.tree.leaves(nnx.state(layer, nnx.Param))) == len(
      jax.tree.leaves(nnx.state(ref, nnx.Param)))


def test_sensory_heads_are_untouched_mha_heads():
  """The sensory heads of a mixed layer equal the same heads of `mha` (same q/k/v weights)."""
  layer = RelationalAttention(_cfg(relational_heads=2), rngs=nnx.Rngs(0))
  ref = MultiHeadAttention(_cfg(), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  heads = nnx.jit(lambda m, x: m.core(x, *m.qkv(x), *m.resolve_mask(x, None, None)))
  a, b = heads(layer, x), heads(ref, x)
  assert rel_err(a[:, :, :2], b[:, :, :2]) < 1e-6 and rel_err(a[:, :, 2:], b[:, :, 2:]) > 1e-2


def test_layer_fast_vs_reference_with_grads_and_causal():
  layer = RelationalAttention(_cfg(relational_heads=2), rngs=nnx.Rngs(0))
  ref = RelationalAttention(_cfg("reference", relational_heads=2), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 9, 32))
  g, _ = assert_matches_reference(layer, ref, x, call=_call)
  assert float(jnp.abs(g.w_r[...]).max()) > 0 and float(jnp.abs(g.phi.kernel[...]).max()) > 0
  assert float(jnp.abs(g.library[...]).max()) > 0
  assert_causal(layer, call=_call)


def test_all_relational_positional_symmetric_layer_matches_reference_and_is_causal():
  opts = dict(relational_heads=4, symbols="positional", symmetric=True, relation_dim=2)
  layer = RelationalAttention(_cfg(**opts), rngs=nnx.Rngs(0))
  ref = RelationalAttention(_cfg("reference", **opts), rngs=nnx.Rngs(0))
  assert layer.psi is None and layer.symbol_table.shape == (4096, 32)
  x = jax.random.normal(jax.random.key(3), (2, 9, 32))
  assert rel_err(_call(layer, x), _call(ref, x)) < 1e-5
  assert_causal(layer, call=_call)


def test_options_and_errors():
  layer = RelationalAttention(_cfg(), rngs=nnx.Rngs(0))  # default: half the heads
  assert layer.n_rel == 2 and layer.relation_dim == 2 and layer.relation_proj_dim == 8
  assert layer.w_r.shape == (2, 2, 8) and layer.library.shape == (64, 32)
  for name, bad in [("relational_heads", 1), ("relational_heads", 6), ("symbols", "learned"),
                    ("relation_dim", 0), ("symmetric", "no"), ("symbol_heads", 3)]:
    with pytest.raises(ValueError, match=f"model.attention_options.{name}"):
      RelationalAttention(_cfg(**{name: bad}), rngs=nnx.Rngs(0))


def test_registered_and_decoder_lm_trains_one_step():
  assert registry.get("relational") is RelationalAttention
  assert_lm_trains_one_step("relational", (("relational_heads", 2),), num_layers=1, vocab=50)
