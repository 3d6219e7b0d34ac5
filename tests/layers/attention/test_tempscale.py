"""`tempscale`: tau = 1 is `mha`; the scaled softmax equals an explicit reference; rules; LM step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, Mask, registry
from layers.attention.mha import MultiHeadAttention
from layers.attention.tempscale import (TempScaleAttention, length_temperature,
                                        tempscale_attention)
from tests.family_checks import assert_causal, assert_lm_trains_one_step
from tests.numerics import rel_err

_fwd = nnx.jit(lambda m, x: m(x))


def _cfg(implementation="auto", causal=True, **options):
  return AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, implementation=implementation,
                         causal=causal, options=options)


def _explicit(q, k, v, tau, causal=True):
  """softmax(Q K^T / (tau sqrt d)) V in plain jnp; tau broadcasts to [B, Tq, 1]."""
  t = q.shape[1]
  k, v = jnp.repeat(k, q.shape[2] // k.shape[2], 2), jnp.repeat(v, q.shape[2] // v.shape[2], 2)
  tau = jnp.broadcast_to(jnp.asarray(tau, jnp.float32), (q.shape[0], t, 1))
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  s = s / jnp.swapaxes(tau, 1, 2)[:, :, :, None]
  if causal:
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)


def _qkv(t=10):
  ks = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(ks[0], (2, t, 4, 8)), jax.random.normal(ks[1], (2, t, 2, 8)),
          jax.random.normal(ks[2], (2, t, 2, 8)))


def test_temperature_one_equals_mha():
  layer = TempScaleAttention(_cfg(temperature=1.0), rngs=nnx.Rngs(0))
  ref = MultiHeadAttention(_cfg(), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  assert rel_err(_fwd(layer, x), _fwd(ref, x)) == 0.0


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("tau", [0.5, 2.0, "per_query"])
def test_scaled_softmax_equals_explicit_reference(impl, tau):
  q, k, v = _qkv()
  if tau == "per_query":
    tau = jnp.linspace(0.4, 1.5, 20).reshape(2, 10, 1)
  f = jax.jit(lambda q, k, v: tempscale_attention(q, k, v, Mask.make_causal(), temperature=tau,
                                                  implementation=impl))
  got = f(q, k, v)
  assert rel_err(got, _explicit(q, k, v, tau)) < 1e-5


def test_length_rule():
  n = jnp.array([1, 16, 64, 4096])
  tau = length_temperature(0.9, n, 16)
  np.testing.assert_allclose(tau, [0.9, 0.9, 0.9 * math.log(16) / math.log(64),
                                   0.9 * math.log(16) / math.log(4096)], rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_log_length_layer_equals_explicit(causal):
  cfg = _cfg(causal=causal, temperature=0.8, temperature_rule="log_length", reference_length=4)
  layer = TempScaleAttention(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  q, k, v = layer.qkv(x)
  q, k = layer.positional(q, k, pos, pos)
  n = pos + 1 if causal else jnp.full((2, 10), 10)
  tau = length_temperature(0.8, n, 4)[..., None]
  ref = layer.out(_explicit(q, k, v, tau, causal=causal))
  assert rel_err(_fwd(layer, x), ref) < 1e-5


def test_layer_xla_matches_reference_with_grads():
  opts = dict(temperature=0.7, temperature_rule="log_length", reference_length=3)
  layer = TempScaleAttention(_cfg("xla", **opts), rngs=nnx.Rngs(0))
  ref = TempScaleAttention(_cfg("reference", **opts), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 9, 32))
  vg = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(x)))))
  assert rel_err(_fwd(layer, x), _fwd(ref, x)) < 1e-5
  (_, g), (_, g_ref) = vg(layer), vg(ref)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    assert rel_err(a, b) < 1e-5


def test_layer_is_causal():
  layer = TempScaleAttention(_cfg(temperature=0.5, temperature_rule="log_length",
                                  reference_length=2), rngs=nnx.Rngs(0))
  assert_causal(layer, call=_fwd)


@pytest.mark.parametrize("opts,match", [
    (dict(temperature=0.0), r"model.attention_options.temperature=0.0"),
    (dict(temperature_rule="sqrt"), r"model.attention_options.temperature_rule='sqrt'"),
    (dict(reference_length=1), r"model.attention_options.reference_length=1"),
])
def test_bad_options_name_the_option(opts, match):
  with pytest.raises(ValueError, match=match):
    TempScaleAttention(_cfg(**opts), rngs=nnx.Rngs(0))


def test_registered_and_decoder_lm_trains_one_step():
  assert registry.get("tempscale") is TempScaleAttention
  assert_lm_trains_one_step("tempscale", (("temperature", 0.8),), num_layers=1, vocab=50)
