"""The run-level fields every recipe shares (steps, batch, logging, checkpoints, optimizer,
mesh); each model family's base (lm_base, vit_base, ...) adds `model`, `data` and `task`.

Every field is a flag: `--config.FIELD=VALUE` (e.g. `--config.total_steps=100`,
`--config.optimizer.learning_rate=1e-3`, `--config.mesh.tensor=2`).
"""

import ml_collections


def run_config(task: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = task  # lm | recall | mlm | classification ... (zoo/training/tasks/)
  c.total_steps = 1000
  c.batch_size = 16  # global, in sequences
  c.seq_len = 256
  c.grad_accum_steps = 1  # micro-batches per step (batch_size must divide)
  c.log_every = 10
  c.eval_every = 0  # 0: only the final evaluation
  c.eval_batches = 0  # held-out batches per evaluation; 0: the whole split
  c.checkpoint_every = 100
  c.keep_checkpoints = 3
  c.peak_flops_per_device = ml_collections.config_dict.placeholder(float)  # None: measured

  c.optimizer = ml_collections.ConfigDict()
  o = c.optimizer
  o.name = "adamw"
  o.learning_rate = 3e-3
  o.schedule = "warmup_cosine"  # constant | warmup_cosine | wsd
  o.warmup_steps = 50
  o.min_lr_ratio = 0.1
  o.decay_fraction = 0.2  # wsd only
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1
  o.clip_norm = 1.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  # eval.py's tasks: "text" is the held-out split of the run's own data.
  c.eval_tasks = "text"
  return c
