"""`multi_token`: delta kernel + identity mix == `mha`; chunked path == dense reference
(outputs and grads); no future leakage; a DecoderLM step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, Mask, registry
from layers.attention.mha import mha
from layers.attention.multi_token import (MultiTokenAttention, multi_token_attention,
                                          multi_token_attention_reference)
from tests.family_checks import assert_causal, assert_lm_trains_one_step, random_qkv
from tests.numerics import rel_err


@nnx.jit
def _call(m, x):
  return m(x)


_qkv = random_qkv


def _params(hq=4, cq=3, ck=3, g=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 2)
  theta = 0.5 * jax.random.normal(ks[0], (hq, cq, ck)).at[:, 0, ck // 2].add(1.0)
  mix = jnp.eye(g) + 0.3 * jax.random.normal(ks[1], (hq // g, g, g))
  return theta, mix


def _delta(hq=4, cq=3, ck=3, g=2):
  return jnp.zeros((hq, cq, ck)).at[:, 0, ck // 2].set(1.0), jnp.broadcast_to(jnp.eye(g), (hq // g, g, g))


def test_delta_kernel_and_identity_mix_is_mha():
  q, k, v = _qkv()
  theta, mix = _delta()

  @jax.jit
  def run(q, k, v):
    return [(multi_token_attention(q, k, v, theta, mix, m, block_q=4, head_mix=hm),
             multi_token_attention_reference(q, k, v, theta, mix, m, head_mix=hm),
             mha(q, k, v, m))
            for m, hm in [(Mask.make_causal(), "post"), (Mask.sliding_window(3), "pre")]]

  for fast, ref, base in run(q, k, v):
    assert rel_err(fast, base) < 1e-5 and rel_err(ref, base) < 1e-5


def test_chunked_equals_reference_forward():
  q, k, v = _qkv()
  theta, mix = _params()
  cases = [(Mask.make_causal(), "post"), (Mask.bidirectional(), "pre"),
           (Mask.sliding_window(4).with_padding(jnp.array([13, 9])), "post")]

  @jax.jit
  def run(q, k, v):
    return [(multi_token_attention(q, k, v, theta, mix, m, block_q=4, head_mix=hm),
             multi_token_attention_reference(q, k, v, theta, mix, m, head_mix=hm),
             mha(q, k, v, m)) for m, hm in cases]

  for fast, ref, base in run(q, k, v):
    assert rel_err(fast, ref) < 1e-5
    assert rel_err(ref, base) > 1e-2  # the conv and the mix do change the result


def test_chunked_equals_reference_grads_and_fully_masked_rows():
  q, k, v = _qkv(seed=1)
  theta, mix = _params(cq=2, ck=5, seed=1)
  mask = Mask.make_causal().with_padding(jnp.array([13, 0]))  # batch 1 sees no key
  loss = lambda fn: (lambda *a: jnp.sum(jnp.sin(fn(*a))))
  fast = lambda q, k, v, t, m: multi_token_attention(q, k, v, t, m, mask, block_q=5)
  ref = lambda q, k, v, t, m: multi_token_attention_reference(q, k, v, t, m, mask)

  @jax.jit
  def run(*a):
    return (fast(*a), ref(*a), jax.grad(loss(fast), range(5))(*a),
            jax.grad(loss(ref), range(5))(*a))

  out, out_ref, g, g_ref = run(q, k, v, theta, mix)
  assert rel_err(out, out_ref) < 1e-5
  assert bool(jnp.all(out[1] == 0))
  for a, b in zip(g, g_ref):
    assert bool(jnp.all(jnp.isfinite(a)))
    assert rel_err(a, b) < 1e-4


def test_no_future_leakage_in_the_function():
  q, k, v = _qkv(t=12)
  theta, mix = _params(cq=4, ck=7, seed=2)
  fn = jax.jit(lambda q, k, v: multi_token_attention(q, k, v, theta, mix, Mask.make_causal(),
                                                     block_q=5))
  cut = 7
  ks = jax.random.split(jax.random.key(9), 3)
  q2, k2, v2 = (a.at[:, cut:].set(jax.random.normal(kk, a[:, cut:].shape))
                for a, kk in zip((q, k, v), ks))
  y, y2 = fn(q, k, v), fn(q2, k2, v2)
  np.testing.assert_allclose(y[:, :cut], y2[:, :cut], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(y[:, cut:] - y2[:, cut:]).max()) > 1e-3


def _layer(impl="auto", **options):
  cfg = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, implementation=impl,
                        options={"kq_kernel": (3, 5), "block_q": 4, **options})
  return MultiTokenAttention(cfg, rngs=nnx.Rngs(0))


def test_fresh_layer_without_group_norm_is_mha():
  layer = _layer(group_norm=False)
  base = registry.get("mha")(layer.cfg, rngs=nnx.Rngs(0))
  base.qkv, base.out = layer.qkv, layer.out
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  assert rel_err(_call(layer, x), _call(base, x)) < 1e-5


def test_layer_fast_vs_reference_and_causal():
  layer, ref = _layer(), _layer("reference")
  theta, mix = _params(cq=3, ck=5, seed=3)
  for m in (layer, ref):
    m.kq_kernel[...], m.head_mix_w[...] = theta, mix
  x = jax.random.normal(jax.random.key(3), (2, 10, 32))
  assert rel_err(_call(layer, x), _call(ref, x)) < 1e-5
  assert_causal(layer, call=_call)


def test_bad_options_error():
  for name, bad in [("kq_kernel", (0, 3)), ("head_group", 3), ("head_mix", "mid"),
                    ("group_norm", 1), ("block_q", 0), ("depth_scale", "x"), ("gate", "vector")]:
    with pytest.raises(ValueError, match=f"model.attention_options.{name}"):
      _layer(**{name: bad})
  with pytest.raises(ValueError, match="no implementation='pallas' kernel"):
    _layer("pallas")
  assert _layer(head_mix="none").head_mix_w is None


def test_group_norm_and_scalar_gate_as_the_authors_code():
  """o_h <- sigmoid(w . n_h + b) n_h, n_h = depth_scale * gamma * RMSNorm(o_h) (eps 1e-5),
  gamma [D] and w [D] shared by all heads (facebookresearch/RAM, projects/mta)."""
  plain, gated = _layer(group_norm=False), _layer(gate="scalar", depth_scale=0.5)
  gated.qkv, gated.out, gated.kq_kernel, gated.head_mix_w = (
      plain.qkv, plain.out, plain.kq_kernel, plain.head_mix_w)
  gated.norm_gamma[...] = jax.random.normal(jax.random.key(7), (8,))
  assert gated.norm_gamma.shape == (8,) and gated.gate_w.shape == (8,)
  x = jax.random.normal(jax.random.key(4), (2, 10, 32))
  q, k, v = plain.qkv(x)
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  mask, _ = plain.resolve_mask(x, None, pos)
  o = plain.core(x, q, k, v, mask, pos)
  n = 0.5 * gated.norm_gamma[...] * o / jnp.sqrt(jnp.mean(o * o, -1, keepdims=True) + 1e-5)
  want = n * jax.nn.sigmoid(n @ gated.gate_w[...] + gated.gate_b[...])[..., None]
  assert rel_err(gated.core(x, q, k, v, mask, pos), want) < 1e-5


def test_decoder_lm_grad_step():
  assert_lm_trains_one_step("multi_token", (("block_q", 8), ("kq_kernel", (3, 5))), num_layers=2, vocab=31)
  assert registry.get("multi_token") is MultiTokenAttention
