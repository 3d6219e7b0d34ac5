"""`rope_imag` (RoPE++): the real / imaginary heads score Re / Im of the complex RoPE product;
with the imaginary heads' W_O rows at zero the layer is `rope` exactly; each imaginary head is
softmax(Im(q~ k~*)/sqrt(d)) over its query head's KV head; causality; a DecoderLM step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import AttentionConfig, registry
from layers.attention.rope import rope_frequencies
from layers.attention.rope_imag import imaginary_rotation
from tests.family_checks import assert_causal, assert_lm_trains_one_step
from tests.numerics import rel_err

D = 8


@nnx.jit
def _call(m, x):
  return m(x)


def _layer(positional="rope_imag", implementation="xla", **kw):
  cfg = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=D,
                        positional=positional, implementation=implementation, **kw)
  return registry.get("mha")(cfg, rngs=nnx.Rngs(0))


def _complex_scores(q, k, q_pos, k_pos, base=10_000.0):
  """sum_i q~_i conj(k~_i), z_i = x_i + i x_{i+d/2}, x~ = z e^{i pos theta}: [B, H, Tq, Tk]."""
  theta, _ = rope_frequencies(q.shape[-1], base)
  h = q.shape[-1] // 2
  rot = lambda x, pos: ((x[..., :h] + 1j * x[..., h:]).astype(jnp.complex64)
                        * jnp.exp(1j * pos[..., None, None] * theta))
  return jnp.einsum("bqhi,bkhi->bhqk", rot(q, q_pos), jnp.conj(rot(k, k_pos)))


def test_real_and_imaginary_heads_are_re_and_im_of_the_complex_score():
  ks = jax.random.split(jax.random.key(0), 2)
  q, k = jax.random.normal(ks[0], (2, 7, 2, D)), jax.random.normal(ks[1], (2, 7, 2, D))
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7)) + jnp.array([[0], [11]])
  enc = _layer().positional
  q2, kr = enc(q, k, pos, pos)
  assert q2.shape == (2, 7, 4, D)
  score = lambda qq: jnp.einsum("bqhd,bkhd->bhqk", qq, kr)
  c = _complex_scores(q, k, pos.astype(jnp.float32), pos.astype(jnp.float32))
  assert rel_err(score(q2[:, :, 0::2]), jnp.real(c)) < 1e-5
  assert rel_err(score(q2[:, :, 1::2]), jnp.imag(c)) < 1e-5
  # J (a, b) = (b, -a) is multiplication by -i, and commutes with the rotation
  z = jnp.arange(1.0, 9.0)
  np.testing.assert_array_equal(imaginary_rotation(z), [5, 6, 7, 8, -1, -2, -3, -4])


def test_layer_heads_and_imaginary_weight_zero_is_rope():
  x = jax.random.normal(jax.random.key(1), (1, 10, 32))  # assert_causal's shape: one compile
  imag, rope = _layer(), _layer("rope")
  assert imag.out.o.kernel.shape == (8, D, 32) and rope.out.o.kernel.shape == (4, D, 32)
  assert imag.train_flops_per_token(10) == 2 * rope.train_flops_per_token(10)
  q, k, v = rope.qkv(x)  # same init (projections are built before the encoding)
  np.testing.assert_array_equal(imag.qkv(x)[0], q)
  pos = jnp.arange(10)[None]
  mask = imag.resolve_mask(x, None, None)[0]
  heads = jax.jit(lambda q, k, v: imag.core(x, q, k, v, mask, pos))(q, k, v)  # [1, T, 8, D]
  # real heads == rope's heads; imaginary heads == softmax(Im(q~ k~*) / sqrt(d)) V_g(h)
  rope_heads = jax.jit(lambda q, k, v: rope.core(x, q, k, v, mask, pos))(q, k, v)
  assert rel_err(heads[:, :, 0::2], rope_heads) < 1e-6
  s = jnp.imag(_complex_scores(q, jnp.repeat(k, 2, axis=2), pos * 1.0, pos * 1.0)) / D ** 0.5
  s = jnp.where(jnp.tril(jnp.ones((10, 10), bool)), s, -jnp.inf)
  want = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), jnp.repeat(v, 2, axis=2))
  assert rel_err(heads[:, :, 1::2], want) < 1e-5
  # W_O rows of the imaginary heads at zero, the real rows = rope's W_O: exactly `rope`
  w = rope.out.o.kernel[...]
  imag.out.o.kernel[...] = jnp.stack([w, jnp.zeros_like(w)], axis=1).reshape(8, D, 32)
  y_rope = _call(rope, x)
  assert rel_err(_call(imag, x), y_rope) < 1e-6
  imag.out.o.kernel[...] = jnp.stack([w, w], axis=1).reshape(8, D, 32)
  assert rel_err(_call(imag, x), y_rope) > 1e-3  # the imaginary heads do something
  assert_causal(imag, call=_call)


def test_runs_on_the_pallas_kernel():
  x = jax.random.normal(jax.random.key(2), (1, 8, 32))
  a, b = _layer(), _layer(implementation="pallas_interpret")
  assert rel_err(_call(a, x), _call(b, x)) < 1e-5


def test_bad_settings_name_them():
  with pytest.raises(ValueError, match="even head_dim"):
    registry.get("mha")(AttentionConfig(d_model=28, num_heads=4, head_dim=7,
                                        positional="rope_imag"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rope_original_max_len"):
    _layer(rope_scaling=4.0, rope_scaling_type="yarn")
  cfg = AttentionConfig(d_model=32, num_heads=4, positional="rope_imag")
  with pytest.raises(ValueError, match=r"attention='gated'.*positional='rope_imag'"):
    registry.get("gated")(cfg, rngs=nnx.Rngs(0))


def test_decoder_lm_trains_one_step():
  assert_lm_trains_one_step("mha", num_layers=2, positional="rope_imag", implementation="xla")
