"""`cross_attention`: flash == reference (outputs, gradients, every padding form, GQA); padded
context positions change nothing; a zero-length context gives zeros; cached K/V == recompute;
a decode step == the row of the full call; the block is causal over x and full over the real
context; the gate; errors naming the setting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, registry
from layers.attention.cross_attention import (ContextKV, CrossAttention, cross_attention,
                                              cross_attention_decode, cross_attention_reference)
from layers.cross_block import CrossAttentionBlock
from tests.family_checks import assert_causal
from tests.numerics import rel_err

D, DC, T, S = 32, 24, 6, 9
LENGTHS = jnp.array([S, 4])
MASK = jnp.ones((2, S), bool).at[0, 1].set(False).at[0, 5].set(False).at[1, 7:].set(False)

_call = nnx.jit(lambda m, x, c=None, kv=None, lengths=None, mask=None: m(
    x, c, kv=kv, context_lengths=lengths, context_mask=mask))
_kv = nnx.jit(lambda m, c, lengths=None, mask=None: m.context_kv(
    c, context_lengths=lengths, context_mask=mask))
_decode = nnx.jit(lambda m, x, kv: m.decode(x, kv))


def _qkv(hq=4, hkv=2, t=T, s=S, d=8, seed=0, b=2):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (2.0 * jax.random.normal(ks[0], (b, t, hq, d)), jax.random.normal(ks[1], (b, s, hkv, d)),
          jax.random.normal(ks[2], (b, s, hkv, d)))


def _value_and_grads(fn, q, k, v):
  """fn(q, k, v) and the gradients of sum(sin(3 fn)) w.r.t. q, k, v, jitted."""
  def loss(q, k, v):
    y = fn(q, k, v)
    return jnp.sum(jnp.sin(3.0 * y)), y
  (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return y, g


def _inputs(seed=0, b=2, t=T, s=S):
  ks = jax.random.split(jax.random.key(seed), 2)
  return jax.random.normal(ks[0], (b, t, D)), jax.random.normal(ks[1], (b, s, DC))


def _cfg(**kw):
  return AttentionConfig(d_model=D, num_heads=4, num_kv_heads=kw.pop("num_kv_heads", 2), **kw)


def _layer(impl="xla", gate=None, alpha=None, seed=0, **kw):
  layer = CrossAttention(_cfg(implementation=impl, **kw), d_context=DC, gate=gate,
                         rngs=nnx.Rngs(seed))
  if alpha is not None:
    layer.alpha[...] = jnp.asarray(alpha, jnp.float32)
  return layer


def _block(impl="xla", gate=None, **kw):
  return CrossAttentionBlock(attention="mha", attn_cfg=_cfg(implementation=impl, **kw), mlp_dim=64,
                             d_context=DC, gate=gate, rngs=nnx.Rngs(1))


# ----------------------------------------------------------------------------- the function


def test_reference_is_the_equation():
  """softmax(q k^T / sqrt(d) + pad) v in numpy, kv heads repeated for GQA."""
  q, k, v = _qkv()
  got = jax.jit(lambda q, k, v: cross_attention_reference(
      q, k, v, context_lengths=LENGTHS, context_mask=MASK))(q, k, v)
  qn, kn, vn = (np.repeat(np.asarray(a, np.float64), r, axis=2)
                for a, r in ((q, 1), (k, 2), (v, 2)))
  s = np.einsum("bthd,bshd->bhts", qn, kn) / np.sqrt(8)
  valid = np.asarray(MASK) & (np.arange(S)[None] < np.asarray(LENGTHS)[:, None])
  s = np.where(valid[:, None, None, :], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhts,bshd->bthd", p, vn)
  assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("impl,hkv", [("xla", 1), ("pallas_interpret", 2)])
def test_flash_path_matches_reference_with_grads(impl, hkv):
  """MQA / GQA (the layer test below runs 4:2), both padding forms at once, and a third example
  with a zero-length context: its output row is 0 and its gradients are 0, never NaN."""
  q, k, v = _qkv(hkv=hkv, seed=1, b=3)
  kw = dict(context_lengths=jnp.array([S, 4, 0]),
            context_mask=jnp.concatenate([MASK, jnp.ones((1, S), bool)]))
  y, g = _value_and_grads(lambda q, k, v: cross_attention(q, k, v, implementation=impl, **kw),
                          q, k, v)
  y_ref, g_ref = _value_and_grads(lambda q, k, v: cross_attention_reference(q, k, v, **kw),
                                  q, k, v)
  assert rel_err(y, y_ref) < 1e-5
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5
  for out in (y, y_ref) + tuple(g) + tuple(g_ref):
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.abs(out[2]).max()) == 0.0
  assert float(jnp.abs(y[:2]).min(axis=(1, 3)).min()) > 0.0


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_compiled_kernels_on_a_gpu():
  """The Triton flash kernel (outputs and gradients) and the Triton decode kernel (query steps
  folded into the GQA group) against the reference, head_dim 64, odd lengths.
  Float32 dots may run as TF32 on the GPU, hence 5e-3."""
  q, k, v = _qkv(hq=8, hkv=2, t=37, s=101, d=64, seed=2)
  q = q / 4.0
  lengths = jnp.array([101, 50])
  mask = jax.random.bernoulli(jax.random.key(3), 0.8, (2, 101))
  kw = dict(context_lengths=lengths, context_mask=mask)

  for impl in ("pallas_triton", "auto"):
    y, g = _value_and_grads(
        lambda q, k, v: cross_attention(q, k, v, implementation=impl, **kw), q, k, v)
    y_ref, g_ref = _value_and_grads(
        lambda q, k, v: cross_attention_reference(q, k, v, **kw), q, k, v)
    assert rel_err(y, y_ref) < 5e-3
    for a, b in zip(g, g_ref):
      assert rel_err(a, b) < 5e-3
  # The Triton decode kernel tiles the cache in power-of-two blocks: S = 128 (S = 101: "auto").
  k2, v2 = (jnp.pad(a, ((0, 0), (0, 27), (0, 0), (0, 0))) for a in (k, v))
  for tq, impl, kk, vv in ((1, "pallas_triton", k2, v2), (3, "pallas_triton", k2, v2),
                           (1, "auto", k, v)):
    got = jax.jit(lambda q, k, v: cross_attention_decode(
        q, k, v, context_lengths=lengths, implementation=impl))(q[:, :tq], kk, vv)
    want = cross_attention_reference(q[:, :tq], k, v, context_lengths=lengths)
    assert rel_err(got, want) < 5e-3


# ----------------------------------------------------------------------------- the layer


def test_layer_matches_reference_twin_with_grads_to_params_and_inputs():
  layer, twin = _layer("xla", gate="tanh", alpha=0.7), _layer("reference", gate="tanh", alpha=0.7)
  x, c = _inputs(4)

  def run(m):
    def loss(m, x, c):
      y = m(x, c, context_lengths=LENGTHS, context_mask=MASK)
      return jnp.sum(jnp.sin(y)), y
    (_, y), g = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(m, x, c)
    return y, jax.tree.leaves(g)

  (y, g), (y_ref, g_ref) = run(layer), run(twin)
  assert rel_err(y, y_ref) < 1e-5
  assert len(g) == len(g_ref) == 7  # alpha, k, o, q, v kernels, then dx, dc
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < 1e-5 and float(jnp.abs(b).max()) > 0.0


def test_padded_context_positions_change_nothing():
  """Padding by lengths (example 1: positions >= 4) and by mask (example 0: 1 and 5, example 1:
  7, 8) together."""
  layer = _layer(gate="tanh", alpha=0.5)
  x, c = _inputs(5)
  kw = dict(lengths=LENGTHS, mask=MASK)
  real = MASK & (jnp.arange(S)[None] < LENGTHS[:, None])
  junk = 100.0 * jax.random.normal(jax.random.key(6), c.shape)
  c_junk = jnp.where(real[..., None], c, junk)
  y = _call(layer, x, c, **kw)
  assert rel_err(_call(layer, x, c_junk, **kw), y) == 0.0
  # No gradient reaches a padded position; every real position gets one.
  gc = nnx.jit(nnx.grad(lambda m, c: jnp.sum(jnp.sin(
      m(x, c, context_lengths=LENGTHS, context_mask=MASK))), argnums=1))(layer, c)
  gnorm = jnp.abs(gc).max(axis=-1)
  assert float(jnp.where(real, 0.0, gnorm).max()) == 0.0
  assert float(jnp.where(real, gnorm, 1.0).min()) > 0.0
  # ...and without the padding, the junk matters.
  no_pad = dict(lengths=jnp.array([S, S]), mask=jnp.ones((2, S), bool))
  assert rel_err(_call(layer, x, c_junk, **no_pad), _call(layer, x, c, **no_pad)) > 1e-2


def test_cached_context_kv_equals_recompute():
  layer = _layer(gate="tanh", alpha=0.5)
  x, c = _inputs(7)
  kv = _kv(layer, c, lengths=LENGTHS, mask=MASK)
  assert isinstance(kv, ContextKV) and kv.k.shape == (2, S, 2, 8)
  want = _call(layer, x, c, lengths=LENGTHS, mask=MASK)
  assert rel_err(_call(layer, x, kv=kv), want) < 1e-6


@pytest.mark.parametrize("kw", [dict(lengths=LENGTHS), dict(lengths=LENGTHS, mask=MASK)])
def test_decode_step_equals_the_row_of_the_full_call(kw):
  """decode_attention (lengths only), or the flash path with Tq = 1 (a context_mask)."""
  layer = _layer(gate="tanh", alpha=0.5)
  x, c = _inputs(9)
  kv = _kv(layer, c, **kw)
  full = _call(layer, x, kv=kv)
  steps = [_decode(layer, x[:, t:t + 1], kv) for t in range(T)]
  assert all(s.shape == (2, 1, D) for s in steps)
  assert rel_err(jnp.concatenate(steps, axis=1), full) < 1e-5
  assert rel_err(_decode(layer, x[:, 2:5], kv), full[:, 2:5]) < 1e-5
  # A zero-length context: the step's cross-attention update is 0 (decode_attention's rule).
  empty = _kv(layer, c, jnp.array([S, 0]), kw.get("mask"))
  assert float(jnp.abs(_decode(layer, x[:, :1], empty)[1]).max()) == 0.0


def test_gate_tanh_starts_closed_and_sigmoid_halves():
  x, c = _inputs(10)
  kw = dict(lengths=LENGTHS, mask=MASK)
  plain = _call(_layer(gate="tanh", alpha=20.0), x, c, **kw)  # tanh(20) = 1 in float32
  closed = _layer(gate="tanh")
  assert float(closed.alpha[...]) == 0.0 and closed.alpha.get_metadata()["logical_axes"] == ()
  assert float(jnp.abs(_call(closed, x, c, **kw)).max()) == 0.0
  assert rel_err(_call(_layer(gate="sigmoid"), x, c, **kw), 0.5 * plain) < 1e-6
  # The closed gate still learns: its gradient is not zero (the block test trains it open).


def test_parameters_and_logical_axes():
  layer = _layer(use_bias=True)
  assert layer.q.kernel.shape == (D, 4, 8) and layer.k.kernel.shape == (DC, 2, 8)
  assert layer.v.kernel.get_metadata()["logical_axes"] == ("embed", "kv_heads", "head_dim")
  assert layer.out.o.kernel.shape == (4, 8, D) and layer.alpha is None


def test_not_in_the_self_attention_registry():
  assert "cross_attention" not in registry.names()
  import layers.attention.cross_attention as mod
  assert "Not in the self-attention registry" in mod.__doc__


# ----------------------------------------------------------------------------- the block


def test_block_is_causal_over_x():
  block = _block()
  x, c = _inputs(11)
  assert_causal(block, d_model=D, length=T, cut=3, call=lambda m, x: _call(
      m, jnp.concatenate([x, x]), c, lengths=LENGTHS, mask=MASK)[:1])


def test_block_depends_on_every_real_context_position_and_no_padded_one():
  block = _block()
  x, c = _inputs(12)
  kv_call = nnx.jit(lambda m, x, kv: m(x, kv=kv))
  kv = nnx.jit(lambda m, c: m.context_kv(c, context_lengths=LENGTHS, context_mask=MASK))(block, c)
  base = kv_call(block, x, kv)
  assert rel_err(base, _call(block, x, c, lengths=LENGTHS, mask=MASK)) < 1e-6
  real = np.asarray(MASK & (jnp.arange(S)[None] < LENGTHS[:, None]))
  for b in range(2):
    for s in range(S):
      c2 = c.at[b, s].add(3.0)
      y = _call(block, x, c2, lengths=LENGTHS, mask=MASK)
      delta = np.asarray(jnp.abs(y - base).max(axis=-1))  # [B, T]
      if real[b, s]:  # every query of example b moves, no other example does
        assert delta[b].min() > 1e-4 and delta[1 - b].max() == 0.0, (b, s)
      else:
        assert delta.max() == 0.0, (b, s)


def test_block_with_zero_length_context_skips_cross_attention():
  block = _block()
  x, c = _inputs(13)
  y = _call(block, x, c, lengths=jnp.array([S, 0]), mask=MASK)

  def without_cross(m, x):
    h = x + m.attention(m.attn_norm(x))
    return h + m.mlp(m.mlp_norm(h))

  want = nnx.jit(without_cross)(block, x)
  assert rel_err(y[1], want[1]) < 1e-6 and rel_err(y[0], want[0]) > 1e-3


def test_block_keeps_transformer_block_names_and_trains():
  block = _block(gate="tanh")
  assert {"attn_norm", "attention", "mlp_norm", "mlp", "cross_norm", "cross_attention"} <= set(
      vars(block))
  x, c = _inputs(14)
  target = jax.random.normal(jax.random.key(15), x.shape)

  def loss(m):
    return jnp.mean((m(x, c, context_lengths=LENGTHS, context_mask=MASK) - target) ** 2)

  step = nnx.jit(nnx.value_and_grad(loss))
  first, _ = step(block)
  for _ in range(4):
    value, g = step(block)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))
    nnx.update(block, jax.tree.map(lambda p, d: p - 0.05 * d, nnx.state(block, nnx.Param), g))
  assert float(value) < float(first)
  assert float(jnp.abs(block.cross_attention.alpha[...])) > 0.0  # the gate opened


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw,match", [
    (dict(gate="relu"), r"gate='relu' is not one of \('tanh', 'sigmoid'\)"),
    (dict(d_context=0), r"d_context must be a positive integer"),
    (dict(window=4), r"window=4 .* not supported"),
    (dict(options={"gate": "tanh"}), r"takes no attention_options"),
])
def test_bad_settings_are_named(kw, match):
  cfg_kw = {k: kw.pop(k) for k in ("window", "options") if k in kw}
  with pytest.raises(ValueError, match=match):
    CrossAttention(_cfg(**cfg_kw), rngs=nnx.Rngs(0), **kw)


def test_bad_calls_are_named():
  layer = _layer()
  x, c = _inputs(16)
  kv = layer.context_kv(c)
  cases = [
      (lambda: layer(x, c[:1]), r"context batch \(1\) differs from the x batch \(2\)"),
      (lambda: layer(x, c[..., :16]), r"context must be \[batch, context length, d_context=24\]"),
      (lambda: layer(x[..., :16], c), r"x must be \[batch, seq, d_model=32\]"),
      (lambda: layer(x, c, context_lengths=jnp.array([3])),
       r"context_lengths must be \[batch\] = \(2,\)"),
      (lambda: layer(x, c, context_lengths=jnp.array([3.0, 2.0])),
       r"context_lengths must be integers"),
      (lambda: layer(x, c, context_lengths=jnp.array([S + 1, 2])),
       r"context_lengths must lie in \[0, context length 9\], got values in \[2, 10\]"),
      (lambda: layer(x, c, context_lengths=jnp.array([-1, 2])), r"must lie in \[0, context"),
      (lambda: layer(x, c, context_mask=MASK[:, :4]),
       r"context_mask must be \[batch, context length\] = \(2, 9\)"),
      (lambda: layer(x, c, context_mask=MASK.astype(jnp.int32)), r"context_mask must be boolean"),
      (lambda: layer(x), r"give exactly one of context .* and kv"),
      (lambda: layer(x, c, kv=kv), r"give exactly one of context"),
      (lambda: layer(x, kv=kv, context_lengths=LENGTHS), r"belong to context_kv"),
      (lambda: layer(x[:1], kv=kv), r"context batch \(2\) differs from the x batch \(1\)"),
      (lambda: layer.decode(x, ContextKV(kv.k[..., :4], kv.v)), r"kv.k must be .*head_dim=8"),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=match):
      fn()
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"context batch \(1\) differs from the query batch \(2\)"):
    cross_attention(q, k[:1], v[:1])
  with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of kv heads \(3\)"):
    cross_attention(q, jnp.zeros((2, S, 3, 8)), jnp.zeros((2, S, 3, 8)))
