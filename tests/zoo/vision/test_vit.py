"""ViT: shapes, patch order, sin-cos table, non-causality, EET token pruning, heads, training,
FLOPs and errors that name the setting."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from zoo.vision.vit import (VARIANTS, ViT, ViTConfig, build, keep_count, patchify,
                            posemb_sincos_2d)

TINY = dict(num_classes=5, image_size=16, patch_size=4, d_model=32, num_layers=1, num_heads=4,
            mlp_dim=64)


def tiny(**kw):
  """A tiny ViT. Built eagerly (its initialisers compile once per shape, shared across tests;
  under jit the whole init graph would compile per config) and run under jit."""
  return ViT(ViTConfig(**{**TINY, **kw}), rngs=nnx.Rngs(0))


def abstract(**kw):
  return nnx.eval_shape(lambda: ViT(ViTConfig(**{**TINY, **kw}), rngs=nnx.Rngs(0)))


@nnx.jit
def logits_and_tokens(model, x):
  return model(x), model.encode(x)


@nnx.jit
def encode(model, x):
  return model.encode(x, return_indices=True)


def images(b=2, h=16, w=16, c=3, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, h, w, c))


@pytest.mark.parametrize("kw, tokens", [
    (dict(variant="Ti", d_model=48, mlp_dim=32), 1 + 16),                    # 3 heads
    (dict(variant="S", d_model=24, patch_size=8, pool="gap", image_size=(16, 24)), 6),  # 6 heads
    (dict(patch_size=16, image_size=32, pool="lowrank_pool", posemb="sincos2d", num_layers=2,
          attention="mha,gated"), 4),
    (dict(pool="attentive_probe", class_token=True, num_kv_heads=2, attention="sqa"), 17),
])
def test_forward_shapes(kw, tokens):
  model = tiny(**kw)
  cfg = model.cfg
  x = images(h=cfg.image_size[0], w=cfg.image_size[1])
  logits, toks = logits_and_tokens(model, x)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert toks.shape == (2, tokens, cfg.d_model)


def test_variant_table_and_overrides():
  for name, (d, layers, mlp, heads) in VARIANTS.items():
    cfg = ViTConfig(num_classes=10, variant=name)
    assert (cfg.d_model, cfg.num_layers, cfg.mlp_dim, cfg.num_heads) == (d, layers, mlp, heads)
  assert (ViTConfig(num_classes=10, variant="Ti").d_model,
          ViTConfig(num_classes=10, variant="B").num_heads,
          ViTConfig(num_classes=10, variant="L").num_layers) == (192, 12, 24)
  cfg = ViTConfig(num_classes=10, variant="L", num_layers=2, mlp_dim=8)
  assert (cfg.d_model, cfg.num_layers, cfg.mlp_dim, cfg.num_heads) == (1024, 2, 8, 16)


def test_sincos2d_values():
  pe = np.asarray(posemb_sincos_2d(2, 3, 8))  # frequencies (1, 1e-4)
  assert pe.shape == (6, 8)
  y, x = 1, 2  # row-major: token 5
  w = np.array([1.0, 1e-4])
  want = np.concatenate([np.sin(x * w), np.cos(x * w), np.sin(y * w), np.cos(y * w)])
  np.testing.assert_allclose(pe[5], want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(pe[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-7)
  # In the model: with a zero patch embedding the input tokens are exactly the table.
  model = tiny(posemb="sincos2d", pool="gap", image_size=(8, 12))
  model.patch_embed.kernel[...] = jnp.zeros_like(model.patch_embed.kernel[...])
  np.testing.assert_allclose(model.embed(images(h=8, w=12)),
                             np.broadcast_to(posemb_sincos_2d(2, 3, 32), (2, 6, 32)), atol=1e-6)


def test_patch_order_one_bright_pixel():
  """A single bright pixel changes only its own patch's token (grid 2 x 3, row-major)."""
  model = tiny(image_size=(8, 12))
  base = jnp.zeros((1, 8, 12, 3))
  z0 = model.embed(base)
  for (r, c, ch) in [(0, 0, 0), (5, 2, 1), (3, 11, 2), (7, 9, 0)]:
    z = model.embed(base.at[0, r, c, ch].set(10.0))
    changed = np.nonzero(np.abs(np.asarray(z - z0)).max(-1)[0] > 1e-6)[0].tolist()
    assert changed == [1 + (r // 4) * 3 + c // 4], (r, c)  # token 0 is the class token
    # The change is that pixel's row of the (row, col, channel) patch kernel.
    np.testing.assert_allclose(z[0, changed[0]] - z0[0, changed[0]],
                               10.0 * model.patch_embed.kernel[r % 4, c % 4, ch], rtol=1e-5,
                               atol=1e-5)
  patches = patchify(jnp.arange(8 * 12 * 3.0).reshape(1, 8, 12, 3), 4)
  np.testing.assert_array_equal(patches[0, 4], jnp.arange(8 * 12 * 3.0).reshape(8, 12, 3)[4:, 4:8])


def test_non_causal():
  model = tiny(pool="gap")
  x = images(1)
  x2 = x.at[:, 12:, 12:].add(3.0)  # only the last patch changes
  a, b = encode(model, x)[0], encode(model, x2)[0]
  assert float(jnp.abs(a[:, 0] - b[:, 0]).max()) > 1e-3  # the first patch sees the last


def test_gap_and_map_heads():
  x = images()
  gap = tiny(pool="gap")
  logits, toks = logits_and_tokens(gap, x)
  np.testing.assert_allclose(logits, gap.head.classifier(jnp.mean(toks, axis=1)), rtol=1e-5,
                             atol=1e-5)
  # MAP (big_vision's MAPHead): one query, the encoder's heads and MLP, trained with the encoder.
  model = tiny(pool="map")
  assert model.head.variant == "mha" and model.head.num_queries == 1
  assert model.head.num_heads == 4 and model.head.mlp is not None
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(model)
  assert float(jnp.abs(grads.patch_embed.kernel[...]).max()) > 0


def test_keep_count_rule():
  assert keep_count(10, 0.7) == 7 and keep_count(16, 0.7) == 12 and keep_count(3, 0.1) == 1
  cfg = ViTConfig(**{**TINY, "num_layers": 4}, prune_layers=(1, 3), keep_ratio=0.5)
  assert cfg.token_counts() == ((17, 17), (17, 9), (9, 9), (9, 5))
  cfg = ViTConfig(**{**TINY, "num_layers": 4}, prune_layers="0,2", keep_ratio=(0.25, 1.0))
  assert cfg.token_counts() == ((17, 5), (5, 5), (5, 5), (5, 5))


def _layer_norm(x, norm):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + norm.eps) * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])


