"""clip_tiny: a CLIP dual encoder on the embedded `shapes` image-caption pairs. Image tower:
a 4-layer width-96 ViT (patch 4, 32x32 images); text tower: a 2-layer width-96
ModernBERT-style encoder over byte-level captions, mean-pooled; 64-d joint space, softmax
(InfoNCE) loss. `--config.model.loss=sigmoid` trains SigLIP's loss instead.

    python train.py --config=configs/clip_tiny.py --workdir=/tmp/clip_tiny
    python eval.py --workdir=/tmp/clip_tiny

Evaluation: image-to-text and text-to-image recall@1/5 over the 1000 validation pairs, and
zero-shot accuracy over the 18 classes with prompts "a photo of a {colour} {shape}.".

Runtime and result (measured, 2 CPU cores shared with other jobs): 8m46s; on the 1000
validation pairs image-to-text recall@1 50.7% / @5 79.9%, text-to-image recall@1 16.6% / @5
57.9% (many captions describe near-identical scenes), zero-shot accuracy 58.8% (chance 5.6%).
"""

import ml_collections

from configs.base import run_config
from configs.encoder_mlm_tiny import encoder_config
from configs.vision_base import shapes_data, vit_config


def clip_config(**overrides) -> ml_collections.ConfigDict:
  """The `model` fields of `clip` (zoo/multimodal/clip.py); towers under image.* and text.*."""
  m = ml_collections.ConfigDict()
  m.name = "clip"
  m.vocab_size = ml_collections.config_dict.placeholder(int)  # None: the captions' tokenizer
  m.embed_dim = 128
  m.loss = "softmax"  # softmax (CLIP) | sigmoid (SigLIP)
  m.temperature_init = ml_collections.config_dict.placeholder(float)  # None: 1/0.07 or 10
  m.bias_init = -10.0  # sigmoid only
  m.pad_id = 0
  m.image = vit_config()
  m.text = encoder_config(global_every=1, max_seq_len=512)
  m.update(overrides)
  return m


def get_config(arg=None):
  del arg
  c = run_config("contrastive")
  c.model = clip_config(embed_dim=64)
  c.model.image.update(dict(d_model=96, num_layers=4, num_heads=3, mlp_dim=384, patch_size=4))
  c.model.text.update(dict(d_model=96, num_layers=2, num_heads=3, mlp_dim=192))
  c.data = shapes_data()
  c.seq_len = 64  # caption tokens (the longest shapes caption is 58)
  c.total_steps = 800
  c.batch_size = 64
  c.log_every = 20
  c.checkpoint_every = 200
  c.eval_every = 400
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 0.05
  return c
