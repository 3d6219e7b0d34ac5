"""Shared `model` fields of the ViT image encoder (zoo/vision/vit.py) and the image data
defaults; vit_tiny and the image towers of clip/captioner recipes start from these.

Every field is a flag (`--config.model.patch_size=8`, `--config.model.pool=map`,
`--config.model.prune_layers=2,4 --config.model.keep_ratio=0.5`).
"""

import ml_collections

import zoo.data


def vit_config(**overrides) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.name = "vit"
  m.num_classes = ml_collections.config_dict.placeholder(int)  # None: the dataset's
  m.image_size = 32
  m.num_channels = 3
  m.patch_size = 4  # any divisor of image_size (8/14/16/32 at 224 px)
  m.variant = "Ti"  # Ti | S | M | B | L | H: width/depth/heads/MLP of the ViT tables
  # Explicit sizes override the variant's (None: the variant's).
  m.d_model = ml_collections.config_dict.placeholder(int)
  m.num_layers = ml_collections.config_dict.placeholder(int)
  m.num_heads = ml_collections.config_dict.placeholder(int)
  m.mlp_dim = ml_collections.config_dict.placeholder(int)
  m.num_kv_heads = ml_collections.config_dict.placeholder(int)
  m.head_dim = ml_collections.config_dict.placeholder(int)
  m.mlp_kind = "gelu"
  m.mlp_activation = ml_collections.config_dict.placeholder(str)  # gelu_exact (HF), quick_gelu (CLIP)
  m.norm = "layernorm"
  m.norm_eps = 1e-6
  m.use_bias = True
  m.patch_bias = True  # False: CLIP's patch embedding
  m.pre_norm = False  # True: a norm before the first block (CLIP's pre_layrnorm)
  m.attention = "mha"  # any non-causal family id, or a per-layer pattern
  m.attention_options = ""
  m.posemb = "learn"  # learn | sincos2d
  m.class_token = ml_collections.config_dict.placeholder(bool)  # None: exactly when pool=cls
  m.pool = "cls"  # cls | gap | map | attentive_probe | lowrank_pool
  m.pooling_options = ""  # "key=value,..." of the pooling head (layers/pooling.py)
  m.prune_layers = ""  # e.g. "3,6,9": EET token pruning by class-token attention
  m.keep_ratio = "0.7"  # one ratio, or one per pruning layer ("0.7,0.7,0.5")
  m.dtype = "float32"
  m.param_dtype = "float32"
  m.implementation = "auto"
  m.remat = False
  m.update(overrides)
  return m


def shapes_data(**overrides) -> ml_collections.ConfigDict:
  """The embedded procedural image-caption dataset (zoo/data/builders/shapes)."""
  d = zoo.data.default_data_config("shapes")
  d.update(overrides)
  return d
