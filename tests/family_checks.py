"""Checks every attention family's tests share (FAMILIES.md, "Common tests")."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.language.llama import DecoderLM, LMConfig


def assert_causal(layer, *, d_model: int = 32, length: int = 10, cut: int = 6, call=None):
  """Outputs before `cut` ignore inputs from `cut` on; later outputs do depend on them."""
  call = call or nnx.jit(lambda m, x: m(x))
  x = jax.random.normal(jax.random.key(1), (1, length, d_model))
  x2 = x.at[:, cut:].set(jax.random.normal(jax.random.key(2), (1, length - cut, d_model)))
  y, y2 = call(layer, x), call(layer, x2)
  np.testing.assert_allclose(y[:, :cut], y2[:, :cut], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(y[:, cut:] - y2[:, cut:]).max()) > 1e-3


def assert_lm_trains_one_step(attention: str, options=(), *, num_layers: int = 1,
                              vocab: int = 50, **model_kw) -> DecoderLM:
  """A tiny DecoderLM with this family: one jitted grad step, finite loss and gradients."""
  model = DecoderLM(LMConfig(vocab_size=vocab, d_model=32, num_layers=num_layers, num_heads=4,
                             num_kv_heads=2, mlp_dim=64, attention=attention,
                             attention_options=tuple(options), **model_kw), rngs=nnx.Rngs(0))
  toks = jax.random.randint(jax.random.key(0), (2, 12), 0, vocab)

  def loss_fn(m):
    logits = m(toks[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, 1:, None], -1))

  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
  assert np.isfinite(float(loss))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  return model


def assert_matches_reference(layer, ref, x, *, tol: float = 1e-5, call=None):
  """Fast-path layer vs its implementation="reference" twin: outputs and every parameter
  gradient within `tol` relative error. Returns (grads, reference grads)."""
  from tests.numerics import rel_err
  call = call or nnx.jit(lambda m, x: m(x))
  assert rel_err(call(layer, x), call(ref, x)) < tol
  vg = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(x)))))
  (_, g), (_, g_ref) = vg(layer), vg(ref)
  leaves, leaves_ref = jax.tree.leaves(g), jax.tree.leaves(g_ref)
  assert len(leaves) == len(leaves_ref)
  for a, b in zip(leaves, leaves_ref):
    assert rel_err(a, b) < tol
  return g, g_ref


def random_qkv(hq: int = 4, hkv: int = 2, t: int = 13, d: int = 8, seed: int = 0, q_scale=2.0):
  """q [2, t, hq, d] (scaled so softmax rows are not flat), k and v [2, t, hkv, d]."""
  ks = jax.random.split(jax.random.key(seed), 3)
  return (q_scale * jax.random.normal(ks[0], (2, t, hq, d)),
          jax.random.normal(ks[1], (2, t, hkv, d)), jax.random.normal(ks[2], (2, t, hkv, d)))
