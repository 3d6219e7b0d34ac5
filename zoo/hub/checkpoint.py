"""Self-describing Orbax checkpoints for sharing a model: `save(model, path)`, `load(path)`.

A shared checkpoint is a directory:

    PATH/zoo.json   {"format": "attention-zoo/model", "format_version": 1,
                     "zoo_version": ..., "model": <config.model, with its name>,
                     "params": {dotted name: [shape, dtype]}}
    PATH/params/    the parameters as one Orbax (OCDBT) PyTree of arrays

so `load` rebuilds the model from `zoo.json` alone (no recipe file needed) and
restores each array straight into its place: onto one device by default, or
sharded over any `mesh` by the parameters' logical axes
(zoo/training/sharding.py rules) -- the device count at load time need not be
the one at save time. Only parameters are stored (no optimizer state);
`load_run(workdir)` takes them from a training run's latest checkpoint, so
`save(*load_run(workdir), path)` publishes a trained run. Saving refuses to
overwrite an existing directory unless `overwrite=True`, and then writes a
sibling first and swaps it in, so a failed save never loses the old one.
`python -m zoo.hub.inspect PATH` prints a checkpoint without loading arrays.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from zoo import registry
from zoo.training import sharding as shd
from zoo.training.checkpointing import VERSION

FORMAT = "attention-zoo/model"
FORMAT_VERSION = 1
META = "zoo.json"


def model_config(model: nnx.Module) -> ml_collections.ConfigDict:
  """The `config.model` that rebuilds `model` with `zoo.registry.build_model`."""
  name = registry.name_of(model)
  fields = {f.name: _plain(getattr(model.cfg, f.name), str(f.type))
            for f in dataclasses.fields(model.cfg)}
  return ml_collections.ConfigDict(dict(fields, name=name))


def _plain(v, declared: str):
  """Option fields declared as (key, value) pairs become dicts (as recipes write them),
  other tuples lists: the config survives JSON."""
  if isinstance(v, tuple) and declared.startswith("Tuple[Tuple[str"):
    return {k: x for k, x in v}
  if isinstance(v, tuple):
    return [list(x) if isinstance(x, tuple) else x for x in v]
  return v


def _params(model: nnx.Module) -> Dict[str, Any]:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _flat_names(tree, prefix="") -> Dict[str, Any]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat_names(v, name + "."))
    else:
      out[name] = v
  return out


def save(model: nnx.Module, path: str, *, overwrite: bool = False,
         model_cfg: Optional[ml_collections.ConfigDict] = None) -> str:
  """Writes `model`'s parameters and config to the directory `path`; returns its absolute path.

  Works from any sharding (a model trained on a mesh saves its global arrays).
  model_cfg: the config to record (default: derived from the model, `model_config`).
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  cfg = model_config(model) if model_cfg is None else model_cfg
  params = _params(model)
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "zoo_version": VERSION,
          "model": json.loads(cfg.to_json()),
          "params": {n: [list(v.shape), str(v.dtype)] for n, v in _flat_names(params).items()}}
  tmp = path + ".tmp-save"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(tmp, "params"), params)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(tmp, META), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    if os.path.exists(path):
      old = path + ".tmp-old"
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  return path


def read_meta(path: str) -> Dict[str, Any]:
  file = os.path.join(path, META)
  if not os.path.exists(file):
    raise FileNotFoundError(f"{path!r} is not a zoo checkpoint: no {META} "
                            "(a training workdir? use zoo.hub.load_run)")
  with open(file) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{file}: format {meta.get('format')!r} is not {FORMAT!r}")
  if meta.get("format_version", 0) > FORMAT_VERSION:
    raise ValueError(f"{file}: format_version {meta['format_version']} is newer than this "
                     f"zoo reads ({FORMAT_VERSION}); upgrade attention-zoo")
  return meta


