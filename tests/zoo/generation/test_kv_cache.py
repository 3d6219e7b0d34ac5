"""The attention layer's KV cache: prefill + decode steps equal the parallel forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import registry
from layers.attention.config import AttentionConfig
from layers.attention.kv_cache import KVCache
from layers.attention.masks import Mask
from layers.block import TransformerBlock

D, T, B = 32, 9, 2
TOL = dict(atol=2e-5, rtol=2e-5)  # float32 rounding at activations of order 1

LAYERS = {
    "rope_gqa": dict(num_kv_heads=2),
    "alibi": dict(positional="alibi"),  # the distance bias: the flash path over the cache
    "window_mqa": dict(window=3, num_kv_heads=1),
    "rope_imag": dict(positional="rope_imag", num_kv_heads=2),  # widened query heads
    "nope_hybrid": dict(positional="nope_hybrid", options={"qk_norm": True}),
}


def layer(family="mha", **kw):
  cfg = AttentionConfig(d_model=D, num_heads=4, **kw)
  return registry.get(family)(cfg, rngs=nnx.Rngs(0))


def x_of(t=T, seed=0):
  return jax.random.normal(jax.random.key(seed), (B, t, D))


@nnx.jit(static_argnames=("n_prompt", "capacity", "step"))
def cached(attn, x, *, n_prompt, capacity=16, step=1, lengths=None, mask=None):
  """Prefill x[:, :n_prompt] (or each sequence's first lengths[b]), then the tokens after it in
  steps of `step` tokens (x[b, L_b + t] for sequence b) -> (outputs of the steps, cache)."""
  cache = attn.init_cache(x.shape[0], capacity)
  _, cache = attn.prefill(x[:, :n_prompt], cache, lengths=lengths, mask=mask)
  start = jnp.full((x.shape[0],), n_prompt) if lengths is None else lengths
  ys = []
  for t in range(0, x.shape[1] - n_prompt, step):
    idx = start[:, None] + t + jnp.arange(step)[None, :]
    y, cache = attn.decode(jnp.take_along_axis(x, idx[..., None], axis=1), cache)
    ys.append(y)
  return jnp.concatenate(ys, 1), cache


@nnx.jit
def full(attn, x, mask=None):
  return attn(x, mask=mask)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_prefill_then_steps_equal_the_parallel_forward(name):
  attn = layer(**LAYERS[name])
  x = x_of()
  ys, cache = cached(attn, x, n_prompt=4)
  np.testing.assert_allclose(ys, full(attn, x)[:, 4:], **TOL)
  np.testing.assert_array_equal(cache.lengths, [T, T])


def test_a_step_of_several_tokens_is_the_causal_block():
  attn = layer(num_kv_heads=2)
  x = x_of()
  y, _ = cached(attn, x, n_prompt=5, step=4)
  np.testing.assert_allclose(y, full(attn, x)[:, 5:], **TOL)


def test_prompts_of_different_lengths_continue_at_their_own_positions():
  """Sequence b's prompt has L_b real tokens (right-padded); its steps sit at L_b, L_b + 1 ..."""
  attn = layer(num_kv_heads=2)
  x = x_of()
  lengths = np.array([3, 6])
  padded = x * (jnp.arange(T)[None, :, None] < lengths[:, None, None] + 3)
  ys, _ = cached(attn, padded, n_prompt=6, lengths=jnp.asarray(lengths))
  want = full(attn, padded)  # causal: the zero padding after each sequence is never seen
  for b in range(B):
    np.testing.assert_allclose(ys[b], want[b, lengths[b]:lengths[b] + 3], **TOL)


def test_the_decode_kernel_path_equals_the_xla_path():
  """The layer's implementation picks the decode backend: the Triton kernel in interpret mode
  against XLA, on one cache (the same seed gives both layers the same weights)."""
  x = x_of()
  xla = layer(num_kv_heads=2, head_dim=16, implementation="xla")
  kernel = layer(num_kv_heads=2, head_dim=16, implementation="pallas_interpret")
  _, cache = xla.prefill(x[:, :5], xla.init_cache(B, 8))
  want, _ = xla.decode(x[:, 5:6], cache)
  got, _ = kernel.decode(x[:, 5:6], cache)  # eager: one interpreted kernel call
  np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_block_prefill_then_steps_equal_its_forward(norm_position):
  block = TransformerBlock(attention="mha", attn_cfg=AttentionConfig(d_model=D, num_heads=4),
                           mlp_dim=64, norm_position=norm_position, rngs=nnx.Rngs(0))
  x = x_of()
  y, _ = cached(block, x, n_prompt=5, step=2)
  np.testing.assert_allclose(y, full(block, x)[:, 5:], **TOL)


def test_cache_write_appends_per_sequence():
  cache = KVCache.zeros(2, 4, 1, 1)
  cache = cache.fill(jnp.ones((2, 2, 1, 1)), jnp.ones((2, 2, 1, 1)), jnp.array([1, 2]))
  cache = cache.write(jnp.full((2, 1, 1, 1), 5.0), jnp.full((2, 1, 1, 1), 5.0))
  np.testing.assert_array_equal(cache.k[:, :, 0, 0], [[1, 5, 0, 0], [1, 1, 5, 0]])
  np.testing.assert_array_equal(cache.lengths, [2, 3])


def test_families_without_a_decode_path_say_so():
  with pytest.raises(ValueError, match=r"attention='entmax' \(model.attention\) has no KV-cache"):
    layer("entmax").init_cache(B, 8)
  with pytest.raises(ValueError, match=r"positional='cope' \(model.positional\).*no KV-cache"):
    layer(positional="cope").init_cache(B, 8)
  with pytest.raises(ValueError, match="bidirectional"):
    layer(causal=False).init_cache(B, 8)


def test_sqa_decodes_through_the_mha_core():
  attn = layer("sqa")
  x = x_of()
  y, _ = cached(attn, x, n_prompt=5, step=4)
  np.testing.assert_allclose(y, full(attn, x)[:, 5:], **TOL)


def test_prefix_lm_prefill_then_causal_steps():
  """The prefix captioner's layers: a bidirectional prefix at prefill, causal steps after."""
  attn = layer(num_kv_heads=2)
  x = x_of()
  mask = Mask.prefix_lm(jnp.full((B,), 4, jnp.int32))
  y, _ = cached(attn, x, n_prompt=6, step=3, mask=mask)
  np.testing.assert_allclose(y, full(attn, x, mask)[:, 6:], **TOL)


def test_every_family_decodes_or_says_it_cannot():
  """The `mha` core decodes (sqa is mha with another head layout), and so do the families that
  change only the attention of transformed q, k, v (gated, sinks); every family that changes
  the rest of the core refuses with a message naming model.attention."""
  decodable = []
  for name in registry.names():
    try:
      attn = layer(name)
    except (ValueError, TypeError):  # needs options or another input shape: not a decoder
      continue
    refusal = attn.decode_refusal()
    if refusal is None:
      decodable.append(name)
    else:
      assert f"attention={name!r} (model.attention) has no KV-cache decode path" in refusal
  assert set(decodable) == {"mha", "sqa", "gated", "sinks"}


@pytest.mark.parametrize("family,options", [
    ("gated", {}), ("gated", {"gate": "headwise", "gate_bias_init": 0.5}),
    ("sinks", {"sink_init": 1.5}),
])
def test_output_families_prefill_then_steps_equal_the_parallel_forward(family, options):
  """The gate reads each new token's own input; the sink logit joins each new softmax."""
  attn = layer(family, num_kv_heads=2, options=options)
  x = x_of()
  ys, _ = cached(attn, x, n_prompt=5, step=2)
  np.testing.assert_allclose(ys, full(attn, x)[:, 5:], **TOL)


def test_sink_tokens_say_they_cannot_decode():
  with pytest.raises(ValueError, match=r"sink='tokens' has no KV-cache decode path"):
    layer("sinks", options={"sink": "tokens"}).init_cache(B, 8)