def test_pruning_keeps_cls_and_top_attended_tokens():
  model = tiny(prune_layers=(0,), keep_ratio=0.6)  # 16 patches -> ceil(9.6) = 10
  # A non-zero class token (at init it is zero, its query constant and its attention uniform).
  model.cls_token[...] = jax.random.normal(jax.random.key(7), (32,))
  x = images(3, seed=1)
  tokens, idx = encode(model, x)
  assert tokens.shape == (3, 11, 32) and idx.shape == (3, 11)
  idx = np.asarray(idx)
  assert (idx[:, 0] == 0).all() and (np.diff(idx, axis=1) > 0).all()
  # Independent: the class token's softmax attention in layer 0, from numpy.
  z0 = np.asarray(model.embed(x), np.float64)
  blk = model.blocks[0]
  h = _layer_norm(z0, blk.attn_norm)
  proj = lambda lin, v: np.einsum("btd,dhe->bthe", v, np.asarray(lin.kernel[...])) + np.asarray(
      lin.bias[...])
  q, k = proj(blk.attention.qkv.q, h[:, :1]), proj(blk.attention.qkv.k, h)
  s = np.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(8)
  p = np.exp(s - s.max(-1, keepdims=True))
  p = (p / p.sum(-1, keepdims=True))[:, :, 0].mean(1)  # [B, T], mean over heads
  for b in range(3):
    want = sorted((np.argsort(-p[b, 1:])[:10] + 1).tolist())
    assert idx[b, 1:].tolist() == want
    assert p[b, 1:][idx[b, 1:] - 1].min() > np.delete(p[b, 1:], idx[b, 1:] - 1).max()
  # keep_ratio=1 keeps everything in order: the same tokens as the unpruned model.
  full = tiny(prune_layers=(0,), keep_ratio=1.0)
  np.testing.assert_allclose(encode(full, x)[0], encode(tiny(), x)[0], rtol=1e-5, atol=1e-5)


def test_progressive_pruning_and_flops():
  model = tiny(num_layers=3, prune_layers=(0, 2), keep_ratio=0.5)
  (logits, tokens), (_, idx) = logits_and_tokens(model, images()), encode(model, images())
  assert tokens.shape == (2, 1 + 4, 32) and int(idx[0, 0]) == 0 and logits.shape == (2, 5)
  assert model.train_flops_per_example() < abstract(num_layers=3).train_flops_per_example()


def test_flops_formula():
  model = abstract(num_layers=2)  # FLOPs come from shapes: the loop asks an abstract model
  d, mlp, t, n, c = 32, 64, 17, 16, 5
  matmuls = 4 * 4 * 3 * d * n + 2 * (4 * d * d + 2 * d * mlp) * t + d * c
  assert model.train_flops_per_example() == pytest.approx(6 * matmuls + 2 * 12 * d * t * t)


