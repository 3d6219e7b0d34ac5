"""optax optimizers and learning-rate schedules, chosen in `config.optimizer`.

Schedules:
  * constant: warmup then flat.
  * warmup_cosine: linear warmup to `learning_rate`, cosine decay to
    `learning_rate * min_lr_ratio` at `total_steps`.
  * wsd (warmup-stable-decay, "MiniCPM: Unveiling the Potential of Small
    Language Models with Scalable Training Strategies"): linear warmup, flat,
    then a linear decay to `min_lr_ratio` over the last `decay_fraction` of steps.
Weight decay skips vectors (norm scales, biases). Gradients are clipped by
global norm (`clip_norm`; 0 disables). Gradient accumulation is done by the
loop (`grad_accum_steps` micro-batches per step), not here.
"""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("constant", "warmup_cosine", "wsd")
OPTIMIZERS = ("adamw", "adam", "sgd")


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  lr = float(opt_cfg.learning_rate)
  warmup = int(opt_cfg.warmup_steps)
  end = lr * float(opt_cfg.get("min_lr_ratio", 0.0))
  kind = opt_cfg.schedule
  if warmup < 0:
    raise ValueError(f"optimizer.warmup_steps={warmup} must be >= 0")
  # The first update already uses lr / warmup (a warmup from 0 would waste step 1).
  warm = optax.linear_schedule(lr / max(warmup, 1), lr, max(warmup - 1, 0))
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "warmup_cosine":
    main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1), alpha=end / lr if lr else 0.0)
  elif kind == "wsd":
    frac = float(opt_cfg.get("decay_fraction", 0.2))
    if not 0.0 <= frac <= 1.0:
      raise ValueError(f"optimizer.decay_fraction={frac} must be in [0, 1]")
    decay = max(int(round(frac * total_steps)), 1)
    stable = max(total_steps - warmup - decay, 0)
    main = optax.join_schedules(
        [optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)], [stable])
  else:
    raise ValueError(f"optimizer.schedule={kind!r} is not one of {SCHEDULES}")
  return optax.join_schedules([warm, main], [warmup]) if warmup else main


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
  schedule = make_schedule(opt_cfg, total_steps)
  name = opt_cfg.name
  if name == "adamw":
    tx = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                     weight_decay=opt_cfg.weight_decay, mask=_decay_mask)
  elif name == "adam":
    tx = optax.adam(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
  elif name == "sgd":
    tx = optax.sgd(schedule, momentum=opt_cfg.get("momentum", 0.9))
  else:
    raise ValueError(f"optimizer.name={name!r} is not one of {OPTIMIZERS}")
  clip = float(opt_cfg.get("clip_norm", 0.0))
  if clip < 0:
    raise ValueError(f"optimizer.clip_norm={clip} must be >= 0")
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx
