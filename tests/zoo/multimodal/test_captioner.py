"""The captioner (cross-attention and prefix-LM variants) and the captioning task."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from zoo.multimodal.captioner import Captioner, CaptionerConfig
from zoo.registry import build_model
from zoo.training.tasks import CaptioningTask

IMAGE = dict(image_size=16, patch_size=4, d_model=32, num_layers=1, num_heads=2, mlp_dim=64)


def tiny(**kw):
  cfg = dict(vocab_size=30, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, image=IMAGE)
  cfg.update(kw)
  return Captioner(CaptionerConfig(**cfg), rngs=nnx.Rngs(0))


def batch(n=4, seed=0):
  rng = np.random.default_rng(seed)
  text = rng.integers(3, 30, (n, 12)).astype(np.int32)
  text[:, 0] = 1
  text[0, 9:] = 0  # a shorter caption, padded
  return {"image": rng.normal(size=(n, 16, 16, 3)).astype(np.float32), "text": text,
          "label": np.zeros(n, np.int32), "weights": np.ones(n, np.float32)}


VARIANTS = [dict(variant="cross"), dict(variant="prefix"), dict(variant="prefix", resampler_latents=3)]


@pytest.mark.parametrize("kw", VARIANTS)
def test_decoder_is_causal_and_reads_the_image(kw):
  model = tiny(**kw)
  b = batch()
  logits = model(b["image"], b["text"])
  assert logits.shape == (4, 12, 30)
  later = b["text"].copy()
  later[:, 7:] = (later[:, 7:] + 3) % 30
  np.testing.assert_allclose(model(b["image"], later)[:, :7], logits[:, :7], atol=1e-5)
  other = model(b["image"] + 1.0, b["text"])
  assert float(jnp.abs(other[:, 0] - logits[:, 0]).max()) > 1e-4  # even the first token sees it


def test_prefix_image_tokens_attend_to_each_other():
  """In the prefix variant every image token sees every other (bidirectional prefix): changing
  the last patch changes what the first text token reads, through the prefix."""
  model = tiny(variant="prefix")
  b = batch()
  img2 = b["image"].copy()
  img2[:, -4:, -4:, :] += 2.0  # the last patch only
  assert float(jnp.abs(model(img2, b["text"])[:, 0] - model(b["image"], b["text"])[:, 0]).max()) > 1e-4


def test_captioning_loss_is_over_real_targets():
  model = tiny()
  b = batch()
  b["weights"][3] = 0.0
  loss, sums = CaptioningTask()(model, b)
  logits = model(b["image"], b["text"][:, :-1])
  targets = b["text"][:, 1:]
  w = (targets != 0) * b["weights"][:, None]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  np.testing.assert_allclose(loss, np.sum(ce * w) / w.sum(), rtol=1e-5)
  assert float(sums["weight_sum"]) == w.sum() == 3 * 11 - 3


@pytest.mark.parametrize("variant", ["cross", "prefix"])
def test_training_lowers_the_caption_loss(variant):
  model = tiny(variant=variant)
  task = CaptioningTask()
  b = batch()
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, g = nnx.value_and_grad(lambda m: task(m, b)[0])(model)
    opt.update(model, g)
    return loss

  losses = [float(step(model, opt)) for _ in range(20)]
  assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])


def test_config_errors_name_the_field():
  cfg = ml_collections.ConfigDict(dict(name="captioner", vocab_size=30, d_model=32, num_layers=1,
                                       num_heads=4, mlp_dim=64, image=dict(IMAGE)))
  assert isinstance(build_model(cfg), Captioner)
  cfg.image.patch_size = 5
  with pytest.raises(ValueError, match=r"model\.image\.patch_size"):
    build_model(cfg)
  with pytest.raises(ValueError, match=r"model\.variant"):
    CaptionerConfig(vocab_size=30, variant="lstm")
  with pytest.raises(ValueError, match=r"model\.vocab_size is not set"):
    build_model(ml_collections.ConfigDict(dict(name="captioner")))
