"""The train step: gradient accumulation is exact, and the step counts, clips and decays."""

import jax
import numpy as np

from configs import lm_tiny
from tests.numerics import rel_err
from zoo.training import sharding as shd
from zoo.training.loop import make_train_step, resolve_config
from zoo.training.optimizer import make_schedule
from zoo.training.state import init_train_state, make_model_setup
from zoo.training.tasks import get_task


def _setup(accum):
  c = lm_tiny.get_config()
  c.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64)
  c.seq_len, c.batch_size, c.grad_accum_steps = 16, 8, accum
  c = resolve_config(c)
  mesh = shd.make_mesh(c.mesh)
  setup = make_model_setup(c, mesh)
  step = jax.jit(make_train_step(setup, get_task("lm"), c, make_schedule(c.optimizer, c.total_steps)))
  return init_train_state(setup, mesh), step


def _batch():
  rng = np.random.default_rng(0)
  toks = rng.integers(3, 259, (8, 17), dtype=np.int32)
  w = np.ones((8, 16), np.float32)
  w[:3, 10:] = 0  # uneven weights: accumulation must weight micro-batches by tokens
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": w,
          "segment_ids": np.ones((8, 16), np.int32),
          "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}


def test_grad_accumulation_equals_one_big_batch():
  s1, step1 = _setup(1)
  s4, step4 = _setup(4)
  b = _batch()
  for _ in range(2):
    s1, m1 = step1(s1, b)
    s4, m4 = step4(s4, b)
  assert rel_err(m4["loss"], m1["loss"]) < 1e-5
  for a, c in zip(jax.tree.leaves(s4["params"]), jax.tree.leaves(s1["params"])):
    assert rel_err(a, c) < 1e-4
  assert int(s4["step"]) == int(s1["step"]) == 2
