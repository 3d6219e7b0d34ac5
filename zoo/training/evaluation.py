"""Evaluation: held-out metrics of a task over one deterministic pass of a split.

Metric sums are accumulated over batches (padding rows carry weight 0) and
turned into means once, by the task (`Task.finalize`): for language models
loss, perplexity, token accuracy and exact match for recall data; for
classifiers loss and accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict

import jax
import numpy as np

import zoo.data
from zoo.training import sharding as shd


@dataclasses.dataclass
class EvalStep:
  """The jitted per-batch evaluation of a task: metric sums, or for tasks that evaluate over
  the whole split (`task.collects`: retrieval) the per-example outputs to gather."""
  step: Callable
  merge: Callable
  collects: bool


def eval_step_fn(setup, task) -> EvalStep:
  collects = bool(getattr(task, "collects", False))
  if collects:
    step = jax.jit(lambda params, batch: task.collect(setup.merge(params), batch))
  else:
    # A fixed key: every evaluation of a run (and of its resumption) sees the same draws.
    step = jax.jit(lambda params, batch: task(setup.merge(params), batch, jax.random.key(0))[1])
  return EvalStep(step, setup.merge, collects)


def run_eval(config, task, data_cfg, params, eval_step, batch_sharding, *,
             max_batches: int = 0) -> Dict[str, float]:
  """Metrics over data_cfg's eval split (data.eval_split), at most max_batches (0: all)."""
  split = data_cfg.get("eval_split", "validation")
  it = zoo.data.build_iterator(
      data_cfg, split=split, seq_len=config.seq_len,
      batch_size=config.batch_size // jax.process_count(), seed=config.seed, train=False,
      shard_index=jax.process_index(), shard_count=jax.process_count())
  totals, gathered = None, []
  batches = _aligned_across_hosts(it)
  for i, local in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    out = _fetch(eval_step.step(params, shd.host_to_global(local, batch_sharding)))
    if eval_step.collects:
      gathered.append(out)
    else:
      totals = out if totals is None else {k: totals[k] + out[k] for k in totals}
  if totals is None and not gathered:
    raise ValueError(f"split {split!r} of data.name={data_cfg.name!r} yielded no batches")
  if eval_step.collects:
    outputs = {k: np.concatenate([g[k] for g in gathered]) for k in gathered[0]}
    return task.finalize_collected(outputs, eval_step.merge(params), data_cfg, config.seq_len)
  return task.finalize({k: float(np.asarray(v)) for k, v in totals.items()}, data_cfg)


def _fetch(tree):
  """Device arrays (sharded over the data axes of every host) -> numpy on this host."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def _aligned_across_hosts(it):
  """Host shards of an eval split can differ in length; every host must join every
  global batch, so a host that ran out contributes all-zero (weight 0) rows shaped
  like the batches it saw."""
  if jax.process_count() == 1:
    yield from it
    return
  from jax.experimental import multihost_utils
  it = iter(it)
  template = None
  while True:
    local = next(it, None)
    if not multihost_utils.process_allgather(np.array(local is not None)).any():
      return
    if local is None:
      if template is None:
        raise ValueError("this host's shard of the eval split is empty while others are not; "
                         "use fewer hosts or a larger eval split")
      local = {k: np.zeros_like(v) for k, v in template.items()}
    template = local
    yield local


def evaluate_checkpoint(workdir: str, *, config=None, tasks=None, step=None) -> Dict:
  """Restores a checkpoint of `workdir` and evaluates it on `tasks`; writes workdir/eval.json."""
  import json
  import os

  import ml_collections

  from zoo.training import checkpointing
  from zoo.training.loop import resolve_config
  from zoo.training.state import init_train_state, make_model_setup
  from zoo.training.tasks import get_task

  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"no checkpoints in --workdir={workdir}")
  ckpt = checkpointing.Checkpointer(workdir)
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in ckpt.manager.all_steps():
    raise FileNotFoundError(f"no checkpoint at step {step} in --workdir={workdir}")
  stored = ml_collections.ConfigDict(json.loads(ckpt.read_meta(step)["config"]))
  if config is None:
    config = stored
  else:
    config = resolve_config(config)
    ckpt.check_compatible(json.loads(config.to_json()))
  tasks = [t.strip() for t in (tasks or config.get("eval_tasks", "text")).split(",") if t.strip()]
  data_cfgs = {t: eval_data_config(config, t) for t in tasks}  # validates names first

  mesh = shd.make_mesh(config.mesh)
  setup = make_model_setup(config, mesh)
  state, _ = ckpt.restore(checkpointing.abstract_like(init_train_state(setup, mesh)), step)
  ckpt.close()
  task = get_task(config.task)
  eval_step = eval_step_fn(setup, task)
  results = {"step": int(step), "workdir": workdir}
  for t in tasks:
    results[t] = run_eval(config, task, data_cfgs[t], state["params"], eval_step,
                          shd.batch_sharding(mesh),
                          max_batches=int(config.get("eval_batches", 0)) if t == "text" else 0)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results


EVAL_TASKS = ("text", "mqar", "passkey", "selective_copy")


def eval_data_config(config, task: str):
  """Data config of an eval task: the run's own held-out text, or a synthetic probe at seq_len."""
  if task not in EVAL_TASKS:
    raise ValueError(f"unknown eval task {task!r} (--tasks / eval_tasks); choose from {EVAL_TASKS}")
  if task == "text":
    return config.data
  return zoo.data.eval_probe_config(task, seq_len=config.seq_len, data_dir=config.data.data_dir)
