"""Tasks adapt a model to the loop: a task turns (model, batch) into (loss, metrics).

`lm`: next-token prediction, mean cross-entropy over tokens with weight > 0.
`recall`: synthetic recall (MQAR, passkey, selective copy) is the same
next-token objective; its data sets weight 1 on answer tokens only, so the
same sums give answer accuracy, and `exact_match` (every answer token of an
example right) is the task's headline metric.

Metrics are returned as *sums* (loss_sum, weight_sum, correct_sum, ...) so
they add up across micro-batches, devices and eval batches without bias; the
loop divides at the end (`finalize`).
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import optax


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


class LMTask:

  def __call__(self, model, batch) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    logits = model(batch["inputs"], segment_ids=batch.get("segment_ids"),
                   positions=batch.get("positions"))
    sums = lm_sums(logits, batch)
    loss = sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0)
    return loss, sums


TASKS = {"lm": LMTask, "recall": LMTask}


def get_task(name: str):
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r} (config.task); choose one of {sorted(TASKS)}")
  return TASKS[name]()


def finalize(sums: Dict[str, float], *, exact_match: bool = False) -> Dict[str, float]:
  """Sums -> means: loss, perplexity, token accuracy, and for recall data exact match."""
  w = max(float(sums["weight_sum"]), 1e-9)
  loss = float(sums["loss_sum"]) / w
  out = {"loss": loss, "perplexity": float(jnp.exp(min(loss, 80.0))),
         "accuracy": float(sums["correct_sum"]) / w, "tokens": float(sums["weight_sum"])}
  if exact_match and float(sums.get("example_sum", 0)) > 0:
    out["exact_match"] = float(sums["exact_sum"]) / float(sums["example_sum"])
  return out
