"""`rope_buckets` (Attention Buckets): one bucket is `rope` exactly; N buckets == the explicit
mean of N RoPE attentions (== attention with the mean of their probabilities); the paper's
whole-model logit combination == an explicit reference; option parsing; causality; the Pallas
kernel; a DecoderLM step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, Mask, registry
from layers.attention.config import parse_options
from layers.attention.mha import mha
from layers.attention.rope import apply_rope
from layers.attention.rope_buckets import (DEFAULT_BASES, combine_bucket_logits, parse_bases,
                                           rope_buckets_attention)
from tests.family_checks import assert_causal, assert_lm_trains_one_step, random_qkv
from tests.numerics import rel_err

D = 8


@nnx.jit
def _call(m, x):
  return m(x)


def _layer(positional="rope_buckets", implementation="xla", bases=None, **kw):
  options = {} if bases is None else {"rope_buckets_bases": bases}
  cfg = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=D,
                        positional=positional, implementation=implementation, options=options,
                        **kw)
  return registry.get("mha")(cfg, rngs=nnx.Rngs(0))


def _explicit(q, k, v, pos, bases):
  """Dense causal GQA attention per base, then both readings of the combination."""
  rep = q.shape[2] // k.shape[2]
  t = q.shape[1]
  probs, outs = [], []
  for b in bases:
    qr, kr = apply_rope(q, pos, base=b), jnp.repeat(apply_rope(k, pos, base=b), rep, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", qr, kr) / D ** 0.5
    p = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf), -1)
    probs.append(p)
    outs.append(jnp.einsum("bhqk,bkhd->bqhd", p, jnp.repeat(v, rep, axis=2)))
  mean_out = sum(outs) / len(bases)
  mean_probs_out = jnp.einsum("bhqk,bkhd->bqhd", sum(probs) / len(bases),
                              jnp.repeat(v, rep, axis=2))
  return mean_out, mean_probs_out


def test_options_parse_from_the_flag_form():
  assert parse_bases(DEFAULT_BASES) == (10000.0, 17500.0, 18000.0, 19000.0, 20000.0, 25000.0)
  flag = parse_options("rope_buckets_bases=(10000,17500,25000),cope_p_max=3")
  assert flag == {"rope_buckets_bases": (10000, 17500, 25000), "cope_p_max": 3}
  assert parse_bases(flag["rope_buckets_bases"]) == (10000.0, 17500.0, 25000.0)
  semi = parse_options("rope_buckets_bases=10000;17500;25000")["rope_buckets_bases"]
  assert parse_bases(semi) == (10000.0, 17500.0, 25000.0)
  assert parse_bases(parse_options("rope_buckets_bases=20000")["rope_buckets_bases"]) == (20000.0,)
  assert parse_bases([1e4, 2.5e4]) == (10000.0, 25000.0)
  for bad in ("ten;thousand", (), (10000, -1), (10000, True), {"a": 1}):
    with pytest.raises(ValueError, match="model.attention_options.rope_buckets_bases"):
      parse_bases(bad)


def test_one_bucket_is_rope_exactly():
  x = jax.random.normal(jax.random.key(1), (1, 10, 32))  # assert_causal's shape: one compile
  one, rope = _layer(bases=(20_000,)), _layer("rope", rope_base=20_000.0)
  np.testing.assert_array_equal(one.qkv(x)[0], rope.qkv(x)[0])  # same init
  np.testing.assert_array_equal(_call(one, x), _call(rope, x))
  q, k, v = random_qkv(t=9)
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  ref, got = jax.jit(lambda q, k, v: (
      mha(apply_rope(q, pos, base=500.0), apply_rope(k, pos, base=500.0), v, Mask(causal=True),
          implementation="xla"),
      rope_buckets_attention(q, k, v, pos, pos, Mask(causal=True), bases=(500.0,),
                             implementation="xla")))(q, k, v)
  np.testing.assert_array_equal(got, ref)


def test_combination_equals_explicit_reference():
  q, k, v = random_qkv(t=11, seed=3)
  pos = jnp.broadcast_to(jnp.arange(11), (2, 11)) + jnp.array([[0], [40]])  # offset positions
  bases = (10_000.0, 300.0, 20.0)  # distinct waveforms at these lengths
  mean_out, mean_probs_out = _explicit(q, k, v, pos, bases)
  assert rel_err(mean_out, mean_probs_out) < 1e-6  # averaging outputs == averaging weights
  run = jax.jit(lambda q, k, v: [
      rope_buckets_attention(q, k, v, pos, pos, Mask(causal=True), bases=bases,
                             implementation=impl) for impl in ("xla", "reference")])
  for got in run(q, k, v):
    assert rel_err(got, mean_out) < 1e-5
  single, _ = _explicit(q, k, v, pos, bases[:1])
  assert rel_err(single, mean_out) > 1e-2  # the other buckets change the result
  # the layer: rotations in (a), the N passes and the mean in `attention`
  layer = _layer(bases=bases)
  x = jax.random.normal(jax.random.key(4), (2, 11, 32))
  lq, lk, lv = layer.qkv(x)
  mask = layer.resolve_mask(x, None, pos)[0]
  heads = jax.jit(lambda q, k, v: layer.core(x, q, k, v, mask, pos))(lq, lk, lv)
  assert rel_err(heads, _explicit(lq, lk, lv, pos, bases)[0]) < 1e-5


def test_paper_logit_combination_equals_explicit_reference():
  z = np.random.default_rng(5).normal(size=(3, 2, 4, 7)) * 3.0
  m = z.max(-1)  # [N, B, T]: each pass's confidence
  w = np.exp(m - m.max(0)) / np.exp(m - m.max(0)).sum(0)
  want = (w[..., None] * z).sum(0)
  got = combine_bucket_logits(jnp.asarray(z, jnp.float32))
  assert got.shape == (2, 4, 7) and rel_err(got, want) < 1e-6
  same = jnp.broadcast_to(jnp.asarray(z[0], jnp.float32), (4, 2, 4, 7))
  np.testing.assert_allclose(combine_bucket_logits(same), z[0], rtol=1e-6, atol=1e-6)


def test_causal_and_runs_on_the_pallas_kernel():
  layer = _layer(bases=(10_000, 50))
  assert_causal(layer, call=_call)
  x = jax.random.normal(jax.random.key(2), (1, 8, 32))
  fast = _layer(bases=(10_000, 50), implementation="pallas_interpret")
  assert rel_err(_call(layer, x), _call(fast, x)) < 1e-5


def test_bad_settings_name_them():
  with pytest.raises(ValueError, match="even head_dim"):
    registry.get("mha")(AttentionConfig(d_model=28, num_heads=4, head_dim=7,
                                        positional="rope_buckets"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="model.attention_options.rope_buckets_bases"):
    _layer(bases="10000;-3")
  with pytest.raises(ValueError, match="rope_original_max_len"):
    _layer(rope_scaling=4.0, rope_scaling_type="yarn")
  cfg = AttentionConfig(d_model=32, num_heads=4, positional="rope_buckets")
  with pytest.raises(ValueError, match=r"attention='gated'.*positional='rope_buckets'"):
    registry.get("gated")(cfg, rngs=nnx.Rngs(0))


def test_decoder_lm_trains_one_step():
  assert_lm_trains_one_step("mha", options=(("rope_buckets_bases", (10_000.0, 25_000.0)),),
                            num_layers=2, positional="rope_buckets", implementation="xla")
