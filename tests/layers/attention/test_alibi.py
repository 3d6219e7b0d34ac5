"""`alibi`: slopes, == an explicit dense bias, m = 0 is NoPE, causality, a DecoderLM step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, registry
from layers.attention.alibi import alibi_bias, alibi_slopes
from tests.numerics import rel_err
from zoo.language.llama import DecoderLM, LMConfig


def dense_attention(q, k, v, bias):
  """softmax(q k^T / sqrt(d) + bias + causal mask) v, MHA layout [B, T, H, D]."""
  t = q.shape[1]
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]) + bias
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def layer(positional="alibi", heads=4, **options):
  cfg = AttentionConfig(d_model=32, num_heads=heads, head_dim=8, positional=positional,
                        implementation="xla", options=options)
  return registry.get("mha")(cfg, rngs=nnx.Rngs(0))


def test_slopes_follow_the_alibi_rule():
  np.testing.assert_allclose(alibi_slopes(8), [2.0 ** (-h) for h in range(1, 9)])
  np.testing.assert_allclose(alibi_slopes(4), [2.0 ** (-2 * h) for h in range(1, 5)])
  # H = 6: the 4 slopes of 4 heads, then the odd-numbered slopes of 8 heads.
  np.testing.assert_allclose(alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


@pytest.mark.parametrize("heads", [4, 6])
def test_layer_equals_explicit_dense_bias(heads):
  lay = layer(heads=heads)
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10)) + jnp.array([[0], [5]])  # offsets: relative only
  out = nnx.jit(lambda m, x, p: m(x, positions=p))(lay, x, pos)
  q, k, v = lay.qkv(x)
  i = pos[:, None, :, None]
  j = pos[:, None, None, :]
  m = jnp.asarray(alibi_slopes(heads))[None, :, None, None]
  ref = lay.out(dense_attention(q, k, v, -m * (i - j)))  # the paper's -m (i - j), causal
  assert rel_err(out, ref) < 1e-5
  assert rel_err(alibi_bias(pos, pos, alibi_slopes(heads)),
                 -m * jnp.abs(i - j) * jnp.ones((2, heads, 10, 10))) == 0


def test_zero_slopes_is_nope():
  x = jax.random.normal(jax.random.key(2), (2, 9, 32))
  a, n = layer(alibi_slope_scale=0.0), layer("nope")
  f = nnx.jit(lambda m, x: m(x))
  assert rel_err(f(a, x), f(n, x)) < 1e-6
  assert rel_err(f(layer(), x), f(n, x)) > 1e-3  # the bias does something


def test_causal():
  lay = layer()
  x = jax.random.normal(jax.random.key(3), (1, 12, 32))
  x2 = x.at[:, 7:].set(jax.random.normal(jax.random.key(4), (1, 5, 32)))
  f = nnx.jit(lambda m, x: m(x))
  a, b = f(lay, x), f(lay, x2)
  assert rel_err(a[:, :7], b[:, :7]) < 1e-6 and float(jnp.abs(a[:, 7:] - b[:, 7:]).max()) > 1e-3


def test_bad_settings_name_them():
  with pytest.raises(ValueError, match="alibi_slope_scale"):
    layer(alibi_slope_scale=-1.0)
  cfg = AttentionConfig(d_model=32, num_heads=4, positional="alibi")
  with pytest.raises(ValueError, match=r"attention='gated'.*positional='alibi'"):
    registry.get("gated")(cfg, rngs=nnx.Rngs(0))


def lm_train_step(positional, **kw):
  """One SGD step of a tiny DecoderLM; returns (model, loss before, loss after, grads)."""
  cfg = LMConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 mlp_dim=64, positional=positional, implementation="xla", **kw)
  model = DecoderLM(cfg, rngs=nnx.Rngs(0))
  toks = jax.random.randint(jax.random.key(5), (2, 17), 0, 50)

  def loss_fn(m):
    logp = jax.nn.log_softmax(m(toks[:, :-1]), -1)
    return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], -1))

  step = nnx.jit(nnx.value_and_grad(loss_fn))
  loss, grads = step(model)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads))
  loss2, _ = step(model)
  assert np.isfinite(float(loss)) and float(loss2) < float(loss)
  return model, grads


def test_decoder_lm_trains_a_step():
  lm_train_step("alibi")
