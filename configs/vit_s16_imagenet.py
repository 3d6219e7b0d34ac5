"""vit_s16_imagenet: ViT-S/16 on ImageNet-1k at 224 px, the big_vision "ViT-S/16 in 90
epochs" setting (global batch 1024, AdamW lr 1e-3 with 10k warmup steps and cosine decay,
weight decay 1e-4, MAP-free class-token head; without its RandAugment/Mixup, which this
pipeline does not have yet). Needs `imagenet2012` prepared as ArrayRecord in data_dir
(`tfds build imagenet2012 --file_format=array_record`, manual download) and Pillow.

    python train.py --config=configs/vit_s16_imagenet.py --workdir=/tmp/vit_s16 \
        --config.data.data_dir=/path/to/tfds

Runtime and result: not measured here (a TPU/GPU job: about 112k steps). big_vision
reports 76-80% top-1 for this model with its augmentations; expect less without them.
"""

from configs.base import run_config
from configs.vision_base import vit_config

import zoo.data


def get_config(arg=None):
  del arg
  c = run_config("classification")
  c.model = vit_config(variant="S", patch_size=16, image_size=224, posemb="sincos2d")
  c.data = zoo.data.default_data_config("tfds:imagenet2012")
  c.data.image_size = 224
  c.data.eval_split = "validation"
  c.seq_len = 16  # caption tokens: imagenet has none
  c.batch_size = 1024
  c.total_steps = 112_590  # 90 epochs of 1.28M images
  c.log_every = 100
  c.eval_every = 5000
  c.checkpoint_every = 5000
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 10_000
  c.optimizer.weight_decay = 1e-4
  c.optimizer.b2 = 0.999
  c.model.dtype = "bfloat16"
  return c
