"""`sqa`: H_q = H is `mha`; variants' head counts; score FLOPs scale with H_q / H; fast == reference."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from layers.attention import AttentionConfig, registry
from layers.attention.mha import MultiHeadAttention
from layers.attention.sqa import SparseQueryAttention, score_flops, sqa_heads
from tests.family_checks import assert_causal, assert_lm_trains_one_step
from tests.numerics import rel_err


def _cfg(**options):
  impl = options.pop("implementation", "auto")
  kv = options.pop("num_kv_heads", 8)
  return AttentionConfig(d_model=32, num_heads=8, num_kv_heads=kv, implementation=impl,
                         options=options)


def test_full_query_heads_equals_mha_with_same_weights():
  cfg = _cfg(query_heads=8, kv_heads=8)
  layer = SparseQueryAttention(cfg, rngs=nnx.Rngs(0))
  ref = MultiHeadAttention(AttentionConfig(d_model=32, num_heads=8), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  assert rel_err(nnx.jit(lambda m, x: m(x))(layer, x), nnx.jit(lambda m, x: m(x))(ref, x)) == 0.0


@pytest.mark.parametrize("variant,kv,expect", [
    ("sqa", 2, (4, 2)), ("sqa", 8, (4, 4)), ("ssqa", 2, (4, 4)), ("xsqa", 2, (2, 2)),
    ("xsqa", 1, (2, 1)), ("xsmqa", 8, (2, 1))])
def test_variant_head_counts(variant, kv, expect):
  cfg = _cfg(variant=variant, num_kv_heads=kv)
  assert sqa_heads(cfg) == expect
  layer = SparseQueryAttention(cfg, rngs=nnx.Rngs(0))
  hq, hkv = expect
  assert layer.qkv.q.kernel.shape == (32, hq, 4)
  assert layer.qkv.k.kernel.shape == (32, hkv, 4)
  assert layer.out.o.kernel.shape == (hq, 4, 32)  # W_O: H_q * d -> d_model


@pytest.mark.parametrize("variant", ["sqa", "ssqa", "xsqa", "xsmqa"])
def test_score_flops_scale_with_query_heads(variant):
  base = _cfg(query_heads=8)
  cfg = _cfg(variant=variant)
  hq, _ = sqa_heads(cfg)
  assert score_flops(cfg, 1024) / score_flops(base, 1024) == hq / 8
  assert score_flops(cfg, 64) == 2 * hq * 64 * 64 * 4


def test_counted_core_flops_scale_with_query_heads():
  # Count with XLA's cost model on the reference core (score + value matmuls).
  from layers.attention.sqa import sqa

  def flops(hq, hkv, t=64, d=4):
    q = jnp.zeros((1, t, hq, d))
    kv = jnp.zeros((1, t, hkv, d))
    f = jax.jit(lambda q, k, v: sqa(q, k, v, implementation="reference"))
    return f.lower(q, kv, kv).compile().cost_analysis()["flops"]

  full = flops(8, 2)
  for hq in (4, 2):
    assert abs(flops(hq, 2) / full - hq / 8) < 0.05


@pytest.mark.parametrize("kw,match", [
    (dict(variant="bogus"), r"model.attention_options.variant='bogus'"),
    (dict(query_heads=0), r"model.attention_options.query_heads=0"),
    (dict(query_heads=4, kv_heads=3), r"query_heads / kv_heads"),
])
def test_bad_options_name_the_option(kw, match):
  with pytest.raises(ValueError, match=match):
    SparseQueryAttention(_cfg(**kw), rngs=nnx.Rngs(0))


def test_xsqa_needs_divisible_heads():
  cfg = AttentionConfig(d_model=24, num_heads=6, options=dict(variant="xsqa"))
  with pytest.raises(ValueError, match="model.attention_options.variant='xsqa'"):
    sqa_heads(cfg)


def test_layer_xla_matches_reference_with_grads():
  layer = SparseQueryAttention(_cfg(variant="sqa", num_kv_heads=2, implementation="xla"),
                               rngs=nnx.Rngs(0))
  ref = SparseQueryAttention(_cfg(variant="sqa", num_kv_heads=2, implementation="reference"),
                             rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 9, 32))
  vg = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(x))), has_aux=False))
  fwd = nnx.jit(lambda m: m(x))
  assert rel_err(fwd(layer), fwd(ref)) < 1e-5
  (_, g), (_, g_ref) = vg(layer), vg(ref)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert rel_err(a, b) < 1e-5


def test_layer_is_causal():
  layer = SparseQueryAttention(_cfg(variant="xsqa"), rngs=nnx.Rngs(0))
  assert_causal(layer)


def test_registered_and_decoder_lm_trains_one_step():
  assert registry.get("sqa") is SparseQueryAttention
  model = assert_lm_trains_one_step("sqa", (("variant", "sqa"),), num_layers=1, vocab=50)
  assert model.blocks[0].attention.qkv.q.kernel.shape == (32, 2, 8)