def _target(abstract_params, mesh: Optional[Mesh], rules) -> Any:
  """Restore targets: ShapeDtypeStructs carrying where each array should land."""
  if mesh is None:
    one = SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=one),
                        nnx.to_pure_dict(abstract_params))
  specs = shd.param_specs(abstract_params, mesh, rules)
  pure = nnx.to_pure_dict(abstract_params)
  return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                        sharding=NamedSharding(mesh, s)),
                      pure, specs, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def load(path: str, *, mesh: Optional[Mesh] = None,
         rules=shd.RULES) -> Tuple[nnx.Module, ml_collections.ConfigDict]:
  """A checkpoint written by `save` -> (model, its config.model).

  mesh: shard the parameters over it by their logical axes (`rules`); None puts them on
  the first local device.
  """
  path = os.path.abspath(path)
  meta = read_meta(path)
  cfg = ml_collections.ConfigDict(meta["model"])
  abstract = nnx.eval_shape(lambda: registry.build_model(cfg))
  graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
  stored = meta["params"]
  ours = {n: [list(v.shape), str(v.dtype)]
          for n, v in _flat_names(nnx.to_pure_dict(abs_params)).items()}
  if ours != stored:
    diff = sorted(n for n in set(ours) | set(stored) if ours.get(n) != stored.get(n))
    raise ValueError(f"{path}: the stored parameters do not match the model its config builds "
                     f"(this zoo version): {diff[:6]}{' ...' if len(diff) > 6 else ''}")
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(path, "params"), _target(abs_params, mesh, rules))
  nnx.replace_by_pure_dict(abs_params, params)
  return nnx.merge(graphdef, abs_params, rest), cfg


def run_config(workdir: str, step: Optional[int] = None
               ) -> Tuple[ml_collections.ConfigDict, int]:
  """(the config a training run stored with its checkpoint, that checkpoint's step); the
  latest step by default. Errors name the workdir."""
  from zoo.training import checkpointing
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"no checkpoints in --workdir={workdir}")
  ckpt = checkpointing.Checkpointer(workdir)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.manager.all_steps():
      raise FileNotFoundError(f"no checkpoint at step {step} in --workdir={workdir}")
    return ml_collections.ConfigDict(json.loads(ckpt.read_meta(step)["config"])), step
  finally:
    ckpt.close()


def load_run(workdir: str, *, step: Optional[int] = None, mesh: Optional[Mesh] = None
             ) -> Tuple[nnx.Module, ml_collections.ConfigDict]:
  """The model of a training run's checkpoint (latest step by default), without its
  optimizer state: -> (model, config.model). Only the parameters are read."""
  config, step = run_config(workdir, step)
  workdir = os.path.abspath(workdir)  # Orbax reads absolute paths only
  abstract = nnx.eval_shape(lambda: registry.build_model(config.model, seed=config.seed))
  graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
  target = {"params": _target(abs_params, mesh, shd.RULES)}
  state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=jax.tree.map(
            lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target),
        partial_restore=True))
  nnx.replace_by_pure_dict(abs_params, restored["params"])
  return nnx.merge(graphdef, abs_params, rest), config.model


def describe(path: str) -> str:
  """A checkpoint's config and parameter tree (name, shape, dtype), read from metadata only."""
  meta = read_meta(path)
  lines = [f"{os.path.abspath(path)}: {meta['format']} v{meta['format_version']}, "
           f"written by attention-zoo {meta['zoo_version']}", "model:"]
  lines += [f"  {k}: {json.dumps(v)}" for k, v in sorted(meta["model"].items())]
  params = meta["params"]
  width = max((len(n) for n in params), default=0)
  total = 0
  lines.append("params:")
  for name in sorted(params):
    shape, dtype = params[name]
    size = int(np.prod(shape)) if shape else 1
    total += size
    lines.append(f"  {name:<{width}}  {str(tuple(shape)):<20} {dtype:<9} {size:,}")
  lines.append(f"total: {total:,} parameters in {len(params)} arrays")
  return "\n".join(lines)
