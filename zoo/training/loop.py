"""The one train loop: every model, task and mesh goes through `train`.

Reads like big_vision's train.py: validate the config (every bad setting is an
error naming it, before any compute), build the mesh, the model's sharded
state and the data iterator, restore the latest checkpoint if the workdir has
one, then step: jit(train_step) over global batches, logging a progress line
and metrics, evaluating and checkpointing on schedule. A resumed run
continues the exact trajectory: the checkpoint holds params, optimizer state,
step and the data-iterator position.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

import zoo.data
from zoo.training import checkpointing, sharding as shd
from zoo.training.evaluation import eval_step_fn, run_eval
from zoo.training.flops import measured_peak_flops
from zoo.training.metrics import MetricsWriter, progress_line
from zoo.training.optimizer import make_schedule
from zoo.training.state import init_train_state, make_model_setup
from zoo.training.tasks import get_task, objective_sum


def resolve_config(config):
  """Validates the run-level settings and fills what the data decides (vocab size).

  Returns a copy; raises ValueError naming the setting at fault.
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for name in ("total_steps", "batch_size", "seq_len"):
      if int(config[name]) <= 0:
        raise ValueError(f"{name}={config[name]} must be positive")
    for name in ("checkpoint_every", "eval_every", "log_every"):
      if int(config.get(name, 0)) < 0:
        raise ValueError(f"{name}={config[name]} must be >= 0")
    accum = int(config.get("grad_accum_steps", 1))
    if accum <= 0 or config.batch_size % accum:
      raise ValueError(
          f"grad_accum_steps={accum} must be positive and divide batch_size={config.batch_size}")
    task = get_task(config.task)
    # What the data decides (vocab_size, num_classes) fills the model config where unset.
    for field, from_data in task.model_values(config.data).items():
      if config.model.get(field) is None:
        config.model[field] = from_data
      elif config.model[field] < from_data:
        raise ValueError(
            f"model.{field}={config.model[field]} is smaller than the {field} of "
            f"data.name={config.data.name!r} ({from_data})")
    max_len = config.model.get("max_seq_len")
    if max_len is not None and config.seq_len > max_len:
      raise ValueError(f"seq_len={config.seq_len} exceeds model.max_seq_len={max_len}")
  return config


def _check_batch_layout(config, mesh) -> int:
  """Per-host batch size; errors if the global batch does not split over hosts/devices."""
  dp = shd.data_parallel_size(mesh)
  accum = int(config.get("grad_accum_steps", 1))
  per_micro = config.batch_size // accum
  if per_micro % dp:
    raise ValueError(
        f"batch_size={config.batch_size} / grad_accum_steps={accum} = {per_micro} is not divisible "
        f"by the data-parallel size {dp} (mesh.data x mesh.fsdp)")
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size={config.batch_size} is not divisible by {jax.process_count()} hosts")
  return config.batch_size // jax.process_count()


def make_train_step(setup, task, config, schedule):
  """One optimiser step: gradients of the task's objective, summed over micro-batches and
  divided by the task's unit count (`weight_sum`), so accumulation equals one large batch."""
  accum = int(config.get("grad_accum_steps", 1))

  def loss_sum(params, mb, rng):
    _, sums = task(setup.merge(params), mb, rng)
    return objective_sum(sums), sums

  grad_fn = jax.grad(loss_sum, has_aux=True)

  def train_step(state, batch):
    params = state["params"]
    rng = jax.random.fold_in(jax.random.key(int(config.seed)), state["step"])
    if accum == 1:
      grads, sums = grad_fn(params, batch, rng)
    else:
      # [B, ...] -> [accum, B/accum, ...], keeping each device's rows on that device.
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1),
          batch)

      def body(carry, xs):
        mb, i = xs
        g, s = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, s)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng))
      (grads, sums), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
    denom = jnp.maximum(sums["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = setup.tx.update(grads, state["opt_state"], params)
    new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                 "opt_state": opt_state}
    metrics = dict(task.step_metrics(sums), grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state["step"]))
    return new_state, metrics

  return train_step


