"""The CLIP/SigLIP dual encoder and the contrastive task."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from zoo.multimodal.clip import CLIP, CLIPConfig
from zoo.registry import build_model
from zoo.training.tasks import ContrastiveTask
from zoo.training.tasks.contrastive import contrastive_sums, recall_at

IMAGE = dict(image_size=16, patch_size=4, d_model=32, num_layers=1, num_heads=2, mlp_dim=64)
TEXT = dict(d_model=32, num_layers=1, num_heads=2, mlp_dim=64, global_every=1)


def tiny(**kw):
  cfg = dict(vocab_size=30, embed_dim=16, image=IMAGE, text=TEXT)
  cfg.update(kw)
  return CLIP(CLIPConfig(**cfg), rngs=nnx.Rngs(0))


def batch(n=6, seed=0):
  rng = np.random.default_rng(seed)
  text = rng.integers(3, 30, (n, 10)).astype(np.int32)
  text[:, 7:] = 0  # padding
  return {"image": rng.normal(size=(n, 16, 16, 3)).astype(np.float32), "text": text,
          "label": np.arange(n, dtype=np.int32), "weights": np.ones(n, np.float32)}


def test_softmax_loss_equals_direct_computation():
  z = jax.random.normal(jax.random.key(0), (5, 5)) * 3
  sums = contrastive_sums(z, jnp.ones(5), "softmax")
  zn = np.asarray(z, np.float64)
  i2t = -np.log(np.exp(np.diag(zn)) / np.exp(zn).sum(1))
  t2i = -np.log(np.exp(np.diag(zn)) / np.exp(zn).sum(0))
  np.testing.assert_allclose(sums["loss_sum"] / 5, np.mean((i2t + t2i) / 2), rtol=1e-5)
  assert float(sums["correct_sum"]) == float(np.sum(np.argmax(zn, 1) == np.arange(5)))


def test_sigmoid_loss_equals_direct_computation():
  z = jax.random.normal(jax.random.key(1), (4, 4)) * 3
  sums = contrastive_sums(z, jnp.ones(4), "sigmoid")
  zn = np.asarray(z, np.float64)
  y = 2 * np.eye(4) - 1
  direct = -np.sum(np.log(1 / (1 + np.exp(-y * zn)))) / 4
  np.testing.assert_allclose(sums["loss_sum"] / sums["weight_sum"], direct, rtol=1e-5)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_padding_rows_are_neither_queries_nor_candidates(loss):
  z = jax.random.normal(jax.random.key(2), (6, 6)) * 3
  w = jnp.array([1, 1, 1, 1, 0, 0], jnp.float32)
  padded = contrastive_sums(z, w, loss)
  alone = contrastive_sums(z[:4, :4], jnp.ones(4), loss)
  for k in ("loss_sum", "weight_sum", "correct_sum"):
    np.testing.assert_allclose(padded[k], alone[k], rtol=1e-6)


def test_recall_at_k():
  sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.2, 0.1]])
  # row 0: match first; row 1: match second (0.8 beats it); row 2: match third (0.2 beats it)
  assert recall_at(sim, ks=(1, 2)) == {1: 1 / 3, 2: 1.0}


def test_embeddings_are_unit_and_logits_scaled():
  model = tiny(loss="sigmoid")
  b = batch()
  u, v = model.encode_image(b["image"]), model.encode_text(b["text"])
  np.testing.assert_allclose(jnp.linalg.norm(u, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(v, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(model.logits(u, v), 10.0 * u @ v.T - 10.0, rtol=1e-5, atol=1e-5)


def test_text_padding_does_not_change_the_text_embedding():
  model = tiny()
  b = batch()
  junk = b["text"].copy()
  junk[:, 8:] = 0
  longer = np.concatenate([b["text"], np.zeros((6, 5), np.int32)], axis=1)
  np.testing.assert_allclose(model.encode_text(b["text"]), model.encode_text(longer), atol=1e-5)


def test_training_lowers_the_contrastive_loss():
  model = tiny()
  task = ContrastiveTask()
  b = batch(8)
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, g = nnx.value_and_grad(lambda m: task(m, b)[0])(model)
    opt.update(model, g)
    return loss

  losses = [float(step(model, opt)) for _ in range(25)]
  assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


def test_config_errors_name_the_tower_field():
  cfg = ml_collections.ConfigDict(dict(name="clip", vocab_size=30, embed_dim=16,
                                       image=dict(IMAGE), text=dict(TEXT)))
  assert isinstance(build_model(cfg), CLIP)
  cfg.image.patch_size = 5
  with pytest.raises(ValueError, match=r"model\.image\.patch_size"):
    build_model(cfg)
  cfg.image.patch_size = 4
  cfg.text.pool = "max"
  with pytest.raises(ValueError, match=r"model\.text\.pool"):
    build_model(cfg)
  with pytest.raises(ValueError, match=r"model\.loss"):
    CLIPConfig(vocab_size=30, loss="hinge")


def test_checkpoint_knobs():
  """image_projection=False: the pooled image vector is the embedding (embed_dim must be its
  width); text_projection_bias adds a bias; mask_padding=False makes pads ordinary tokens."""
  b = batch()
  model = tiny(image_projection=False, embed_dim=32, text_projection_bias=True)
  assert model.image_proj is None and model.text_proj.bias is not None
  pooled = model.image_tower(b["image"])
  np.testing.assert_allclose(model.encode_image(b["image"]),
                             pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True), rtol=1e-5)
  with pytest.raises(ValueError, match=r"model\.embed_dim"):
    tiny(image_projection=False, embed_dim=16)
  with pytest.raises(ValueError, match=r"model\.mask_padding"):
    CLIPConfig(vocab_size=30, mask_padding="no")
  longer = np.concatenate([b["text"], np.zeros((6, 5), np.int32)], axis=1)
  masked, unmasked = tiny(), tiny(mask_padding=False)
  np.testing.assert_allclose(masked.encode_text(b["text"]), masked.encode_text(longer), atol=1e-5)
  assert not np.allclose(unmasked.encode_text(b["text"]), unmasked.encode_text(longer), atol=1e-3)
