"""`lowrank_pool` (LAMA): the rank-r factorisation equals the explicit W_h = U_h V_h^T form
(outputs and gradients); zero context = mean pooling; padding ignored; gradients reach U, V, c
and the encoder; shapes; errors naming the setting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import pooling
from layers.attention.lowrank_pool import LowRankPool, lowrank_pool, lowrank_pool_full
from tests.numerics import rel_err

D, T, H = 16, 7, 3
_call = nnx.jit(lambda m, x, mask=None, lengths=None: m(x, mask=mask, lengths=lengths))


def _x(seed=0, b=2, t=T):
  return jax.random.normal(jax.random.key(seed), (b, t, D))


def _factors(rank, seed=1, per_head_context=False):
  ks = jax.random.split(jax.random.key(seed), 3)
  u, v = (jax.random.normal(k, (D, H, rank)) / D ** 0.25 for k in ks[:2])
  c = jax.random.normal(ks[2], (H, D) if per_head_context else (D,))
  return u, v, c


@pytest.mark.parametrize("rank,activation,per_head", [(1, "tanh", False), (3, "none", True)])
def test_factorised_equals_full_matrix_form(rank, activation, per_head):
  x = _x()
  u, v, c = _factors(rank, per_head_context=per_head)
  w = jnp.einsum("dhr,ehr->hde", u, v)  # W_h = U_h V_h^T, [H, d, d]
  assert int(np.linalg.matrix_rank(np.asarray(w[0]))) == rank
  lengths, mask = jnp.array([T, 4]), jnp.ones((2, T), bool).at[0, 1].set(False)
  kw = dict(mask=mask, lengths=lengths, activation=activation)

  def run(fn, *params):
    def loss(x, *params):
      y = fn(x, *params, **kw)
      return jnp.sum(jnp.sin(2.0 * y)), y
    argnums = tuple(range(len(params) + 1))
    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(x, *params)

  (_, y), (gx, gu, gv, gc) = run(lowrank_pool, u, v, c)
  (_, y_full), (gx_full, gw, gc_full) = run(lowrank_pool_full, w, c)
  assert y.shape == (2, H, D)
  assert rel_err(y, y_full) < 1e-5
  assert rel_err(gx, gx_full) < 1e-5 and rel_err(gc, gc_full) < 1e-5
  # dL/dU_h = dL/dW_h V_h and dL/dV_h = dL/dW_h^T U_h (chain rule through W = U V^T).
  assert rel_err(gu, jnp.einsum("hde,ehr->dhr", gw, v)) < 1e-5
  assert rel_err(gv, jnp.einsum("hde,dhr->ehr", gw, u)) < 1e-5


def test_zero_context_is_mean_pooling_in_every_head():
  head = LowRankPool(D, num_heads=H, rngs=nnx.Rngs(0))
  head.context[...] = jnp.zeros((D,))
  x = _x(2)
  lengths, mask = jnp.array([T, 3]), jnp.ones((2, T), bool).at[1, 0].set(False)
  for kw in (dict(), dict(lengths=lengths), dict(mask=mask, lengths=lengths)):
    want = jnp.tile(pooling.masked_mean(x, **kw), (1, H))  # H copies of the mean, concatenated
    assert rel_err(_call(head, x, **kw), want) < 1e-6


def test_padded_tokens_are_ignored():
  head = LowRankPool(D, num_heads=H, rank=2, num_classes=4, rngs=nnx.Rngs(0))
  x, junk = _x(3), 50.0 * _x(4)
  lengths = jnp.array([T, 2])
  mask = jnp.ones((2, T), bool).at[0, 3].set(False).at[0, 5].set(False)
  x_len = jnp.where(jnp.arange(T)[None, :, None] < lengths[:, None, None], x, junk)
  x_mask = jnp.where(mask[..., None], x, junk)
  assert rel_err(_call(head, x_len, lengths=lengths), _call(head, x, lengths=lengths)) < 1e-6
  assert rel_err(_call(head, x_mask, mask=mask), _call(head, x, mask=mask)) < 1e-6
  assert rel_err(_call(head, x_mask), _call(head, x)) > 1e-2
  a = nnx.jit(lambda m, x, lengths: m.weights(x, lengths=lengths))(head, x, lengths)
  np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-6)
  assert float(jnp.abs(a[1, :, 2:]).max()) == 0.0


def test_gradients_reach_u_v_context_and_the_encoder():
  head = LowRankPool(D, num_heads=H, rank=2, num_classes=3, proj_dim=8, rngs=nnx.Rngs(0))
  x, labels = _x(5), jnp.array([1, 2])

  def loss(m, x):
    logits = m(x, lengths=jnp.array([T, 5]))
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  g, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(head, x)
  for p in (g.u, g.v, g.context, g.proj.kernel, g.classifier.linear.kernel):
    assert bool(jnp.all(jnp.isfinite(p[...]))) and float(jnp.abs(p[...]).max()) > 0.0
  assert float(jnp.abs(gx).max()) > 0.0  # stop_gradient=False by default: the encoder trains
  frozen = LowRankPool(D, num_heads=H, num_classes=3, stop_gradient=True, rngs=nnx.Rngs(0))
  _, gx_frozen = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(frozen, x)
  assert float(jnp.abs(gx_frozen).max()) == 0.0


def test_shapes_params_and_axes():
  head = LowRankPool(D, num_classes=6, num_heads=2, rank=2, proj_dim=5, rngs=nnx.Rngs(0))
  x = _x(6, b=3)
  assert head.out_dim == 5 and _call(head, x).shape == (3, 6)
  assert nnx.jit(lambda m, x: m.pool(x))(head, x).shape == (3, 5)
  assert head.u.shape == head.v.shape == (D, 2, 2) and head.context.shape == (D,)
  assert head.u.get_metadata()["logical_axes"] == ("embed", "heads", None)
  plain = nnx.eval_shape(lambda: LowRankPool(D, num_classes=6, rngs=nnx.Rngs(0)))
  assert plain.out_dim == 4 * D  # 4 heads x d, concatenated
  # Per head 2 d r factor parameters (against d^2 for an explicit W_h), one context vector.
  assert pooling.num_params(plain) == 2 * D * 4 * 1 + D + (4 * D * 6 + 6)


def test_fully_padded_row_is_finite_zero():
  head = LowRankPool(D, rngs=nnx.Rngs(0))
  y = _call(head, _x(), lengths=jnp.array([T, 0]))
  assert bool(jnp.all(jnp.isfinite(y))) and float(jnp.abs(y[1]).max()) == 0.0


@pytest.mark.parametrize("kw,match", [
    (dict(num_heads=0), r"num_heads must be a positive integer"),
    (dict(rank=0), r"rank must be a positive integer"),
    (dict(rank=17), r"rank=17 exceeds d_model=16"),
    (dict(activation="relu"), r"activation='relu' is not one of \('tanh', 'none'\)"),
    (dict(proj_dim=-1), r"proj_dim must be a positive integer"),
    (dict(num_classes=0), r"num_classes must be a positive integer"),
])
def test_bad_settings_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    LowRankPool(D, rngs=nnx.Rngs(0), **kw)


def test_function_shape_errors():
  x = _x()
  u, v, c = _factors(2)
  with pytest.raises(ValueError, match=r"u and v must both be \[d_model=16, heads, rank\]"):
    lowrank_pool(x, u, v[:, :2], c)
  with pytest.raises(ValueError, match=r"context must be \[d_model=16\]"):
    lowrank_pool(x, u, v, c[:8])
  with pytest.raises(ValueError, match=r"w must be \[heads, d_model=16, d_model=16\]"):
    lowrank_pool_full(x, jnp.zeros((H, D, 8)), c)
