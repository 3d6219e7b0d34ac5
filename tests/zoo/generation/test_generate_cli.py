"""generate.py end to end: a checkpoint written by the test, the prompt tokenised with the run's
tokenizer, the continuation printed; and the library call it makes, in process."""

import os
import subprocess
import sys

import pytest

from configs.lm_tiny import get_config
from zoo.generation import generate
from zoo.generation.from_checkpoint import continue_text, restore_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny llama_lm run's step-0 checkpoint, saved the way the train loop saves it."""
  from zoo.training import checkpointing
  from zoo.training import sharding as shd
  from zoo.training.loop import resolve_config
  from zoo.training.state import init_train_state, make_model_setup

  config = get_config()
  config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                      max_seq_len=64)
  config.seq_len = 64
  config = resolve_config(config)
  mesh = shd.make_mesh(config.mesh)
  state = init_train_state(make_model_setup(config, mesh), mesh)
  path = str(tmp_path_factory.mktemp("run"))
  ckpt = checkpointing.Checkpointer(path)
  ckpt.save(0, state, config_json=config.to_json())
  ckpt.close()
  return path


@pytest.fixture(scope="module")
def restored(workdir):
  return restore_model(workdir)


def test_continue_text_is_the_greedy_generation_of_bos_plus_prompt(restored):
  model, config = restored
  text = continue_text(model, config, "def f(", max_new_tokens=6)
  # The bytes tokenizer: pad 0, bos 1, eos 2, byte b -> b + 3.
  ids = [1] + [b + 3 for b in b"def f("]
  tokens, n = generate(model, [ids], max_new_tokens=6, stop_tokens=(2,))
  new = [int(t) for t in tokens[0, :int(n[0])] if t != 2]
  assert text == bytes(t - 3 for t in new if t >= 3).decode("utf-8", errors="replace")


def test_generate_script_prints_the_continuation(workdir, restored):
  model, config = restored
  want = continue_text(model, config, "def f(", max_new_tokens=6, temperature=0.8, top_k=5,
                       seed=2)
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "generate.py"), f"--workdir={workdir}",
       "--prompt=def f(", "--max_new_tokens=6", "--temperature=0.8", "--top_k=5", "--seed=2"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.endswith(want + "\n")


def test_generate_script_names_bad_input(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "generate.py"), f"--workdir={tmp_path}",
       "--prompt=x"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 2
  assert "error: no checkpoints in --workdir" in proc.stderr
