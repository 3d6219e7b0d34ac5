"""Shared defaults of the decoder-LM recipes; each recipe file overrides what differs.

Every field is a flag: `--config.FIELD=VALUE` (e.g. `--config.model.attention=mha`,
`--config.mesh.tensor=2`, `--config.data.name=mqar`).
"""

import ml_collections

import zoo.data
from configs.base import run_config


def lm_config(**model_overrides) -> ml_collections.ConfigDict:
  c = run_config("lm")
  c.model = ml_collections.ConfigDict()
  m = c.model
  m.name = "llama_lm"
  m.vocab_size = ml_collections.config_dict.placeholder(int)  # None: the dataset's
  m.d_model = 256
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 4
  m.head_dim = ml_collections.config_dict.placeholder(int)  # None: d_model // num_heads
  m.mlp_dim = 688
  m.mlp_kind = "swiglu"  # swiglu | geglu | gelu | relu
  m.mlp_activation = ml_collections.config_dict.placeholder(str)  # gelu_exact | quick_gelu ...
  m.use_bias = False  # biases in the attention and MLP projections (GPT-2)
  m.position_embedding = ml_collections.config_dict.placeholder(str)  # "learned" (GPT-2)
  m.norm = "rmsnorm"  # rmsnorm | layernorm
  m.norm_eps = 1e-6
  m.attention = "mha"  # a family id, or a comma-separated per-layer pattern
  m.positional = "rope"  # rope | nope | alibi | bam | nope_hybrid | cope | rope_imag | rope_buckets
  m.rope_base = 10_000.0
  m.rope_scaling = 1.0  # context-extension factor
  m.rope_scaling_type = "linear"  # linear | ntk | yarn | llama3 | truncated
  m.rope_original_max_len = ml_collections.config_dict.placeholder(int)  # yarn, llama3, truncated
  # nope_hybrid: per-layer "rope"/"nope" list cycled over layers (None: "rope,rope,rope,nope")
  m.positional_schedule = ml_collections.config_dict.placeholder(str)
  m.rope_window = ml_collections.config_dict.placeholder(int)  # nope_hybrid: RoPE layers' window
  m.window = ml_collections.config_dict.placeholder(int)  # sliding window for every layer
  m.tie_embeddings = True
  m.max_seq_len = 2048
  m.dtype = "float32"  # activations: float32 | bfloat16
  m.param_dtype = "float32"
  m.implementation = "auto"  # attention backend: auto | xla | reference | pallas ...
  m.remat = False
  # Family options as "key=value,key=value" (e.g. "gate=headwise"); see each family's docstring.
  m.attention_options = ""
  m.update(model_overrides)

  c.data = zoo.data.default_data_config("pydoc_text")

  # eval.py: held-out text plus synthetic recall probes at seq_len.
  c.eval_tasks = "text,mqar,passkey"
  return c
