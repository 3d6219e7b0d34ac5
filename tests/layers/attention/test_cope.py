"""`cope`: gates == 1 is a relative position embedding; positions are the reverse cumsum of
sigmoid gates; the chunked path == the dense reference (outputs, grads incl. e, masks, fully
masked rows, memory linear in T); a fresh layer is NoPE; causality; a DecoderLM step.

Not tested (a training result, too slow here): the paper's claim that CoPE solves selective
copy, counting and Flip-Flop where RoPE fails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, Mask, registry
from layers.attention.cope import (cope_attention, cope_attention_reference, cope_bias_reference,
                                   cope_positions)
from tests.family_checks import assert_causal, assert_lm_trains_one_step, random_qkv
from tests.numerics import rel_err


@nnx.jit
def _call(m, x):
  return m(x)


def _emb(p_max=8, d=8, seed=9):
  return jax.random.normal(jax.random.key(seed), (p_max + 1, d))


def test_positions_are_reverse_cumsum_of_sigmoid_gates():
  z = jax.random.normal(jax.random.key(0), (5, 7))
  vis = jnp.tril(jnp.ones((5, 7), bool), k=2)  # query i sees keys j <= i + 2
  p = np.asarray(cope_positions(z, vis, 100))
  g = 1 / (1 + np.exp(-np.asarray(z, np.float64)))
  for i in range(5):
    for j in range(7):
      want = sum(g[i, t] for t in range(j, i + 3))  # t = j .. last visible key
      np.testing.assert_allclose(p[i, j], want, rtol=1e-5, atol=1e-6)
  assert float(cope_positions(z, vis, 1.5).max()) == 1.5  # clipped at p_max


def test_unit_gates_are_relative_position_embeddings():
  """g == 1 => p_ij = i - j + 1 (clipped at p_max): softmax(s (q.k + q.e[min(i-j+1, p_max)])) V."""
  q, k, v = random_qkv(t=13)
  e, p_max = _emb(), 8
  b, t, hq, d = q.shape
  mask = Mask(causal=True)
  i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  rel = jnp.clip(i - j + 1, 0, p_max)
  _, p = cope_bias_reference(q, k, e, mask, unit_gates=True)
  np.testing.assert_array_equal(jnp.where(j <= i, p, 0)[0, 0], jnp.where(j <= i, rel, 0))
  # explicit relative-position-embedding attention (no CoPE code involved)
  kr = jnp.repeat(k, hq // k.shape[2], axis=2)
  vr = jnp.repeat(v, hq // v.shape[2], axis=2)
  s = (jnp.einsum("bqhd,bkhd->bhqk", q, kr) + jnp.einsum("bqhd,qkd->bhqk", q, e[rel])) / d ** 0.5
  s = jnp.where(j <= i, s, -jnp.inf)
  want = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), vr)
  run = jax.jit(lambda q, k, v, e: (
      cope_attention_reference(q, k, v, e, mask, unit_gates=True),
      cope_attention(q, k, v, e, mask, unit_gates=True, block_q=4),
      cope_attention_reference(q, k, v, e, mask)))
  ref, fast, sigmoid_gates = run(q, k, v, e)
  assert rel_err(ref, want) < 1e-5 and rel_err(fast, want) < 1e-5
  assert rel_err(sigmoid_gates, want) > 1e-2  # the real gates count something else


_MASKS = (Mask(causal=True), Mask.sliding_window(4).with_padding(jnp.array([13, 0])))


def test_chunked_equals_reference_outputs_and_grads():
  """13 rows in blocks of 4 (last block padded); GQA 4:2; batch 1 of the second mask sees no key."""
  q, k, v = random_qkv(t=13, seed=1)
  e = _emb(p_max=3)  # positions reach the clip at 3
  loss = lambda fn: (lambda *a: jnp.sum(jnp.sin(fn(*a))))

  @jax.jit
  def run(q, k, v, e):
    res = []
    for m in _MASKS:
      fast = lambda q, k, v, e, m=m: cope_attention(q, k, v, e, m, block_q=4)
      ref = lambda q, k, v, e, m=m: cope_attention_reference(q, k, v, e, m)
      res.append((fast(q, k, v, e), ref(q, k, v, e),
                  jax.grad(loss(fast), (0, 1, 2, 3))(q, k, v, e),
                  jax.grad(loss(ref), (0, 1, 2, 3))(q, k, v, e),
                  cope_bias_reference(q, k, e, m)[1]))
    return res

  for m, (out, out_ref, g, g_ref, p) in zip(_MASKS, run(q, k, v, e)):
    assert rel_err(out, out_ref) < 1e-5
    assert float(p.max()) == 3.0 and float(p.min()) < 1.0  # clipped and fractional positions
    for a, b in zip(g, g_ref):  # dq, dk, dv, de
      assert bool(jnp.all(jnp.isfinite(a)))
      assert rel_err(a, b) < 1e-4
    assert float(jnp.abs(g[3]).min()) > 0  # every row of e gets a gradient here
  out, _, g, _, _ = run(q, k, v, e)[1]
  assert bool(jnp.all(out[1] == 0)) and bool(jnp.all(g[0][1] == 0))  # fully masked rows


def _shapes(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(getattr(var.aval, "shape", ()))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _shapes(inner)


def test_chunked_path_memory_is_linear_in_t():
  """No intermediate of forward + backward holds [Tq, Tk]: the largest is O(block_q * Tk)."""
  t, bq = 64, 8
  q, k, v = random_qkv(hq=2, hkv=1, t=t)
  e = _emb()
  f = lambda q, k, v, e: jnp.sum(cope_attention(q, k, v, e, Mask(causal=True), block_q=bq))
  jaxpr = jax.make_jaxpr(jax.grad(f, (0, 1, 2, 3)))(q, k, v, e).jaxpr
  biggest = max(int(np.prod(s)) for s in _shapes(jaxpr))
  assert biggest <= 2 * 2 * bq * t  # B * Hq * block_q * Tk (the dense form is 2 * 2 * t * t)


def _layer(impl="xla", **options):
  cfg = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, positional="cope",
                        implementation=impl, options={"cope_block_q": 4, **options})
  return registry.get("mha")(cfg, rngs=nnx.Rngs(0))


def test_layer_fast_vs_reference_causal_and_fresh_layer_is_nope():
  x = jax.random.normal(jax.random.key(3), (1, 10, 32))  # assert_causal's shape: one compile
  layer, ref = _layer(cope_p_max=6), _layer("reference", cope_p_max=6)
  nope = registry.get("mha")(AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2,
                                             positional="nope", implementation="xla"),
                             rngs=nnx.Rngs(0))
  assert rel_err(_call(layer, x), _call(nope, x)) < 1e-6  # e = 0 at initialisation
  for m in (layer, ref):
    m.positional.pos_emb[...] = _emb(p_max=6, seed=4)
  assert rel_err(_call(layer, x), _call(ref, x)) < 1e-5
  vg = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(x)))))
  (_, g), (_, g_ref) = vg(layer), vg(ref)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert rel_err(a, b) < 1e-4
  assert float(jnp.abs(g["positional"]["pos_emb"][...]).max()) > 0
  assert rel_err(_call(layer, x), _call(nope, x)) > 1e-3
  assert_causal(layer, call=_call)


def test_bad_settings_name_them():
  for name, bad in [("cope_p_max", 0), ("cope_p_max", 2.5), ("cope_block_q", 0)]:
    with pytest.raises(ValueError, match=f"model.attention_options.{name}"):
      _layer(**{name: bad})
  with pytest.raises(ValueError, match="no implementation='pallas' kernel"):
    _layer("pallas")
  cfg = AttentionConfig(d_model=32, num_heads=4, positional="cope")
  with pytest.raises(ValueError, match=r"attention='entmax'.*positional='cope'"):
    registry.get("entmax")(cfg, rngs=nnx.Rngs(0))
  assert _layer().positional.pos_emb.shape == (65, 8)  # p_max 64 default, shared by heads


def test_decoder_lm_trains_one_step():
  assert_lm_trains_one_step("mha", (("cope_p_max", 8), ("cope_block_q", 4)), num_layers=2,
                            positional="cope", implementation="xla")
