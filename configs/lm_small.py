"""lm_small: 6 layers, width 512, SwiGLU 1376, 8 heads: the model of the CPU
throughput benchmark (bench/train_throughput.py), at sequence 512.

    python train.py --config=configs/lm_small.py --workdir=/tmp/lm_small

Runtime: ~1 s/step on 2 CPU cores at batch 8; a GPU or TPU is the intended home.
"""

from configs.lm_base import lm_config


def get_config(arg=None):
  del arg
  c = lm_config(d_model=512, num_layers=6, num_heads=8, num_kv_heads=8, mlp_dim=1376,
                max_seq_len=2048)
  c.total_steps = 2000
  c.batch_size = 8
  c.seq_len = 512
  c.eval_every = 500
  c.eval_batches = 16
  c.checkpoint_every = 500
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  return c
