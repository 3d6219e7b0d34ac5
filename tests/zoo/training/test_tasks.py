"""Tasks: the LM loss is the weighted token mean, and sowed aux losses join it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zoo.training.tasks import ClassificationTask, LMTask, finalize


class Toy(nnx.Module):
  def __init__(self, aux: float | None):
    self.table = nnx.Param(jax.random.normal(jax.random.key(0), (7, 7)))
    self.aux = aux

  def __call__(self, tokens, *, segment_ids=None, positions=None):
    if self.aux is not None:
      self.sow(nnx.Intermediate, "aux_loss", jnp.float32(self.aux))
    return self.table[...][tokens]


def batch():
  rng = np.random.default_rng(0)
  w = np.ones((2, 5), np.float32)
  w[1, 3:] = 0
  return {"inputs": rng.integers(0, 7, (2, 5)), "targets": rng.integers(0, 7, (2, 5)), "weights": w}


def test_loss_is_weighted_token_mean():
  b = batch()
  model = Toy(None)
  loss, sums = LMTask()(model, b)
  ce = optax.softmax_cross_entropy_with_integer_labels(model(b["inputs"]), b["targets"])
  np.testing.assert_allclose(loss, jnp.sum(ce * b["weights"]) / b["weights"].sum(), rtol=1e-6)
  assert finalize(jax.device_get(sums))["tokens"] == 8


def test_sowed_aux_loss_is_added():
  b = batch()
  plain, _ = LMTask()(Toy(None), b)
  with_aux, sums = LMTask()(Toy(0.25), b)
  np.testing.assert_allclose(with_aux, plain + 0.25, rtol=1e-6)
  m = finalize(jax.device_get(sums))
  np.testing.assert_allclose(m["aux_loss"], 0.25, rtol=1e-6)
  np.testing.assert_allclose(m["loss"], plain, rtol=1e-6)  # perplexity is of the tokens only


class Linear2Logits(nnx.Module):
  def __init__(self, num_classes: int):
    self.w = nnx.Param(jax.random.normal(jax.random.key(1), (3, num_classes)))

  def __call__(self, images):
    return jnp.mean(images, axis=(1, 2)) @ self.w[...]


def test_classification_is_weighted_example_mean_with_top5():
  rng = np.random.default_rng(0)
  b = {"image": rng.normal(size=(6, 4, 4, 3)).astype(np.float32),
       "label": rng.integers(0, 8, 6).astype(np.int32),
       "weights": np.array([1, 1, 1, 1, 0, 0], np.float32)}
  model = Linear2Logits(8)
  task = ClassificationTask()
  loss, sums = task(model, b)
  logits = np.asarray(model(b["image"]))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["label"])
  np.testing.assert_allclose(loss, np.sum(ce * b["weights"]) / 4, rtol=1e-6)
  rank = np.argsort(-logits, axis=-1)
  top1 = rank[:, 0] == b["label"]
  top5 = np.array([b["label"][i] in rank[i, :5] for i in range(6)])
  m = task.finalize(jax.device_get(sums))
  assert m["examples"] == 4
  np.testing.assert_allclose(m["accuracy"], top1[:4].mean())
  np.testing.assert_allclose(m["top5_accuracy"], top5[:4].mean())
