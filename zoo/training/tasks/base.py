"""What every task shares: the protocol the loop relies on, aux-loss capture, the objective.

A task adapts a model to the loop. It turns (model, batch, rng) into (loss, sums):
metric *sums* (loss_sum, weight_sum, ...) that add up across micro-batches,
devices and eval batches without bias; means are taken once, at the end
(`finalize`). `weight_sum` counts the task's unit -- tokens for language
modelling, examples for classification -- and the loop divides gradients by
it, so gradient accumulation gives the same step as one large batch.

Auxiliary losses: a layer may report one with
`self.sow(nnx.Intermediate, "aux_loss", value)` (e.g. a router's load-balance
loss); `forward_with_aux` captures every `aux_loss` of the forward pass, and
tasks add their sum, weighted by the unit count, as `aux_loss_sum`.

Randomness: `rng` is a key the loop derives from (config.seed, step,
micro-batch), so a resumed run draws what the killed one would have drawn;
evaluation passes a fixed key. Tasks without randomness ignore it.
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
from flax import nnx


def forward_with_aux(model, *args, **kwargs) -> Tuple[jax.Array, jax.Array]:
  """model(*args, **kwargs) and the sum of the `aux_loss` values its layers sowed."""
  out, intermediates = nnx.capture(model, nnx.Intermediate)(*args, **kwargs)
  aux = [v for path, v in jax.tree_util.tree_leaves_with_path(intermediates)
         if any(getattr(k, "key", None) == "aux_loss" for k in path)]
  return out, sum((jnp.sum(a) for a in aux), jnp.zeros((), jnp.float32))


def objective_sum(sums: Dict[str, jax.Array]) -> jax.Array:
  """What training minimises, as a sum over the task's unit: its loss plus aux losses."""
  return sums["loss_sum"] + sums.get("aux_loss_sum", 0.0)


class Task:
  """The protocol (subclasses override `__call__`, and what differs from these defaults).

  unit             what `weight_sum` counts: "tokens" or "examples"
  model_fields     model config fields the loop fills from the data when unset, each
                   with `zoo.data.<field>(data_cfg)` (vocab_size, num_classes)
  """

  unit = "tokens"
  model_fields: Tuple[str, ...] = ()

  def __call__(self, model, batch, rng=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    raise NotImplementedError

  def model_values(self, data_cfg) -> Dict[str, int]:
    """What the data decides about the model: {field: value} for `model_fields`."""
    import zoo.data  # pylint: disable=g-import-not-at-top  (heavy; only the loop needs it)
    return {f: int(getattr(zoo.data, f)(data_cfg)) for f in self.model_fields}

  def step_metrics(self, sums: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    """Per-step training metrics (traced): means over this step's units."""
    denom = jnp.maximum(sums["weight_sum"], 1.0)
    out = {"loss": sums["loss_sum"] / denom, self.unit: sums["weight_sum"]}
    if "aux_loss_sum" in sums:
      out["aux_loss"] = sums["aux_loss_sum"] / denom
    if "correct_sum" in sums:
      out["accuracy"] = sums["correct_sum"] / denom
    return out

  def finalize(self, sums: Dict[str, float], data_cfg=None) -> Dict[str, float]:
    """Eval sums -> means."""
    del data_cfg
    w = max(float(sums["weight_sum"]), 1e-9)
    out = {"loss": float(sums["loss_sum"]) / w, self.unit: float(sums["weight_sum"])}
    if "correct_sum" in sums:
      out["accuracy"] = float(sums["correct_sum"]) / w
    if float(sums.get("aux_loss_sum", 0.0)):
      out["aux_loss"] = float(sums["aux_loss_sum"]) / w
    return out

  def units_per_step(self, config) -> int:
    """Units one optimiser step trains on (for the throughput line)."""
    return int(config.batch_size) * (int(config.seq_len) if self.unit == "tokens" else 1)

  def train_flops_per_step(self, model, config) -> float:
    """Model FLOPs of one training step (forward + backward), for MFU."""
    if self.unit == "tokens":
      return model.train_flops_per_token(config.seq_len) * self.units_per_step(config)
    return model.train_flops_per_example() * self.units_per_step(config)
