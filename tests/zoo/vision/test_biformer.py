"""BiFormer (biformer_net): forward shapes (tiny, and BiFormer-T abstractly at 224 px with the
paper's parameter count and FLOPs), the pooled vector, implementations agree, training lowers
the loss, the FLOPs formula, the recipe, and errors that name the setting."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import biformer_tiny
from zoo.vision.biformer import VARIANTS, BiFormer, BiFormerConfig, build

TINY = dict(num_classes=5, variant="tiny", image_size=32)


@pytest.fixture(scope="module")
def tiny_model():
  """Built eagerly once (initialisers compile once per shape, shared by later builds)."""
  return BiFormer(BiFormerConfig(**TINY), rngs=nnx.Rngs(0))


@nnx.jit
def logits_and_map(model, x):
  return model(x), model.encode(x)


def images(b=2, h=32, w=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, h, w, 3))


def test_tiny_forward_shapes(tiny_model):
  cfg = tiny_model.cfg
  assert cfg.grids == ((16, 16), (8, 8), (4, 4))
  assert cfg.num_regions == (4, 2, 1) and cfg.topk == (4, 2, 1) and cfg.num_heads == (2, 4, 8)
  assert [b.attention.region_tokens(g) for b, g in zip(
      [s[0] for s in tiny_model.stages], cfg.grids)] == [16, 16, 16]
  logits, fmap = logits_and_map(tiny_model, images())
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert fmap.shape == (2, 4, 4, 128)


def test_biformer_t_at_224_abstract():
  """The paper's BiFormer-T (Table: 13.1M parameters, 2.2G FLOPs) from shapes alone."""
  cfg = BiFormerConfig(num_classes=1000, variant="T")
  assert cfg.grids == ((56, 56), (28, 28), (14, 14), (7, 7))
  assert cfg.topk == (1, 4, 16, 49) and cfg.num_heads == (2, 4, 8, 16)
  model = nnx.eval_shape(lambda: BiFormer(cfg, rngs=nnx.Rngs(0)))
  out = nnx.eval_shape(lambda m, x: m(x), model,
                       jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  assert out.shape == (2, 1000) and out.dtype == jnp.float32
  params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert params == pytest.approx(13.1e6, rel=0.01)
  # Forward multiply-adds (the paper's "FLOPs") = train FLOPs / 6 up to the attention terms.
  assert model.train_flops_per_example() / 6 == pytest.approx(2.2e9, rel=0.03)


def test_biformer_t_forward_at_small_size():
  """BiFormer-T's widths, depths and heads on 64x64 images (maps 16/8/4/2: S = 4/4/2/2)."""
  cfg = BiFormerConfig(num_classes=3, variant="T", image_size=64, depths=(1, 1, 1, 1),
                       num_regions=(4, 4, 2, 2), topk=(1, 4, 4, -1))
  assert cfg.topk == (1, 4, 4, 4) and cfg.dims == (64, 128, 256, 512)
  model = nnx.eval_shape(lambda: BiFormer(cfg, rngs=nnx.Rngs(0)))
  out = nnx.eval_shape(lambda m, x: m.encode(x), model,
                       jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  assert out.shape == (1, 2, 2, 512)


def test_num_classes_zero_gives_the_pooled_vector(tiny_model):
  tower = BiFormer(BiFormerConfig(**{**TINY, "num_classes": 0}), rngs=nnx.Rngs(0))
  assert tower.head is None and tower.features_dim == 128
  x = images()
  pooled, fmap = logits_and_map(tower, x)
  assert pooled.shape == (2, 128)
  want = tower.norm(jnp.mean(fmap, axis=(1, 2)))
  np.testing.assert_allclose(pooled, want, rtol=1e-5, atol=1e-5)
  # Same initialisation order: the classifier model is this tower plus its head.
  logits, _ = logits_and_map(tiny_model, x)
  np.testing.assert_allclose(logits, tiny_model.head(pooled), rtol=1e-4, atol=1e-4)


def test_implementations_give_the_same_logits(tiny_model):
  x = images(seed=3)
  want, _ = logits_and_map(tiny_model, x)
  for impl in ("block_sparse",):  # "reference": tests/layers/attention/test_biformer.py
    other = BiFormer(BiFormerConfig(**TINY, implementation=impl, kernel_implementation="xla"),
                     rngs=nnx.Rngs(0))
    got, _ = logits_and_map(other, x)
    assert float(jnp.abs(got - want).max()) < 1e-4 * float(jnp.abs(want).max())


def test_adamw_steps_lower_the_loss(tiny_model):
  model = nnx.clone(tiny_model)
  x = images(8, seed=2)
  labels = jnp.arange(8) % 5
  opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(m, o):
    loss, grads = nnx.value_and_grad(
        lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean())(m)
    o.update(m, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(12)]
  assert losses[-1] < 0.5 * losses[0], losses


def test_flops_formula():
  """A 1-stage model counted by hand: stem conv, block projections, MLP, depthwise convs,
  attention over the routed tokens, the forward-only routing, the classifier."""
  cfg = BiFormerConfig(num_classes=4, image_size=8, dims=(16,), depths=(1,), num_regions=(2,),
                       topk=(2,), head_dim=8, stem_stride=1)
  model = nnx.eval_shape(lambda: BiFormer(cfg, rngs=nnx.Rngs(0)))
  d, t, mlp, c = 16, 64, 48, 4
  macs = 3 * 3 * 3 * d * t  # stem conv (stride 1)
  macs += (4 * d * d + 2 * d * mlp) * t + 9 * d * t  # projections, MLP, positional conv
  macs += d * c  # classifier
  attn = 12 * d * (2 * 16) * t + 6 * 25 * d * t + 2 * 2 ** 4 * d  # keys: 2 regions of 16
  assert model.train_flops_per_example() == pytest.approx(6 * macs + attn)


def test_variant_table_and_overrides():
  for name, (dims, depths, regions, topk, head_dim, stem) in VARIANTS.items():
    size = 32 if name == "tiny" else 224
    cfg = BiFormerConfig(num_classes=10, variant=name, image_size=size)
    assert (cfg.dims, cfg.depths, cfg.num_regions, cfg.stem_stride) == (dims, depths, regions,
                                                                        stem)
    assert cfg.num_heads == tuple(d // head_dim for d in dims)
  cfg = BiFormerConfig(num_classes=10, variant="T", num_regions=1, topk=-1, head_dim=64)
  assert cfg.num_regions == (1,) * 4 and cfg.topk == (1,) * 4 and cfg.num_heads == (1, 2, 4, 8)
  cfg = BiFormerConfig(num_classes=10, variant="tiny", image_size=32, num_heads="1,2,4")
  assert cfg.num_heads == (1, 2, 4) and cfg.stage_head_dim(2) == 32
  cfg = BiFormerConfig(num_classes=10, variant="T", num_regions="7", topk="-1")  # flag strings
  assert cfg.num_regions == (7,) * 4 and cfg.topk == (49,) * 4


def test_recipe_builds_and_flags_parse():
  c = biformer_tiny.get_config()
  model_cfg = ml_collections.ConfigDict(c.model.to_dict())
  model_cfg.num_classes = 18
  model_cfg.dims = "16,32,64"
  model_cfg.topk = "16,4,1"
  model = nnx.eval_shape(lambda: build(model_cfg, nnx.Rngs(0)))
  assert model.cfg.dims == (16, 32, 64) and model.cfg.topk == (16, 4, 1)
  assert model.cfg.image_size == (32, 32) and c.task == "classification"
  # Every dataclass field is in the recipe, with the dataclass default.
  fields = {f.name: f.default for f in dataclasses.fields(BiFormerConfig)}
  full = biformer_tiny.biformer_config()
  assert set(full.keys()) - {"name"} == set(fields)
  for name in ("mlp_ratio", "pos_kernel", "lce_kernel", "implementation", "variant",
               "image_size", "kernel_implementation", "norm_eps"):
    assert full[name] == fields[name], name


@pytest.mark.parametrize("kw, field", [
    (dict(num_classes=None), "model.num_classes"),
    (dict(variant="XL"), "model.variant"),
    (dict(num_regions=(3, 2, 1)), "model.num_regions"),
    (dict(topk=(17, 2, 1)), "model.topk"),
    (dict(topk=(4, 0, 1)), "model.topk"),
    (dict(depths=(2, 2)), "model.depths"),
    (dict(dims=(30, 64, 128)), "model.head_dim"),
    (dict(num_heads=(3, 4, 8)), "model.num_heads"),
    (dict(stem_stride=3), "model.stem_stride"),
    (dict(implementation="dense"), "model.implementation"),
    (dict(kernel_implementation="triton"), "model.kernel_implementation"),
    (dict(lce_kernel=-1), "model.lce_kernel"),
    (dict(image_size=(32, 32, 3)), "model.image_size"),
    (dict(dims="a,b"), "model.dims"),
])
def test_bad_config_names_the_field(kw, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    BiFormerConfig(**{**TINY, **kw})


def test_bad_inputs_name_the_setting(tiny_model):
  with pytest.raises(ValueError, match=r"model\.bogus"):
    build(ml_collections.ConfigDict(dict(name="biformer_net", **TINY, bogus=1)), nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"model\.image_size"):
    tiny_model(images(h=24, w=24))
  with pytest.raises(ValueError, match=r"S=7 does not divide stage 0's 16x16"):
    BiFormerConfig(num_classes=10, variant="T", image_size=64)
