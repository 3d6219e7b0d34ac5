"""Tasks adapt a model to the loop: a task turns (model, batch) into (loss, metrics).

`lm`: next-token prediction, mean cross-entropy over tokens with weight > 0.
`recall`: synthetic recall (MQAR, passkey, selective copy) is the same
next-token objective; its data sets weight 1 on answer tokens only, so the
same sums give answer accuracy, and `exact_match` (every answer token of an
example right) is the task's headline metric.

Auxiliary losses: a layer may report one with
`self.sow(nnx.Intermediate, "aux_loss", value)` (e.g. a router's load-balance
loss); the task captures every `aux_loss` of the forward pass and adds their
sum to the mean token loss.

Metrics are returned as *sums* (loss_sum, weight_sum, correct_sum, ...) so
they add up across micro-batches, devices and eval batches without bias; the
loop divides at the end (`finalize`).
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


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


def forward_with_aux(model, *args, **kwargs) -> Tuple[jax.Array, jax.Array]:
  """model(*args, **kwargs) and the sum of the `aux_loss` values its layers sowed."""
  out, intermediates = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
  aux = [v for path, v in jax.tree_util.tree_leaves_with_path(intermediates)
         if any(getattr(k, "key", None) == "aux_loss" for k in path)]
  return out, sum((jnp.sum(a) for a in aux), jnp.zeros((), jnp.float32))


class LMTask:

  def __call__(self, model, batch) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    logits, aux = forward_with_aux(model, batch["inputs"], segment_ids=batch.get("segment_ids"),
                                   positions=batch.get("positions"))
    sums = lm_sums(logits, batch)
    # Weighted by the token count so that sums over micro-batches stay exact.
    sums["aux_loss_sum"] = aux * sums["weight_sum"]
    return objective_sum(sums) / jnp.maximum(sums["weight_sum"], 1.0), sums


def objective_sum(sums: Dict[str, jax.Array]) -> jax.Array:
  """What training minimises, as a sum over tokens: cross-entropy plus aux losses."""
  return sums["loss_sum"] + sums.get("aux_loss_sum", 0.0)


TASKS = {"lm": LMTask, "recall": LMTask}


def get_task(name: str):
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r} (config.task); choose one of {sorted(TASKS)}")
  return TASKS[name]()


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
