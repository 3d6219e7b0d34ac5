"""encoder_mlm_base: ModernBERT-base's shape (22 layers, width 768, 12 heads, GeGLU MLP
1152, global attention every third layer, 128-token local windows, RoPE 160k/10k) trained
with masked LM at seq_len 1024 on a tfds text corpus with a subword tokenizer.

    python train.py --config=configs/encoder_mlm_base.py --workdir=/tmp/mlm_base \
        --config.data.name=tfds:c4/en:3.1.0 --config.data.data_dir=/path/to/tfds \
        --config.data.tokenizer=/path/to/tokenizer.json

Runtime and result: not measured here (an accelerator job). The shape is the paper's
"base (150M parameters)" model; its 2T-token training is far beyond this recipe's
steps, which are a starting point.
"""

from configs.base import run_config
from configs.encoder_mlm_tiny import encoder_config

import zoo.data


def get_config(arg=None):
  del arg
  c = run_config("mlm")
  c.model = encoder_config(d_model=768, num_layers=22, num_heads=12, mlp_dim=1152,
                           local_window=128, max_seq_len=8192, dtype="bfloat16")
  c.data = zoo.data.default_data_config("pydoc_text")
  c.seq_len = 1024
  c.batch_size = 256
  c.total_steps = 100_000
  c.log_every = 100
  c.eval_every = 5000
  c.eval_batches = 50
  c.checkpoint_every = 5000
  c.optimizer.learning_rate = 8e-4
  c.optimizer.warmup_steps = 3000
  c.optimizer.schedule = "wsd"
  c.optimizer.weight_decay = 1e-5
  return c
