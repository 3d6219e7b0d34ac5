"""`classification`: images to class labels, mean cross-entropy over examples.

Batches hold `image` [B, H, W, C], `label` [B] and `weights` [B] (0 on the
padding rows of the last eval batch). The model maps images to logits
[B, num_classes]; `num_classes` comes from the data when the model config
leaves it unset. Metrics: loss, top-1 accuracy and, with more than five
classes, top-5 accuracy.
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import optax

from zoo.training.tasks.base import Task, forward_with_aux, objective_sum


def classification_sums(logits: jax.Array, labels: jax.Array,
                        weights: jax.Array) -> Dict[str, jax.Array]:
  w = weights.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  sums = {"loss_sum": jnp.sum(ce * w), "weight_sum": jnp.sum(w),
          "correct_sum": jnp.sum(correct * w)}
  if logits.shape[-1] > 5:
    # The label is in the top 5 when fewer than 5 logits beat it.
    own = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    in_top5 = (jnp.sum(logits > own, axis=-1) < 5).astype(jnp.float32)
    sums["top5_sum"] = jnp.sum(in_top5 * w)
  return sums


class ClassificationTask(Task):
  unit = "examples"
  model_fields = ("num_classes",)

  def __call__(self, model, batch, rng=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    del rng
    logits, aux = forward_with_aux(model, batch["image"])
    sums = classification_sums(logits, batch["label"], batch["weights"])
    sums["aux_loss_sum"] = aux * sums["weight_sum"]
    return objective_sum(sums) / jnp.maximum(sums["weight_sum"], 1.0), sums

  def finalize(self, sums, data_cfg=None) -> Dict[str, float]:
    out = super().finalize(sums, data_cfg)
    if "top5_sum" in sums:
      out["top5_accuracy"] = float(sums["top5_sum"]) / max(float(sums["weight_sum"]), 1e-9)
    return out
