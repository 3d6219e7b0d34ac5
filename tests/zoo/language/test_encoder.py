"""The ModernBERT-style encoder and its masked-LM task."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from tests.numerics import rel_err
from zoo.language.encoder import EncoderConfig, TextEncoder
from zoo.registry import build_model
from zoo.training.tasks import MLMTask
from zoo.training.tasks.mlm import mask_tokens

V = 41  # 40 data ids + [MASK]


def tiny(**kw):
  base = dict(vocab_size=V, d_model=32, num_layers=3, num_heads=4, mlp_dim=64, local_window=4,
              global_every=3)
  base.update(kw)
  return TextEncoder(EncoderConfig(**base), rngs=nnx.Rngs(0))


def test_bidirectional():
  model = tiny()
  toks = jax.random.randint(jax.random.key(0), (2, 12), 0, 40)
  a = model(toks)
  b = model(toks.at[:, 9:].set((toks[:, 9:] + 5) % 40))
  assert float(jnp.abs(a[:, :9] - b[:, :9]).max()) > 1e-4  # earlier tokens see later ones


def test_layer_schedule_global_every_third_with_local_windows():
  cfg = EncoderConfig(vocab_size=V, num_layers=6, local_window=128)
  kinds = [(cfg.attention_config(l).window, cfg.attention_config(l).rope_base) for l in range(6)]
  assert kinds == [(None, 160_000.0), ((64, 64), 10_000.0), ((64, 64), 10_000.0)] * 2


def test_local_layers_see_only_their_window():
  """With every layer local (after a global first layer that we bypass), tokens past the
  window do not reach a position: checked on one local block directly."""
  model = tiny(num_layers=2, global_every=2, local_window=4)
  block = model.blocks[1]
  x = jax.random.normal(jax.random.key(1), (1, 12, 32))
  y1 = block(x)
  y2 = block(x.at[:, 9:].add(3.0))
  np.testing.assert_allclose(y1[:, :7], y2[:, :7], atol=1e-6)  # 6 + 2 < 9: out of reach
  assert float(jnp.abs(y1[:, 7:] - y2[:, 7:]).max()) > 1e-3


def test_packed_equals_separate_documents():
  model = tiny()
  d1 = jax.random.randint(jax.random.key(1), (1, 7), 0, 40)
  d2 = jax.random.randint(jax.random.key(2), (1, 5), 0, 40)
  packed = jnp.concatenate([d1, d2], 1)
  seg = jnp.array([[1] * 7 + [2] * 5])
  pos = jnp.array([list(range(7)) + list(range(5))])
  out = model(packed, segment_ids=seg, positions=pos)
  assert rel_err(out[:, :7], model(d1)) < 1e-5
  assert rel_err(out[:, 7:], model(d2)) < 1e-5


def test_pool_mean_over_real_tokens_and_first():
  model = tiny()
  f = jax.random.normal(jax.random.key(3), (2, 5, 32))
  valid = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  np.testing.assert_allclose(model.pool(f, valid)[0], f[0, :3].mean(0), rtol=1e-5)
  assert jnp.array_equal(tiny(pool="first").pool(f, valid), f[:, 0])


def test_mask_tokens_rates_and_padding():
  toks = jnp.full((64, 256), 7, jnp.int32)
  real = jnp.arange(256)[None, :] < 200
  corrupted, chosen = mask_tokens(jax.random.key(0), toks, jnp.broadcast_to(real, toks.shape), 40)
  assert not bool(jnp.any(chosen[:, 200:]))
  n = 64 * 200
  rate = float(jnp.mean(chosen[:, :200]))
  assert abs(rate - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5  # within 4 standard errors
  c = corrupted[chosen]
  m = c.size
  assert abs(float(jnp.mean(c == 40)) - 0.8) < 4 * (0.8 * 0.2 / m) ** 0.5
  kept = 0.1 + 0.1 / 40  # kept, or drawn as itself
  assert abs(float(jnp.mean(c == 7)) - kept) < 4 * (kept * (1 - kept) / m) ** 0.5
  assert bool(jnp.all(corrupted[~chosen] == 7))


def test_mlm_loss_is_on_chosen_tokens_only_and_training_lowers_it():
  model = tiny()
  task = MLMTask()
  toks = jax.random.randint(jax.random.key(4), (4, 16), 3, 40)
  seg = jnp.ones((4, 16), jnp.int32).at[:, 12:].set(0)
  batch = {"inputs": toks, "segment_ids": seg, "positions": jnp.broadcast_to(jnp.arange(16), (4, 16))}
  rng = jax.random.key(1)
  loss, sums = task(model, batch, rng)
  corrupted, chosen = mask_tokens(rng, toks, seg > 0, model.mask_token_id)
  assert float(sums["weight_sum"]) == float(jnp.sum(chosen)) > 0
  logits = model(corrupted, segment_ids=seg, positions=batch["positions"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, toks)
  np.testing.assert_allclose(loss, jnp.sum(ce * chosen) / jnp.sum(chosen), rtol=1e-5)

  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, i):
    def f(m):
      return task(m, batch, jax.random.fold_in(rng, i))[0]
    l, g = nnx.value_and_grad(f)(model)
    opt.update(model, g)
    return l

  losses = [float(step(model, opt, i)) for i in range(40)]
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_config_errors_name_the_field():
  cfg = ml_collections.ConfigDict(dict(name="modernbert", vocab_size=V, d_model=32, num_layers=1,
                                       num_heads=4, mlp_dim=64))
  assert isinstance(build_model(cfg), TextEncoder)
  cfg.colour = "red"
  with pytest.raises(ValueError, match=r"model.colour"):
    build_model(cfg)
  with pytest.raises(ValueError, match=r"model.vocab_size is not set"):
    build_model(ml_collections.ConfigDict(dict(name="modernbert")))
  with pytest.raises(ValueError, match=r"model.pool"):
    EncoderConfig(vocab_size=V, pool="max")
  with pytest.raises(ValueError, match=r"model.global_every"):
    EncoderConfig(vocab_size=V, global_every=0)


# Knobs outside encoders need (BERT, CLIP and SigLIP text towers) -----------------------

def test_first_block_has_no_attention_norm_under_pre_norm_only():
  blocks = tiny().blocks
  assert blocks[0].attn_norm is None and blocks[1].attn_norm is not None
  assert EncoderConfig(vocab_size=V, norm_position="post").first_attn_norm is True


def test_bert_style_post_norm_encoder_is_the_formula():
  """h_0 = LN(E[tok] + P[pos] + S[type]); h = LN(x + Attn(x)), y = LN(h + MLP(h)); no final
  norm."""
  model = tiny(norm_position="post", final_norm=False, position_embedding="learned",
               positional="nope", type_vocab_size=2, mlp_kind="gelu", mlp_activation="gelu_exact",
               use_bias=True, head_bias=True, global_every=1, num_layers=2, max_seq_len=16)
  toks = jax.random.randint(jax.random.key(5), (2, 10), 0, 40)
  types = jnp.zeros_like(toks).at[:, 5:].set(1)
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  x = model.embed_norm(model.embed(toks) + model.position_embed(pos) + model.type_embed(types))
  for blk in model.blocks:
    h = blk.attn_norm(x + blk.attention(x))
    x = blk.mlp_norm(h + blk.mlp(h))
  np.testing.assert_allclose(model.encode(toks, token_type_ids=types), x, atol=1e-5)
  assert model.head_dense.bias is not None
  # token_type_ids=None means all zeros.
  np.testing.assert_array_equal(model.encode(toks),
                                model.encode(toks, token_type_ids=jnp.zeros_like(toks)))


def test_causal_text_tower_is_causal():
  model = tiny(causal=True, embed_norm=False, position_embedding="learned", positional="nope",
               mlm_head=False, global_every=1, max_seq_len=16)
  toks = jax.random.randint(jax.random.key(6), (2, 12), 0, 40)
  a = model.encode(toks)
  b = model.encode(toks.at[:, 8:].set((toks[:, 8:] + 5) % 40))
  np.testing.assert_array_equal(a[:, :8], b[:, :8])
  assert float(jnp.abs(a[:, 8:] - b[:, 8:]).max()) > 1e-3


def test_pool_last_argmax_eos_pick_their_positions():
  f = jax.random.normal(jax.random.key(7), (2, 6, 32))
  toks = jnp.array([[5, 9, 39, 3, 39, 0], [1, 2, 3, 4, 5, 38]])
  cfg = EncoderConfig(vocab_size=V, d_model=32, num_layers=1, num_heads=4, mlp_dim=64)
  pool = lambda **kw: nnx.eval_shape(
      lambda: TextEncoder(dataclasses.replace(cfg, **kw), rngs=nnx.Rngs(0))).pool
  np.testing.assert_array_equal(pool(pool="last")(f), f[:, -1])
  np.testing.assert_array_equal(pool(pool="argmax")(f, tokens=toks), f[[0, 1], [2, 5]])
  np.testing.assert_array_equal(pool(pool="eos", eos_id=3)(f, tokens=toks), f[[0, 1], [3, 2]])
  with pytest.raises(ValueError, match="pass tokens"):
    pool(pool="argmax")(f)


def test_new_knob_errors_name_the_field():
  for kw, field in [(dict(norm_position="mid"), "model.norm_position"),
                    (dict(norm_position="post", first_attn_norm=False), "model.first_attn_norm"),
                    (dict(position_embedding="sinusoidal"), "model.position_embedding"),
                    (dict(pool="eos"), "model.eos_id"),
                    (dict(head_activation="tanh"), "model.head_activation")]:
    with pytest.raises(ValueError, match=field):
      EncoderConfig(vocab_size=V, **kw)
  with pytest.raises(ValueError, match="model.type_vocab_size=0"):
    tiny(mlm_head=False, num_layers=1).encode(jnp.zeros((1, 4), jnp.int32),
                                              token_type_ids=jnp.zeros((1, 4), jnp.int32))
