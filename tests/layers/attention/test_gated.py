"""`gated`: sigmoid == 1 is `mha`; the gate multiplies each head; fast == reference; causal; LM step."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from layers.attention import AttentionConfig, Mask, registry
from layers.attention.gated import GatedAttention, gated_attention
from layers.attention.mha import MultiHeadAttention, mha
from tests.family_checks import (assert_causal, assert_lm_trains_one_step,
                                 assert_matches_reference)
from tests.numerics import rel_err

_fwd = nnx.jit(lambda m, x: m(x))


def _cfg(implementation="auto", **options):
  return AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, implementation=implementation,
                         options=options)


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_saturated_gate_equals_mha_with_same_weights(gate):
  layer = GatedAttention(_cfg(gate=gate, gate_bias_init=1e4), rngs=nnx.Rngs(0))
  ref = MultiHeadAttention(_cfg(), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  assert rel_err(_fwd(layer, x), _fwd(ref, x)) == 0.0


@pytest.mark.parametrize("gate,shape", [("headwise", (2, 6, 4)), ("elementwise", (2, 6, 4, 8))])
def test_function_is_sdpa_times_sigmoid(gate, shape):
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (2, 6, 4, 8))
  k, v = (jax.random.normal(kk, (2, 6, 2, 8)) for kk in ks[1:3])
  g = jax.random.normal(ks[3], shape)
  got = gated_attention(q, k, v, g, Mask.make_causal())
  o = mha(q, k, v, Mask.make_causal(), implementation="reference")
  ref = o * jax.nn.sigmoid(g if g.ndim == 4 else g[..., None])
  assert rel_err(got, ref) < 1e-6


def test_gate_params_and_init():
  hw = GatedAttention(_cfg(gate="headwise"), rngs=nnx.Rngs(0))
  ew = GatedAttention(_cfg(gate="elementwise"), rngs=nnx.Rngs(0))
  assert hw.gate.kernel.shape == (32, 4) and hw.gate_bias.shape == (4,)
  assert ew.gate.kernel.shape == (32, 4, 8) and ew.gate_bias.shape == (4, 8)
  assert ew.gate.kernel.get_metadata()["logical_axes"] == ("embed", "heads", "head_dim")
  x = jax.random.normal(jax.random.key(1), (1, 7, 32))
  s = jax.nn.sigmoid(ew.gate(x) + ew.gate_bias[...])
  assert abs(float(s.mean()) - 0.5) < 0.05 and float(jnp.abs(s - 0.5).max()) < 0.25


def test_bad_gate_option_names_the_option():
  with pytest.raises(ValueError, match=r"model.attention_options.gate='sideways'"):
    GatedAttention(_cfg(gate="sideways"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_layer_xla_matches_reference_with_grads(gate):
  layer = GatedAttention(_cfg("xla", gate=gate, gate_init_scale=1.0), rngs=nnx.Rngs(0))
  ref = GatedAttention(_cfg("reference", gate=gate, gate_init_scale=1.0), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 9, 32))
  g, _ = assert_matches_reference(layer, ref, x, call=_fwd)
  assert float(jnp.abs(g.gate.kernel[...]).max()) > 0 and float(jnp.abs(g.gate_bias[...]).max()) > 0


def test_layer_is_causal():
  layer = GatedAttention(_cfg(gate="headwise", gate_init_scale=1.0), rngs=nnx.Rngs(0))
  assert_causal(layer, call=_fwd)


def test_registered_and_decoder_lm_trains_one_step():
  assert registry.get("gated") is GatedAttention
  assert_lm_trains_one_step("gated", (("gate", "headwise"),), num_layers=1, vocab=50)
