"""Shared Orbax checkpoints: round trips, across device counts and meshes, from a training
run, the inspector, and refusals that lose nothing."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import zoo.hub as hub
from tests.zoo.training import runs
from zoo.registry import build_model

LM = dict(name="llama_lm", vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
          mlp_dim=64, attention="gated,mha", attention_options="gate=headwise")
TOKENS = np.arange(24, dtype=np.int32).reshape(2, 12) % 64


def _params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("cfg", [
    LM,
    dict(name="vit", num_classes=5, image_size=16, patch_size=4, variant="Ti", num_layers=1,
         pool="map"),
    dict(name="clip", vocab_size=40, loss="sigmoid",
         image=dict(image_size=16, patch_size=4, variant="Ti", num_layers=1),
         text=dict(d_model=32, num_layers=1, num_heads=2, mlp_dim=64)),
    dict(name="captioner", vocab_size=40, d_model=32, num_layers=1, num_heads=2, mlp_dim=64,
         image=dict(image_size=16, patch_size=4, variant="Ti", num_layers=1)),
], ids=lambda c: c["name"])
def test_round_trip_rebuilds_the_model_from_the_checkpoint_alone(cfg, tmp_path):
  model = build_model(ml_collections.ConfigDict(cfg), seed=3)
  hub.save(model, tmp_path / "ckpt")
  loaded, model_cfg = hub.load(tmp_path / "ckpt")
  assert type(loaded) is type(model) and loaded.cfg == model.cfg
  assert model_cfg.name == cfg["name"]
  for a, b in zip(_params(model), _params(loaded), strict=True):
    assert a.dtype == b.dtype and np.array_equal(a, b)


def test_refuses_to_overwrite_and_a_bad_directory_is_named(tmp_path):
  model = build_model(ml_collections.ConfigDict(LM))
  path = hub.save(model, tmp_path / "ckpt")
  before = {f: open(os.path.join(path, f), "rb").read() for f in ["zoo.json"]}
  with pytest.raises(FileExistsError, match="overwrite=True"):
    hub.save(build_model(ml_collections.ConfigDict(LM), seed=1), path)
  assert open(os.path.join(path, "zoo.json"), "rb").read() == before["zoo.json"]
  other = build_model(ml_collections.ConfigDict(LM), seed=1)
  hub.save(other, path, overwrite=True)
  loaded, _ = hub.load(path)
  assert np.array_equal(_params(loaded)[0], _params(other)[0])
  with pytest.raises(FileNotFoundError, match="no zoo.json"):
    hub.load(tmp_path)


def test_a_checkpoint_that_does_not_fit_its_config_is_refused(tmp_path):
  import json
  path = hub.save(build_model(ml_collections.ConfigDict(LM)), tmp_path / "ckpt")
  meta = json.load(open(os.path.join(path, "zoo.json")))
  meta["model"]["mlp_dim"] = 96
  json.dump(meta, open(os.path.join(path, "zoo.json"), "w"))
  with pytest.raises(ValueError, match="do not match the model its config builds"):
    hub.load(path)


def test_inspector_names_every_parameter(tmp_path):
  model = build_model(ml_collections.ConfigDict(LM))
  path = hub.save(model, tmp_path / "ckpt")
  proc = subprocess.run([sys.executable, "-m", "zoo.hub.inspect", path], cwd=runs.ROOT,
                        env=runs.env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for names, v in flat:
    name = ".".join(str(n) for n in names)
    line = next(l for l in proc.stdout.splitlines() if l.split()[:1] == [name])
    assert str(tuple(v.shape)) in line and str(v.dtype) in line
  assert '"gated,mha"' in proc.stdout and "attention-zoo/model" in proc.stdout
  total = sum(int(np.prod(v.shape)) for _, v in flat)
  assert f"total: {total:,} parameters" in proc.stdout
  bad = subprocess.run([sys.executable, "-m", "zoo.hub.inspect", str(tmp_path)], cwd=runs.ROOT,
                       env=runs.env(), capture_output=True, text=True, timeout=120)
  assert bad.returncode == 1 and "no zoo.json" in bad.stderr


# Runs in a process with 8 simulated devices: saves from, or loads onto, a data=2 x tensor=4
# mesh, and prints the logits.
EIGHT = textwrap.dedent("""
    import sys, numpy as np, jax, ml_collections
    from flax import nnx
    import zoo.hub as hub
    from zoo.registry import build_model
    from zoo.training import sharding as shd
    mode, path, cfg = sys.argv[1], sys.argv[2], eval(sys.argv[3])
    assert jax.device_count() == 8
    mesh = shd.make_mesh(ml_collections.ConfigDict(dict(data=2, tensor=4)))
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % 64
    if mode == "save":
      model = build_model(ml_collections.ConfigDict(cfg), seed=5)
      state = nnx.state(model, nnx.Param)
      specs = shd.param_specs(state, mesh)
      pure = jax.tree.map(lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(mesh, s)),
                          nnx.to_pure_dict(state), specs)
      nnx.replace_by_pure_dict(state, pure)
      nnx.update(model, state)
      q = model.blocks[0].attention.qkv.q.kernel[...]
      assert len(q.sharding.device_set) == 8
      hub.save(model, path)
    else:
      model, _ = hub.load(path, mesh=mesh)
      q = model.blocks[0].attention.qkv.q.kernel[...]
      assert q.sharding.spec[1] == "tensor", q.sharding
      assert len(q.sharding.device_set) == 8
    np.save(path + f".{mode}.npy", np.asarray(model(tokens)))
""")


def _eight(mode, path):
  proc = subprocess.run([sys.executable, "-c", EIGHT, mode, str(path), repr(LM)], cwd=runs.ROOT,
                        env=runs.env(devices=8), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return np.load(str(path) + f".{mode}.npy")


def test_saved_on_eight_devices_loads_on_one_and_back(tmp_path):
  ref = _eight("save", tmp_path / "sharded")
  model, _ = hub.load(tmp_path / "sharded")  # this process: one device
  assert jax.device_count() == 1
  np.testing.assert_allclose(model(jnp.asarray(TOKENS)), ref, rtol=1e-5, atol=1e-5)
  hub.save(model, tmp_path / "single")
  again = _eight("load", tmp_path / "single")
  np.testing.assert_allclose(again, ref, rtol=1e-5, atol=1e-5)


def test_publishing_a_training_run(tmp_path, monkeypatch):
  from configs import lm_tiny
  from zoo.training.loop import train
  config = lm_tiny.get_config()
  config.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64)
  config.update(total_steps=2, batch_size=2, seq_len=32, checkpoint_every=2, eval_every=0,
                eval_batches=1, log_every=1)
  config.optimizer.warmup_steps = 1
  workdir = str(tmp_path / "run")
  train(config, workdir)
  monkeypatch.chdir(tmp_path)  # a relative workdir, as on a command line
  model, model_cfg = hub.load_run("run")
  assert model_cfg.name == "llama_lm" and model_cfg.d_model == 32
  path = hub.save(model, tmp_path / "published", model_cfg=model_cfg)
  loaded, _ = hub.load(path)
  toks = jnp.asarray(TOKENS % model_cfg.vocab_size)
  np.testing.assert_array_equal(loaded(toks), model(toks))
  with pytest.raises(FileNotFoundError, match="no checkpoints in --workdir"):
    hub.load_run(str(tmp_path / "nowhere"))
