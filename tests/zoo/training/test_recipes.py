"""Every non-LM tiny recipe through train.py as a user runs it: sharded on 8 simulated
devices (data=4, tensor=2), checkpoints, and the run's final evaluation with the recipe's
task. The recipes whose task carries per-step state across a restart (masked LM draws its
masks from (seed, step); the contrastive task evaluates the whole split) are also killed
half-way and resumed by a second invocation; resuming itself is task-agnostic and is tested
exactly (a SIGKILL reproduces the loss curve) in test_loop_e2e.py. (eval.py, which restores a
checkpoint and runs the same evaluation, is tested once in test_loop_e2e.py: another
process per recipe here would add minutes to CI and no coverage.) Models are shrunk by flags
so each takes seconds; the recipes' own runtimes and metrics are in their docstrings."""

import json
import os

import numpy as np
import pytest

from tests.zoo.training import runs

pytestmark = pytest.mark.slow

SMALL_VIT = ["d_model=32", "num_layers=2", "num_heads=2", "mlp_dim=64", "patch_size=8"]
RECIPES = {
    "vit_tiny": [f"--config.model.{f}" for f in SMALL_VIT] + [
        "--config.model.prune_layers=1", "--config.model.keep_ratio=0.5"],
    "biformer_tiny": ["--config.model.dims=16,32,32", "--config.model.depths=1,1,1"],
    "encoder_mlm_tiny": ["--config.model.d_model=32", "--config.model.num_layers=3",
                         "--config.model.num_heads=2", "--config.model.mlp_dim=64",
                         "--config.model.local_window=16", "--config.seq_len=64"],
    "clip_tiny": [f"--config.model.image.{f}" for f in SMALL_VIT] + [
        "--config.model.text.d_model=32", "--config.model.text.num_layers=1",
        "--config.model.text.num_heads=2", "--config.model.text.mlp_dim=64",
        "--config.model.embed_dim=16"],
    "captioner_tiny": [f"--config.model.image.{f}" for f in SMALL_VIT] + [
        "--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.model.variant=prefix",
        "--config.model.resampler_latents=4"],
}
COMMON = ["--config.batch_size=16", "--config.log_every=1", "--config.eval_every=0",
          "--config.optimizer.warmup_steps=2", "--config.optimizer.learning_rate=3e-3",
          "--config.mesh.data=4", "--config.mesh.tensor=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def small_data(recipe, data_dir):
  if recipe == "encoder_mlm_tiny":  # the embedded text corpus, in the shared cache
    return ["--config.eval_batches=2"]
  return [f"--config.data.data_dir={data_dir}", "--config.data.num_examples=256",
          "--config.data.num_eval_examples=48", "--config.eval_batches=0"]


RESUMED = ("encoder_mlm_tiny", "clip_tiny")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_trains_sharded_and_evaluates(recipe, tmp_path, data_dir):
  workdir = str(tmp_path)
  flags = [f"--config=configs/{recipe}.py"] + RECIPES[recipe] + COMMON + small_data(recipe, data_dir)
  halves = ([6, 12] if recipe in RESUMED else [12])
  for total in halves:
    proc = runs.run("train.py", workdir, flags + [f"--config.total_steps={total}",
                                                  "--config.checkpoint_every=6"], devices=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'data': 4" in proc.stdout and "'tensor': 2" in proc.stdout
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))
  if recipe in RESUMED:
    assert "resuming at step 6" in proc.stdout
  losses = runs.train_losses(workdir)
  assert sorted(losses) == list(range(1, 13))
  assert np.all(np.isfinite(list(losses.values())))
  assert np.mean([losses[s] for s in (11, 12)]) < np.mean([losses[s] for s in (1, 2)]), losses

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
  assert [r["step"] for r in evals] == halves  # the final evaluation of each invocation
  res = evals[-1]
  metric = {"vit_tiny": "accuracy", "biformer_tiny": "accuracy", "encoder_mlm_tiny": "accuracy",
            "captioner_tiny": "accuracy", "clip_tiny": "zero_shot_accuracy"}[recipe]
  assert 0 <= res[metric] <= 1, res
