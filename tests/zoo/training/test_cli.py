"""Bad input: a one-line error naming the setting, exit code 2, and nothing saved is touched."""

import pytest

from tests.zoo.training import runs

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("flag,names", [
    ("--config.model.bogus=1", "--config.model.bogus"),
    ("--config.batch_size=abc", "--config.batch_size"),
    ("--config.model.attention=bogus", "model.attention"),
    ("--config.model.positional=bogus", "model.positional"),
    ("--config.model.num_kv_heads=3", "num_kv_heads=3"),
    ("--config.mesh.tensor=3", "mesh.tensor"),
    ("--config.data.name=bogus", "data.name"),
    ("--config.data.name=tfds:lm1b", "data.name"),
    ("--config.seq_len=4096", "model.max_seq_len"),
    ("--config.grad_accum_steps=3", "grad_accum_steps"),
    ("--config.optimizer.schedule=bogus", "optimizer.schedule"),
])
def test_bad_settings_fail_in_one_line_before_writing(tmp_path, flag, names):
  workdir = tmp_path / "w"
  proc = runs.run("train.py", str(workdir), runs.SMALL + ["--config.total_steps=2", flag])
  assert proc.returncode == 2
  errors = runs.errors_of(proc)
  assert len(errors) == 1 and names in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not workdir.exists()


def test_incompatible_checkpoint_is_refused_and_left_untouched(tmp_path):
  workdir = str(tmp_path)
  ok = runs.run("train.py", workdir, runs.SMALL + ["--config.total_steps=2"])
  assert ok.returncode == 0, ok.stderr[-2000:]
  before = runs.snapshot(workdir)
  proc = runs.run("train.py", workdir, runs.SMALL + ["--config.total_steps=4",
                                                     "--config.model.d_model=128"])
  assert proc.returncode == 2
  [error] = runs.errors_of(proc)
  assert "incompatible" in error and "model.d_model" in error
  assert runs.snapshot(workdir) == before


def test_eval_without_checkpoint_errors(tmp_path):
  proc = runs.run("eval.py", str(tmp_path / "none"), [])
  assert proc.returncode == 2 and "--workdir" in runs.errors_of(proc)[0]
