"""The decoder LM: causal, packing-exact, per-layer families, errors that name the setting."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.flash import api, masking
from tests.numerics import rel_err
from zoo.language.llama import DecoderLM, LMConfig
from zoo.model_config import parse_pattern
from zoo.registry import build_model


def tiny(**kw):
  base = dict(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
  base.update(kw)
  return DecoderLM(LMConfig(**base), rngs=nnx.Rngs(0))


GPT2_STYLE = dict(positional="nope", position_embedding="learned", norm="layernorm",
                  mlp_kind="gelu", use_bias=True, max_seq_len=32)


@pytest.mark.parametrize("style", [dict(positional="rope"), dict(positional="nope"), GPT2_STYLE],
                         ids=["rope", "nope", "gpt2"])
def test_causal(style):
  model = tiny(**style)
  toks = jax.random.randint(jax.random.key(0), (2, 16), 0, 50)
  toks2 = toks.at[:, 9:].set((toks[:, 9:] + 7) % 50)
  a, b = model(toks), model(toks2)
  np.testing.assert_allclose(a[:, :9], b[:, :9], rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(a[:, 9:] - b[:, 9:]).max()) > 1e-3


@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_pallas_kernel_path_equals_xla(positional):
  """implementation="pallas" (the interpret twin on CPU) gives the XLA path's logits and grads."""
  toks = jax.random.randint(jax.random.key(3), (2, 24), 0, 50)

  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(toks))[..., 0])

  outs = []
  for impl in ("xla", "pallas"):
    model = tiny(positional=positional, implementation=impl)
    outs.append(nnx.jit(lambda m: (m(toks), nnx.grad(loss)(m)))(model))
  (logits, grads), (p_logits, p_grads) = outs
  assert rel_err(p_logits, logits) < 1e-5
  for g, pg in zip(jax.tree.leaves(grads), jax.tree.leaves(p_grads)):
    assert rel_err(pg, g) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_auto_takes_the_gpu_kernel_and_matches_xla(positional):
  """On a GPU, implementation="auto" runs the compiled Pallas kernel inside the model."""
  q = jax.ShapeDtypeStruct((2, 256, 4, 8), jnp.float32)
  kv = jax.ShapeDtypeStruct((2, 256, 2, 8), jnp.float32)
  call = api.describe_call(q, kv, kv,
                           mask_args=masking.make_mask_args(2, 256, 256, is_causal=True))
  assert api.select_backend(call, "auto").name == "pallas_triton"
  toks = jax.random.randint(jax.random.key(3), (2, 256), 0, 50)

  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(toks))[..., 0])

  outs = []
  for impl in ("xla", "auto"):
    model = tiny(positional=positional, implementation=impl)
    outs.append(nnx.jit(lambda m: (m(toks), nnx.grad(loss)(m)))(model))
  (logits, grads), (p_logits, p_grads) = outs
  # Triton runs float32 dots as TF32 (10-bit mantissa) on the GPU.
  assert rel_err(p_logits, logits) < 5e-3
  for g, pg in zip(jax.tree.leaves(grads), jax.tree.leaves(p_grads)):
    assert rel_err(pg, g) < 2e-2


def test_packed_equals_separate_documents():
  model = tiny()
  d1 = jax.random.randint(jax.random.key(1), (1, 7), 0, 50)
  d2 = jax.random.randint(jax.random.key(2), (1, 5), 0, 50)
  packed = jnp.concatenate([d1, d2], 1)
  seg = jnp.array([[1] * 7 + [2] * 5])
  pos = jnp.array([list(range(7)) + list(range(5))])
  out = model(packed, segment_ids=seg, positions=pos)
  assert rel_err(out[:, :7], model(d1)) < 1e-5
  assert rel_err(out[:, 7:], model(d2)) < 1e-5


def test_learned_positions_are_added_at_the_input():
  model = tiny(**GPT2_STYLE)
  assert model.blocks[0].attention.qkv.q.bias is not None and model.blocks[0].mlp.up.bias is not None
  toks = jnp.array([[3, 4, 5, 6]])
  shifted = model(toks, positions=jnp.array([[1, 2, 3, 4]]))
  assert float(jnp.abs(shifted - model(toks)).max()) > 1e-3  # only the table carries position
  x = model.embed_tokens(toks, jnp.array([[0, 1, 2, 3]]))
  np.testing.assert_allclose(x, model.embed.embedding[...][toks] + model.position_embed.embedding[...][:4],
                             rtol=1e-6)


def test_untied_head_and_shapes():
  model = tiny(tie_embeddings=False, num_kv_heads=1)
  assert model(jnp.zeros((3, 4), jnp.int32)).shape == (3, 4, 50)
  assert model.head.kernel.shape == (32, 50)


def test_pattern_cycles_and_rejects_unknown_ids():
  assert parse_pattern("mha", 3) == ("mha",) * 3
  assert parse_pattern(["mha"], 2) == ("mha", "mha")
  with pytest.raises(ValueError, match=r"unknown attention family 'bogus' in model.attention"):
    parse_pattern("mha,bogus", 4)


def _model_cfg(**kw):
  c = ml_collections.ConfigDict(dict(name="llama_lm", vocab_size=50, d_model=32, num_layers=1,
                                     num_heads=4, num_kv_heads=4, mlp_dim=64))
  c.update(kw)
  return c


@pytest.mark.parametrize("kw,match", [
    (dict(num_kv_heads=3), r"model: num_heads=4 is not a multiple of num_kv_heads=3"),
    (dict(positional="alibi9"), r"unknown positional encoding 'alibi9' \(model.positional\)"),
    (dict(attention="nope_such"), r"model.attention"),
    (dict(name="gpt9"), r"unknown model 'gpt9' \(model.name\)"),
    (dict(bogus_field=1), r"model.bogus_field"),
    (dict(position_embedding="sinusoid"), r"model.position_embedding='sinusoid'"),
    (dict(norm_position="post"), r"model.norm_position"),
])
def test_config_errors_name_the_setting(kw, match):
  with pytest.raises(ValueError, match=match):
    build_model(_model_cfg(**kw))


def test_train_flops_per_token_counts_matmuls():
  model = tiny()
  per_layer = 32 * (4 * 8) + 2 * 32 * (2 * 8) + (4 * 8) * 32 + 3 * 32 * 64
  expected = 6 * (2 * per_layer + 50 * 32) + 12 * 2 * 4 * 8 * 16
  assert model.train_flops_per_token(16) == expected
