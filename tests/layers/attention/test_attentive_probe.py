"""`attentive_probe`: zero query = mean pooling; the authors' EP formulation; flash == reference
(outputs, gradients, every mask form); padding ignored; no gradient to the encoder; EP has
fewer parameters than the MHA probe; shapes; errors naming the setting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import pooling
from layers.attention.attentive_probe import (AttentiveProbe, efficient_probe,
                                              efficient_probe_reference)
from layers.linear import Linear
from tests.family_checks import assert_matches_reference
from tests.numerics import rel_err

D, T = 32, 9
_call = nnx.jit(lambda m, x, mask=None, lengths=None: m(x, mask=mask, lengths=lengths))


def _x(seed=0, b=2, t=T, d=D):
  return jax.random.normal(jax.random.key(seed), (b, t, d))


def _masks(b=2, t=T):
  lengths = jnp.array([t, 5])
  mask = jnp.ones((b, t), bool).at[0, 2].set(False).at[0, 6].set(False)
  return lengths, mask


@pytest.mark.parametrize("variant_kw", [dict(value_proj=False), dict()])
def test_one_zero_query_is_mean_pooling_over_real_tokens(variant_kw):
  probe = AttentiveProbe(D, num_queries=1, rngs=nnx.Rngs(0), **variant_kw)
  probe.queries[...] = jnp.zeros_like(probe.queries[...])
  x = _x()
  lengths, mask = _masks()
  values = x if probe.value is None else probe.value(x)
  for kw in (dict(lengths=lengths), dict(mask=mask), dict(mask=mask, lengths=lengths)):
    want = pooling.masked_mean(values, **kw)
    assert rel_err(_call(probe, x, **kw), want) < 1e-6
  if probe.value is None:  # no projection: exactly the mean of the tokens
    assert rel_err(_call(probe, x, lengths=lengths), pooling.masked_mean(x, lengths=lengths)) < 1e-6


def test_matches_the_authors_formulation():
  """poolings/ep.py, transliterated to numpy: q = cls [B,M,C], k = x, scale C^-1/2,
  v = (x W_V) viewed [B,N,M,C'/M], out = (attn[:, :, None] @ v).view(B, C')."""
  m, d_out = 4, 2
  probe = AttentiveProbe(D, num_queries=m, value_dim=D // d_out, rngs=nnx.Rngs(1))
  probe.queries[...] = jax.random.normal(jax.random.key(3), (m, D))  # a non-flat softmax
  x = _x(1)
  xn, q = np.asarray(x, np.float64), np.asarray(probe.queries[...], np.float64)
  w = np.asarray(probe.value.kernel[...], np.float64)
  b, n, c = xn.shape
  c2 = c // d_out
  attn = np.einsum("mc,bnc->bmn", q, xn) * c ** -0.5
  attn = np.exp(attn - attn.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  v = (xn @ w).reshape(b, n, m, c2 // m).transpose(0, 2, 1, 3)  # [B, M, N, C'/M]
  want = np.matmul(attn[:, :, None, :], v).reshape(b, c2)
  assert probe.out_dim == c2
  assert rel_err(_call(probe, x), want) < 1e-5


@pytest.mark.parametrize("impl,combine,heads", [("xla", "concat", 1), ("xla", "mean", 2),
                                               ("pallas_interpret", "concat", 2)])
def test_flash_path_matches_reference_with_grads(impl, combine, heads):
  ks = jax.random.split(jax.random.key(4), 3)
  x = _x(2, t=11)
  queries = 2.0 * jax.random.normal(ks[0], (4, D))
  values = jax.random.normal(ks[1], (2, 11, 16))
  lengths, mask = jnp.array([11, 6]), jax.random.bernoulli(ks[2], 0.7, (2, 11))
  kw = dict(num_heads=heads, combine=combine, mask=mask, lengths=lengths)

  def run(fn):
    def loss(x, q, v):
      y = fn(x, q, v)
      return jnp.sum(jnp.sin(3.0 * y)), y
    (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        x, queries, values)
    return y, g

  y, g = run(lambda x, q, v: efficient_probe(x, q, v, implementation=impl, **kw))
  y_ref, g_ref = run(lambda x, q, v: efficient_probe_reference(x, q, v, **kw))
  assert rel_err(y, y_ref) < 1e-5
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5


def test_mha_module_xla_matches_reference_twin():
  kw = dict(num_classes=3, variant="mha", num_queries=2, num_heads=4, mlp_dim=16,
            stop_gradient=False)
  layer = AttentiveProbe(D, implementation="xla", rngs=nnx.Rngs(0), **kw)
  twin = AttentiveProbe(D, implementation="reference", rngs=nnx.Rngs(0), **kw)
  assert_matches_reference(layer, twin, _x(5), tol=1e-5)


@pytest.mark.parametrize("variant_kw", [dict(variant="ep", num_queries=4),
                                        dict(variant="mha", num_heads=4)])
def test_padded_tokens_are_ignored(variant_kw):
  probe = AttentiveProbe(D, rngs=nnx.Rngs(0), **variant_kw)
  x = _x(6)
  lengths, mask = _masks()
  junk = 100.0 * _x(7)
  x_len = jnp.where(jnp.arange(T)[None, :, None] < lengths[:, None, None], x, junk)
  x_mask = jnp.where(mask[..., None], x, junk)
  assert rel_err(_call(probe, x_len, lengths=lengths), _call(probe, x, lengths=lengths)) < 1e-6
  assert rel_err(_call(probe, x_mask, mask=mask), _call(probe, x, mask=mask)) < 1e-6
  # ...and real tokens do matter.
  assert rel_err(_call(probe, x_mask), _call(probe, x)) > 1e-2


class _Encoder(nnx.Module):

  def __init__(self, rngs):
    self.embed = Linear(4, D, axes=(None, "embed"), rngs=rngs)

  def __call__(self, inputs):
    return jnp.tanh(self.embed(inputs))


class _Classifier(nnx.Module):
  """A tiny encoder with a pooling head on top."""

  def __init__(self, head):
    self.enc, self.head = _Encoder(nnx.Rngs(0)), head

  def __call__(self, inputs, **kw):
    return self.head(self.enc(inputs), **kw)


def test_no_gradient_reaches_the_encoder_of_a_probe():
  inputs = jax.random.normal(jax.random.key(8), (2, T, 4))
  labels = jnp.array([0, 2])
  lengths = jnp.array([T, 4])

  def grads(stop_gradient, variant="ep"):
    model = _Classifier(AttentiveProbe(D, num_classes=3, variant=variant, num_queries=4,
                                       stop_gradient=stop_gradient, rngs=nnx.Rngs(1)))

    def loss(model):
      logits = model(inputs, lengths=lengths)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    return nnx.jit(nnx.grad(loss))(model)

  frozen, tuned, frozen_mha = grads(True), grads(False), grads(True, "mha")
  assert float(jnp.abs(frozen.enc.embed.kernel[...]).max()) == 0.0
  assert float(jnp.abs(frozen_mha.enc.embed.kernel[...]).max()) == 0.0
  assert float(jnp.abs(tuned.enc.embed.kernel[...]).max()) > 0.0
  for g in (frozen.head, frozen_mha.head):  # the probe itself trains
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))
    assert float(jnp.abs(g.queries[...]).max()) > 0.0


def test_ep_has_fewer_parameters_than_the_mha_probe():
  d = 64
  build = lambda **kw: nnx.eval_shape(lambda: AttentiveProbe(d, num_classes=10,
                                                            rngs=nnx.Rngs(0), **kw))
  ep = build()  # 32 queries, W_V: d x d
  mha = build(variant="mha")  # 1 query, W_Q, W_K, W_V, W_O: 4 d^2
  map_ = build(variant="mha", mlp_dim=4 * d)
  n_ep, n_mha, n_map = (pooling.num_params(m) for m in (ep, mha, map_))
  assert n_ep == 32 * d + d * d + (d * 10 + 10)
  assert n_mha == d + 4 * d * d + (d * 10 + 10)
  assert n_ep < n_mha < n_map


@pytest.mark.parametrize("kw,out_dim", [
    (dict(), D), (dict(combine="mean", num_heads=4, value_dim=16), 16),
    (dict(variant="mha", num_queries=3, mlp_dim=8), D)])
def test_shapes(kw, out_dim):
  head = AttentiveProbe(D, num_classes=7, rngs=nnx.Rngs(0), **kw)
  x = _x(9, b=3)
  assert head.out_dim == out_dim and _call(head, x).shape == (3, 7)
  pooled = nnx.jit(lambda m, x: m.pool(x))(head, x)
  assert pooled.shape == (3, out_dim)
  if kw.get("variant", "ep") == "ep":
    a = nnx.jit(lambda m, x: m.attention_weights(x))(head, x)
    assert a.shape == (3, head.num_queries, head.num_heads, T)
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-5)
    assert head.queries.get_metadata()["logical_axes"] == ("queries", "embed")


def test_fully_padded_row_is_finite_zero():
  probe = AttentiveProbe(D, num_queries=4, rngs=nnx.Rngs(0))
  y = _call(probe, _x(), lengths=jnp.array([T, 0]))
  assert bool(jnp.all(jnp.isfinite(y))) and float(jnp.abs(y[1]).max()) == 0.0


@pytest.mark.parametrize("kw,match", [
    (dict(variant="gated"), r"variant='gated' is not one of \('ep', 'mha'\)"),
    (dict(combine="sum"), r"combine='sum' is not one of"),
    (dict(num_queries=0), r"num_queries must be a positive integer"),
    (dict(num_heads=3), r"d_model=32 is not divisible by num_heads=3"),
    (dict(num_queries=5), r"value_dim=32 must be divisible by num_heads x num_queries = 1 x 5"),
    (dict(value_proj=False, value_dim=16), r"value_proj=False .* value_dim must be d_model=32"),
    (dict(mlp_dim=8), r"mlp_dim is an option of variant='mha'"),
    (dict(variant="mha", combine="mean"), r"options of variant='ep'"),
    (dict(implementation="fastest"), r"implementation='fastest' is not one of"),
    (dict(num_classes=0), r"num_classes must be a positive integer"),
    (dict(stop_gradient="yes"), r"stop_gradient must be true or false"),
])
def test_bad_settings_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    AttentiveProbe(D, rngs=nnx.Rngs(0), **kw)


def test_function_shape_errors():
  x = _x()
  with pytest.raises(ValueError, match=r"queries must be \[num_queries, d_model=32\]"):
    efficient_probe(x, jnp.zeros((2, 16)), x)
  with pytest.raises(ValueError, match=r"values must be \[batch=2, tokens=9, value_dim\]"):
    efficient_probe(x, jnp.zeros((2, D)), x[:, :4])


def test_a_few_steps_lower_the_loss():
  """Frozen random features, labels from which half of the tokens carries a signal: EP learns."""
  ks = jax.random.split(jax.random.key(10), 2)
  labels = jax.random.randint(ks[0], (16,), 0, 2)
  x = jax.random.normal(ks[1], (16, T, D)).at[:, 0, 0].add(3.0 * (2 * labels - 1))
  probe = AttentiveProbe(D, num_classes=2, num_queries=4, rngs=nnx.Rngs(0))

  def loss(m):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(m(x)), labels[:, None], 1))

  step = nnx.jit(nnx.value_and_grad(loss))
  first, _ = step(probe)
  for _ in range(30):
    value, g = step(probe)
    params = nnx.state(probe, nnx.Param)
    nnx.update(probe, jax.tree.map(lambda p, d: p - 0.5 * d, params, g))
  assert float(value) < 0.8 * float(first)
