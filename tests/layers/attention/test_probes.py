"""`probes`: recording a model's attention probabilities, and the sink mass computed from them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import Mask, probes
from layers.attention.mha import mha, mha_probs
from zoo.language.llama import DecoderLM, LMConfig


def _lm(attention="mha", num_layers=3, **kw):
  return DecoderLM(LMConfig(vocab_size=40, d_model=32, num_layers=num_layers, num_heads=4,
                            num_kv_heads=2, mlp_dim=64, attention=attention, **kw),
                   rngs=nnx.Rngs(0))


@pytest.mark.parametrize("attention", ["mha", "gated"])
def test_records_one_causal_distribution_per_layer(attention):
  model = _lm(attention)
  toks = jax.random.randint(jax.random.key(0), (2, 9), 0, 40)
  with probes.record_probs() as probs:
    logits = model(toks)
  assert len(probs) == 3
  for p in probs:
    assert p.shape == (2, 4, 9, 9)
    np.testing.assert_allclose(np.sum(p, -1), 1.0, rtol=1e-5)
    assert float(jnp.max(jnp.triu(p, 1))) == 0.0  # causal
  # Recording changes nothing, and stops with the block.
  np.testing.assert_array_equal(logits, model(toks))
  assert not probes.is_recording()


def test_probabilities_are_the_ones_the_core_used():
  ks = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(ks[0], (1, 7, 4, 8))
  k, v = (jax.random.normal(kk, (1, 7, 2, 8)) for kk in ks[1:])
  db = jnp.tile(jnp.array([[0.3, 1.0, 0.0]]), (4, 1))
  with probes.record_probs() as probs:
    out = mha(q, k, v, Mask.make_causal(), distance_bias=db, implementation="xla")
  (p,) = probs
  np.testing.assert_allclose(p, mha_probs(q, k, v, Mask.make_causal(), distance_bias=db),
                             atol=1e-7)
  vrep = jnp.repeat(v, 2, axis=2)
  np.testing.assert_allclose(jnp.einsum("bhqk,bkhd->bqhd", p, vrep), out, atol=1e-5)


def test_traced_calls_inside_the_block_are_refused():
  model = _lm()
  toks = jnp.zeros((1, 5), jnp.int32)
  with probes.record_probs(), pytest.raises(RuntimeError, match="eager"):
    nnx.jit(lambda m, t: m(t))(model, toks)


def test_sink_mass_is_the_mean_weight_on_the_first_key():
  t = 4
  # Layer 1: every query puts 0.5 on key 0 (query 0 all of it); layer 2: uniform causal.
  p1 = jnp.zeros((1, 2, t, t)).at[..., 0].set(0.5).at[..., 0, 0].set(1.0)
  p1 = p1.at[..., 1:, 1].add(0.5)
  p2 = jnp.tril(jnp.ones((t, t))) / jnp.arange(1, t + 1)[:, None]
  p2 = jnp.broadcast_to(p2, (1, 2, t, t))
  want = (0.5 + np.mean([1 / 2, 1 / 3, 1 / 4])) / 2  # query 0 excluded
  assert probes.sink_mass([p1, p2]) == pytest.approx(want)
  # Queries outside query_mask are not averaged.
  only_last = jnp.array([[False, False, False, True]])
  assert probes.sink_mass([p2], query_mask=only_last) == pytest.approx(1 / 4)
  with pytest.raises(ValueError, match="recorded"):
    probes.sink_mass([])
