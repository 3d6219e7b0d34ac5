"""`nope_hybrid`: τ = 1 NoPE is `nope`; RoPE layers are `rope`; τ_h and QK-Norm equal their
formulas; the schedule picks the encoding and window per layer; a DecoderLM step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, registry
from tests.layers.attention.test_alibi import dense_attention, lm_train_step
from tests.numerics import rel_err
from zoo.language.llama import DecoderLM, LMConfig

f = nnx.jit(lambda m, x: m(x))


def layer(positional="nope_hybrid", schedule=None, **options):
  cfg = AttentionConfig(d_model=32, num_heads=4, head_dim=8, positional=positional,
                        positional_schedule=schedule, implementation="xla", options=options)
  return registry.get("mha")(cfg, rngs=nnx.Rngs(0))


def test_unit_temperature_nope_layer_is_nope_and_rope_layer_is_rope():
  x = jax.random.normal(jax.random.key(0), (2, 9, 32))
  assert rel_err(f(layer(schedule="nope"), x), f(layer("nope"), x)) < 1e-6
  assert rel_err(f(layer(schedule="rope"), x), f(layer("rope"), x)) < 1e-6


def test_head_temperature_is_softmax_of_tau_scaled_logits():
  tau = [0.5, 1.0, 2.0, 4.0]
  lay = layer(schedule="nope", head_temperature=tau)
  x = jax.random.normal(jax.random.key(1), (2, 9, 32))
  q, k, v = lay.qkv(x)
  logits_q = q * jnp.asarray(tau)[:, None]  # softmax(τ_h q·k/√d) == scores of τ_h q
  ref = lay.out(dense_attention(logits_q, k, v, 0.0))
  assert rel_err(f(lay, x), ref) < 1e-5
  np.testing.assert_allclose(lay.positional.temperature(), tau, rtol=1e-6)


def test_qk_norm_equals_explicit_formula():
  lay = layer(schedule="nope", qk_norm=True, qk_norm_eps=1e-5)
  enc = lay.positional
  enc.q_norm[...] = jax.random.normal(jax.random.key(2), (8,))
  enc.k_norm[...] = jax.random.normal(jax.random.key(3), (8,))
  q = 3.0 * jax.random.normal(jax.random.key(4), (2, 5, 4, 8))
  k = jax.random.normal(jax.random.key(5), (2, 5, 4, 8))
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  gq, gk = nnx.jit(lambda e, q, k: e(q, k, pos, pos))(enc, q, k)
  rms = lambda a: np.sqrt(np.mean(np.asarray(a, np.float64) ** 2, -1, keepdims=True) + 1e-5)
  assert rel_err(gq, np.asarray(q) / rms(q) * np.asarray(enc.q_norm[...])) < 1e-5
  assert rel_err(gk, np.asarray(k) / rms(k) * np.asarray(enc.k_norm[...])) < 1e-5


def test_schedule_gives_each_layer_its_encoding_and_window():
  cfg = LMConfig(vocab_size=50, d_model=32, num_layers=6, num_heads=4, mlp_dim=64,
                 positional="nope_hybrid", positional_schedule="nope,rope,rope", rope_window=4)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  kinds = [b.attention.positional.kind for b in model.blocks]
  assert kinds == ["nope", "rope", "rope"] * 2
  for b, kind in zip(model.blocks, kinds):
    assert (b.attention.positional.rope is not None) == (kind == "rope")
    assert b.attention.cfg.window == (4 if kind == "rope" else None)
  default = LMConfig(vocab_size=50, num_layers=4, positional="nope_hybrid")
  assert [default.attention_config(l).window for l in range(4)] == [None] * 4
  from layers.attention.config import layer_positional
  assert [layer_positional(default.attention_config(l)) for l in range(4)] == [
      "rope", "rope", "rope", "nope"]


@pytest.mark.parametrize("kw,match", [
    (dict(positional="nope_hybrid", positional_schedule="nope,alibi"), "positional_schedule"),
    (dict(positional="rope", positional_schedule="nope,rope"), "positional_schedule"),
    (dict(positional="nope_hybrid", positional_schedule="rope", rope_window=0), "rope_window"),
])
def test_bad_model_settings_name_them(kw, match):
  with pytest.raises(ValueError, match=match):
    LMConfig(vocab_size=50, num_layers=2, **kw).attention_config(0)


@pytest.mark.parametrize("options,match", [
    (dict(head_temperature=0.0), "head_temperature"), (dict(head_temperature=[1, 2]),
                                                        "head_temperature"),
    (dict(qk_norm="yes"), "qk_norm")])
def test_bad_options_name_them(options, match):
  with pytest.raises(ValueError, match=match):
    layer(**options)


def test_decoder_lm_trains_a_step():
  model, grads = lm_train_step("nope_hybrid", positional_schedule="nope,rope")
  assert [b.attention.positional.kind for b in model.blocks] == ["nope", "rope"]
  assert float(jnp.abs(grads["blocks"][0]["attention"]["positional"]["log_tau"][...]).max()) > 0
