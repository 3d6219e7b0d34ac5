"""`captioning`: next-token prediction of an image's caption, conditioned on the image.

Batches hold `image` [B, H, W, C], `text` [B, L] (bos, caption, eos, then
padding = the model's `pad_id`) and `weights` [B]. The model reads
(image, text[:, :-1]) and predicts text[:, 1:]; the loss is the mean
cross-entropy over real target tokens of real examples. Metrics are the
language model's: loss, perplexity and caption token accuracy.
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from zoo.training.tasks.base import Task, forward_with_aux, objective_sum
from zoo.training.tasks.lm import finalize, lm_sums


class CaptioningTask(Task):
  unit = "tokens"
  model_fields = ("vocab_size",)

  def __call__(self, model, batch, rng=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    del rng
    text = batch["text"]
    inputs, targets = text[:, :-1], text[:, 1:]
    w = (targets != model.cfg.pad_id).astype(jnp.float32) * batch["weights"][:, None]
    logits, aux = forward_with_aux(model, batch["image"], inputs)
    sums = lm_sums(logits, {"targets": targets, "weights": w})
    sums["aux_loss_sum"] = aux * sums["weight_sum"]
    return objective_sum(sums) / jnp.maximum(sums["weight_sum"], 1.0), sums

  def units_per_step(self, config) -> int:
    return int(config.batch_size) * (int(config.seq_len) - 1)

  def train_flops_per_step(self, model, config) -> float:
    return model.train_flops_per_example(int(config.seq_len) - 1) * int(config.batch_size)

  def finalize(self, sums, data_cfg=None) -> Dict[str, float]:
    del data_cfg
    return finalize(sums)
