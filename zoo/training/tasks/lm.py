"""Language-model tasks: next-token prediction on text and on synthetic recall data.

`lm`: mean cross-entropy over tokens with weight > 0.
`recall`: synthetic recall (MQAR, passkey, selective copy) is the same
next-token objective; its data sets weight 1 on answer tokens only, so the
same sums give answer accuracy, and `exact_match` (every answer token of an
example right) is the task's headline metric.
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import optax

from zoo.data.config import is_synthetic
from zoo.training.tasks.base import Task, forward_with_aux, objective_sum


def lm_sums(logits: jax.Array, batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  w = batch["weights"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  has_answer = jnp.sum(w, axis=-1) > 0
  all_right = jnp.all((correct > 0) | (w == 0), axis=-1) & has_answer
  return {
      "loss_sum": jnp.sum(ce * w),
      "weight_sum": jnp.sum(w),
      "correct_sum": jnp.sum(correct * w),
      "exact_sum": jnp.sum(all_right.astype(jnp.float32)),
      "example_sum": jnp.sum(has_answer.astype(jnp.float32)),
  }


class LMTask(Task):
  unit = "tokens"
  model_fields = ("vocab_size",)

  def __call__(self, model, batch, rng=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    del rng
    logits, aux = forward_with_aux(model, batch["inputs"], segment_ids=batch.get("segment_ids"),
                                   positions=batch.get("positions"))
    sums = lm_sums(logits, batch)
    # Weighted by the token count so that sums over micro-batches stay exact.
    sums["aux_loss_sum"] = aux * sums["weight_sum"]
    return objective_sum(sums) / jnp.maximum(sums["weight_sum"], 1.0), sums

  def finalize(self, sums, data_cfg=None) -> Dict[str, float]:
    return finalize(sums, exact_match=data_cfg is not None and is_synthetic(data_cfg.name))


def finalize(sums: Dict[str, float], *, exact_match: bool = False) -> Dict[str, float]:
  """Sums -> means: loss (cross-entropy), perplexity, token accuracy, aux loss if any,
  and for recall data exact match."""
  w = max(float(sums["weight_sum"]), 1e-9)
  loss = float(sums["loss_sum"]) / w
  out = {"loss": loss, "perplexity": float(jnp.exp(min(loss, 80.0))),
         "accuracy": float(sums["correct_sum"]) / w, "tokens": float(sums["weight_sum"])}
  if float(sums.get("aux_loss_sum", 0.0)):
    out["aux_loss"] = float(sums["aux_loss_sum"]) / w
  if exact_match and float(sums.get("example_sum", 0)) > 0:
    out["exact_match"] = float(sums["exact_sum"]) / float(sums["example_sum"])
  return out
