"""`contrastive`: image-text pairs, CLIP's softmax (InfoNCE) or SigLIP's sigmoid loss.

The model gives unit image and text embeddings (`encode_image`, `encode_text`)
and the logits z = t u.v (+ b) (`logits`); which loss applies is the model's
setting (`model.cfg.loss`, see zoo/multimodal/clip.py for the equations).
Padding rows of the last eval batch (weight 0) are neither queries nor
candidates. Training metrics are in-batch: `accuracy` is image-to-text top-1
among the batch's captions. Evaluation embeds the whole split and reports
retrieval recall@1/5 in both directions over all of it, and zero-shot
classification accuracy with one text prompt per class name
(`PROMPT.format(name)`).

Gradient accumulation splits the batch into micro-batches, each its own set
of negatives: with grad_accum_steps > 1 the loss is that of the smaller
batches (as in CLIP implementations without a gathered negative cache).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from zoo.training.tasks.base import Task

PROMPT = "a photo of a {}."


def contrastive_sums(z: jax.Array, weights: jax.Array, loss: str) -> Dict[str, jax.Array]:
  """Loss and in-batch image-to-text top-1 sums of the logits z [B, B] (row i pairs column i)."""
  w = weights.astype(jnp.float32)
  valid = w > 0
  n = z.shape[0]
  diag = jnp.arange(n)
  masked = jnp.where(valid[None, :], z, -jnp.inf)
  if loss == "softmax":
    lse_rows = jax.nn.logsumexp(masked, axis=1)
    lse_cols = jax.nn.logsumexp(jnp.where(valid[:, None], z, -jnp.inf), axis=0)
    per = 0.5 * ((lse_rows - jnp.diagonal(z)) + (lse_cols - jnp.diagonal(z)))
    loss_sum = jnp.sum(jnp.where(valid, per, 0.0))
  elif loss == "sigmoid":
    labels = 2.0 * jnp.eye(n) - 1.0
    pair = (valid[:, None] & valid[None, :]).astype(jnp.float32)
    loss_sum = -jnp.sum(pair * jax.nn.log_sigmoid(labels * z))
  else:
    raise ValueError(f"unknown contrastive loss {loss!r} (model.loss)")
  correct = (jnp.argmax(masked, axis=1) == diag).astype(jnp.float32)
  return {"loss_sum": loss_sum, "weight_sum": jnp.sum(w), "correct_sum": jnp.sum(correct * w)}


def recall_at(sim: np.ndarray, ks=(1, 5)) -> Dict[int, float]:
  """Rows are queries, column i the match of row i: share of rows whose match ranks < k."""
  own = sim[np.arange(len(sim)), np.arange(len(sim))][:, None]
  rank = np.sum(sim > own, axis=1)
  return {k: float(np.mean(rank < k)) for k in ks}


class ContrastiveTask(Task):
  unit = "examples"
  model_fields = ("vocab_size",)
  collects = True  # evaluation gathers embeddings over the whole split (`collect`)

  def __call__(self, model, batch, rng=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    del rng
    z = model.logits(model.encode_image(batch["image"]), model.encode_text(batch["text"]))
    sums = contrastive_sums(z, batch["weights"], model.cfg.loss)
    return sums["loss_sum"] / jnp.maximum(sums["weight_sum"], 1.0), sums

  def train_flops_per_step(self, model, config) -> float:
    return model.train_flops_per_example(int(config.seq_len)) * self.units_per_step(config)

  def collect(self, model, batch) -> Dict[str, jax.Array]:
    """Per-example outputs evaluation keeps: both embeddings, the label, the weight."""
    return {"image": model.encode_image(batch["image"]), "text": model.encode_text(batch["text"]),
            "label": batch["label"], "weights": batch["weights"]}

  def finalize_collected(self, outputs: Dict[str, np.ndarray], model, data_cfg,
                         seq_len: int) -> Dict[str, float]:
    """Retrieval over the whole split and zero-shot accuracy with class-name prompts."""
    import zoo.data  # pylint: disable=g-import-not-at-top
    keep = outputs["weights"] > 0
    img, txt, labels = outputs["image"][keep], outputs["text"][keep], outputs["label"][keep]
    sim = img @ txt.T
    i2t, t2i = recall_at(sim), recall_at(sim.T)
    out = {"examples": float(keep.sum()), "i2t_recall@1": i2t[1], "i2t_recall@5": i2t[5],
           "t2i_recall@1": t2i[1], "t2i_recall@5": t2i[5]}
    names: List[str] = zoo.data.class_names(data_cfg)
    if names and np.all(labels >= 0):
      tok = zoo.data.get_tokenizer(data_cfg)
      prompts = np.full((len(names), seq_len), tok.pad_id or 0, np.int32)
      for i, name in enumerate(names):  # encoded as the captions are
        ids = (([tok.bos_id] if data_cfg.get("add_bos", True) else [])
               + list(tok.encode(PROMPT.format(name)))
               + ([tok.eos_id] if data_cfg.get("add_eos", True) else []))[:seq_len]
        prompts[i, :len(ids)] = ids
      class_emb = np.asarray(model.encode_text(jnp.asarray(prompts)))
      out["zero_shot_accuracy"] = float(np.mean(np.argmax(img @ class_emb.T, axis=1) == labels))
      out["zero_shot_chance"] = 1.0 / len(names)
    return out