def test_adamw_steps_lower_the_loss():
  model = tiny(num_classes=4, prune_layers=(0,), keep_ratio=0.5)
  x = images(8, seed=2)
  labels = jnp.arange(8) % 4
  opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

  def loss_fn(m):
    return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

  @nnx.jit
  def step(m, o):
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    o.update(m, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(25)]
  assert losses[-1] < 0.5 * losses[0], losses


def test_build_from_config_dict():
  cfg = ml_collections.ConfigDict(dict(name="vit", **{**TINY, "num_layers": 2},
                                       prune_layers="1", keep_ratio="0.5", pool="cls"))
  model = build(cfg, nnx.Rngs(0))
  assert model.cfg.prune_layers == (1,) and model.cfg.keep_ratio == (0.5,)
  assert encode(model, images())[0].shape == (2, 1 + 8, 32)
  cfg = ml_collections.ConfigDict(dict(name="vit", **TINY, pool="lowrank_pool",
                                       pooling_options="num_heads=2"))
  gap = build(cfg, nnx.Rngs(0))
  assert gap.head.num_heads == 2


@pytest.mark.parametrize("kw, field", [
    (dict(patch_size=5), "model.patch_size"),
    (dict(image_size=(16, 18)), "model.patch_size"),
    (dict(pool="gap", prune_layers=(1,)), "model.prune_layers"),
    (dict(class_token=False), "model.class_token"),
    (dict(prune_layers=(1,)), "model.prune_layers"),
    (dict(prune_layers=(0,), keep_ratio=1.5), "model.keep_ratio"),
    (dict(prune_layers=(0, 1), keep_ratio=(0.5,), num_layers=2), "model.keep_ratio"),
    (dict(variant="XL"), "model.variant"),
    (dict(num_classes=None), "model.num_classes"),
    (dict(posemb="sincos"), "model.posemb"),
    (dict(posemb="sincos2d", d_model=30, num_heads=3), "model.d_model"),
    (dict(pool="max"), "model.pool"),
    (dict(attention="nope_such"), "model.attention"),
    (dict(num_heads=5), "num_heads"),
    (dict(mlp_activation="gelu_fast"), "model.mlp_activation"),
    (dict(pre_norm=1), "model.pre_norm"),
])
def test_bad_config_names_the_field(kw, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    ViTConfig(**{**TINY, **kw})


def test_bad_inputs_name_the_setting():
  with pytest.raises(ValueError, match=r"model\.bogus"):
    build(ml_collections.ConfigDict(dict(name="vit", **TINY, bogus=1)), nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model\.pooling_options"):
    tiny(pool="gap", pooling_options={"num_queries": 2})
  with pytest.raises(ValueError, match=r"model\.image_size"):
    tiny()(images(h=20, w=20))


def test_num_classes_zero_gives_the_pooled_vector():
  """A tower (CLIP's image encoder): no classifier; cls pooling is the class token's features."""
  cfg = ViTConfig(num_classes=0, image_size=16, patch_size=4, d_model=32, num_layers=1,
                  num_heads=2, mlp_dim=64)
  model = ViT(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  assert model.head is None and model.features_dim == 32
  np.testing.assert_allclose(model(x), model.encode(x)[:, 0], rtol=1e-6)
  gap = ViT(dataclasses.replace(cfg, pool="gap", class_token=None), rngs=nnx.Rngs(0))
  assert gap(x).shape == (2, gap.features_dim)


def test_checkpoint_knobs():
  """patch_bias=False drops b_E; pre_norm normalises z_0 (class token too) before the blocks;
  mlp_activation replaces the MLP's tanh GELU, in the blocks and the MAP head, whose
  LayerNorm takes the encoder's norm_eps (SigLIP's head)."""
  x = images()
  plain = tiny()
  assert tiny(patch_bias=False).patch_embed.bias is None and plain.embed_norm is None
  model = tiny(pre_norm=True, norm_eps=1e-5)
  z = nnx.jit(lambda m, x: m.embed(x))(model, x)
  np.testing.assert_allclose(jnp.mean(z, -1), 0.0, atol=1e-5)  # fresh LN: scale 1, bias 0
  np.testing.assert_allclose(jnp.var(z[:, 1:], -1), 1.0, rtol=1e-3)  # (the cls token is 0)
  exact = tiny(mlp_activation="gelu_exact")
  np.testing.assert_allclose(exact.blocks[0].mlp.act(x), jax.nn.gelu(x, approximate=False))
  assert not np.allclose(logits_and_tokens(exact, x)[0], logits_and_tokens(plain, x)[0])
  head = tiny(pool="map", mlp_activation="quick_gelu", norm_eps=1e-5).head
  assert head.norm.eps == 1e-5
  np.testing.assert_allclose(head.mlp.act(x), x * jax.nn.sigmoid(1.702 * x), rtol=1e-6)
  assert tiny(pool="map").head.norm.eps == 1e-6  # the default head is unchanged