def train(config, workdir: str) -> Dict[str, float]:
  """Trains `config` in `workdir`; returns the final evaluation metrics."""
  config = resolve_config(config)
  mesh = shd.make_mesh(config.mesh)
  local_batch = _check_batch_layout(config, mesh)
  setup = make_model_setup(config, mesh)  # validates model.* before any compute
  task = get_task(config.task)
  config_json = config.to_json()
  # Opening the data validates data.* (missing datasets, bad settings) before anything is written.
  train_iter = zoo.data.build_iterator(
      config.data, split=config.data.get("train_split", "train"), seq_len=config.seq_len,
      batch_size=local_batch, seed=config.seed, train=True, shard_index=jax.process_index(),
      shard_count=jax.process_count())

  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.get("keep_checkpoints", 3))
  ckpt.check_compatible(json.loads(config_json))

  state = init_train_state(setup, mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  start = ckpt.latest_step()
  if start is not None:
    state, _ = ckpt.restore(checkpointing.abstract_like(state), start, data_iterator=train_iter)
  start = int(start or 0)

  schedule = make_schedule(config.optimizer, config.total_steps)
  batch_sharding = shd.batch_sharding(mesh)
  step_fn = jax.jit(make_train_step(setup, task, config, schedule), donate_argnums=0,
                    out_shardings=(state_shardings, None))
  eval_step = eval_step_fn(setup, task)

  writer = MetricsWriter(workdir, resume_step=start)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_json)
  units_per_step = task.units_per_step(config)
  flops_per_step = task.train_flops_per_step(setup.abstract_model, config)
  # Composite models (clip) keep dtypes per tower; their peak is measured at float32.
  peak = (config.get("peak_flops_per_device")
          or measured_peak_flops(config.model.get("dtype") or "float32"))
  peak_total = peak * jax.device_count()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  writer.print(f"model {config.model.name}: {n_params:,} params | mesh {dict(mesh.shape)} | "
               f"{'resuming at step ' + str(start) if start else 'starting'} | workdir {workdir}")

  log_every = max(int(config.log_every), 1)
  t_last, step_last = time.perf_counter(), start
  step = start
  for step in range(start + 1, config.total_steps + 1):
    batch = shd.host_to_global(next(train_iter), batch_sharding)
    state, metrics = step_fn(state, batch)
    if step % log_every == 0 or step == config.total_steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.perf_counter()
      dt = (now - t_last) / (step - step_last)
      m[f"{task.unit}_per_s"] = units_per_step / dt
      m["mfu"] = flops_per_step / dt / peak_total
      m["step_time_s"] = dt
      writer.write(step, "train", m)
      writer.print(progress_line(step, config.total_steps, m, dt * (config.total_steps - step)))
      t_last, step_last = time.perf_counter(), step
    if config.eval_every and step % config.eval_every == 0 and step != config.total_steps:
      _evaluate_and_log(config, task, state["params"], eval_step, batch_sharding, writer, step)
      t_last = time.perf_counter()
    if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.total_steps:
      ckpt.save(step, state, config_json=config_json, data_iterator=train_iter)
      t_last = time.perf_counter()

  final = _evaluate_and_log(config, task, state["params"], eval_step, batch_sharding, writer,
                            step, prefix="final eval")
  ckpt.close()
  writer.close()
  return final


def _evaluate_and_log(config, task, params, eval_step, batch_sharding, writer, step,
                      prefix: str = "eval") -> Dict[str, float]:
  m = run_eval(config, task, config.data, params, eval_step, batch_sharding,
               max_batches=int(config.get("eval_batches", 0)))
  writer.write(step, "eval", m)
  writer.print(f"{prefix} @ step {step}: " + " | ".join(f"{k} {v:.4g}" for k, v in m.items()))
  return m
