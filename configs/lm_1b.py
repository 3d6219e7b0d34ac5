"""lm_1b: a 1B-class Llama recipe (Llama-3.2-1B shape: 16 layers, width 2048,
32 query / 8 KV heads, SwiGLU 8192, tied embeddings, RoPE base 500k; 1.24B
params with a 128k vocabulary), bfloat16 activations, FSDP over every device.

For accelerators. Needs a prepared tfds dataset and a tokenizer file:

    python train.py --config=configs/lm_1b.py --workdir=gs://.../lm_1b \
      --config.data.name=tfds:c4/en --config.data.data_dir=/path/to/tfds \
      --config.data.tokenizer=/path/to/tokenizer.json

Warmup-stable-decay schedule so the run can be extended or cut with a short decay.
"""

from configs.lm_base import lm_config


def get_config(arg=None):
  del arg
  c = lm_config(d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                mlp_dim=8192, rope_base=500_000.0, max_seq_len=8192, dtype="bfloat16",
                remat=True)
  c.model.vocab_size = 128_256
  c.total_steps = 100_000
  c.batch_size = 256
  c.seq_len = 2048
  c.log_every = 50
  c.eval_every = 2000
  c.eval_batches = 50
  c.checkpoint_every = 1000
  c.optimizer.learning_rate = 3e-4
  c.optimizer.schedule = "wsd"
  c.optimizer.warmup_steps = 2000
  c.optimizer.weight_decay = 0.1
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.eval_tasks = "text"
  return c
