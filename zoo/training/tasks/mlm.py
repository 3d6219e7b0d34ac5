"""`mlm`: masked language modelling (BERT's objective, at ModernBERT's 30% rate).

Of the real tokens of a batch (segment id > 0) each is chosen with
probability `MASK_RATE`; a chosen token is replaced by [MASK] with
probability 0.8, by a uniformly random token of the data vocabulary with
0.1, and kept with 0.1 ("BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding"). The loss is the cross-entropy of
the original token at the chosen positions only; accuracy is over them too.
The draws come from the loop's per-step key, so a resumed run masks exactly
as the killed one would have. The model gives logits for every position and
names its [MASK] id (`model.mask_token_id`); the loop sizes its vocabulary
as the data's plus one, so [MASK] never collides with a data token.
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from zoo.training.tasks.base import Task, forward_with_aux, objective_sum
from zoo.training.tasks.lm import finalize, lm_sums

MASK_RATE = 0.3


def mask_tokens(rng, tokens: jax.Array, real: jax.Array, mask_id: int,
                rate: float = MASK_RATE) -> Tuple[jax.Array, jax.Array]:
  """(corrupted tokens, chosen [B, T] bool): BERT's 80/10/10 corruption of a `rate` sample."""
  k_choose, k_how, k_random = jax.random.split(rng, 3)
  chosen = (jax.random.uniform(k_choose, tokens.shape) < rate) & real
  how = jax.random.uniform(k_how, tokens.shape)
  random_tokens = jax.random.randint(k_random, tokens.shape, 0, mask_id, dtype=tokens.dtype)
  corrupted = jnp.where(how < 0.8, mask_id, jnp.where(how < 0.9, random_tokens, tokens))
  return jnp.where(chosen, corrupted, tokens), chosen


class MLMTask(Task):
  unit = "tokens"
  model_fields = ("vocab_size",)

  def model_values(self, data_cfg) -> Dict[str, int]:
    return {"vocab_size": super().model_values(data_cfg)["vocab_size"] + 1}  # + [MASK]

  def __call__(self, model, batch, rng=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    rng = jax.random.key(0) if rng is None else rng
    tokens = batch["inputs"]
    seg = batch.get("segment_ids")
    real = (seg > 0) if seg is not None else jnp.ones(tokens.shape, bool)
    corrupted, chosen = mask_tokens(rng, tokens, real, model.mask_token_id)
    logits, aux = forward_with_aux(model, corrupted, segment_ids=seg,
                                   positions=batch.get("positions"))
    sums = lm_sums(logits, {"targets": tokens, "weights": chosen.astype(jnp.float32)})
    sums["aux_loss_sum"] = aux * sums["weight_sum"]
    return objective_sum(sums) / jnp.maximum(sums["weight_sum"], 1.0), sums

  def finalize(self, sums, data_cfg=None) -> Dict[str, float]:
    del data_cfg
    return finalize(sums)
