"""Hugging Face checkpoints <-> zoo models, one `Converter` per outside architecture.

`load_hf(path)` reads a checkpoint directory (config.json plus model.safetensors,
a sharded model.safetensors.index.json, or pytorch_model.bin), picks the
converter registered for its `model_type`, builds our model's config from the
outside config, and fills every parameter of our model from the outside
weights. `export_hf(model, path)` writes config.json and model.safetensors
back in the outside layout, loadable by `transformers.AutoModel*.from_pretrained`.

Nothing is dropped silently: every parameter of our model must be filled
exactly once with the right shape, and every outside tensor must be used or
named by the converter as ignorable (buffers such as rotary `inv_freq`);
otherwise the error names the tensors. An outside option we do not implement
is an error naming the config field (`unsupported`), never an approximation.

A converter module (zoo/hub/<arch>.py) registers a `Converter` with four
functions: config -> our `config.model`; outside tensors -> our parameters
(dotted paths of `nnx.state(model, nnx.Param)`, e.g.
"blocks.0.attention.qkv.q.kernel"); and the two inverses for export.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

# Converter modules, imported on first use so `import zoo.hub` stays light.
MODULES = ("zoo.hub.llama", "zoo.hub.gpt2", "zoo.hub.bert", "zoo.hub.modernbert",
           "zoo.hub.vit", "zoo.hub.clip")

Tensors = Dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Converter:
  """One outside architecture.

  model_types: the config.json `model_type` values it reads ("llama", "mistral" ...).
  architecture: the `architectures[0]` it writes ("LlamaForCausalLM").
  to_zoo_config(hf_config: dict) -> ConfigDict: our `config.model` (with `name`).
  to_zoo_params(tensors: Tensors, hf_config: dict, model_cfg) -> Tensors of our dotted paths.
  to_hf_config(model) -> dict: config.json of the outside model (without `architectures`).
  to_hf_tensors(params: Tensors, model) -> Tensors of outside names.
  exports(model) -> bool: whether this converter writes `model` (the first that does is used).
  ignorable(name) -> bool: outside tensors that are not weights (buffers) and may go unused.
  """

  model_types: Tuple[str, ...]
  architecture: str
  to_zoo_config: Callable[[dict], ml_collections.ConfigDict]
  to_zoo_params: Callable[[Tensors, dict, Any], Tensors]
  to_hf_config: Callable[[nnx.Module], dict]
  to_hf_tensors: Callable[[Tensors, nnx.Module], Tensors]
  exports: Callable[[nnx.Module], bool]
  ignorable: Callable[[str], bool] = lambda name: False


_REGISTRY: Dict[str, Converter] = {}
_BY_ARCHITECTURE: Dict[str, Converter] = {}


def register(converter: Converter) -> Converter:
  for t in converter.model_types:
    _REGISTRY[t] = converter
  _BY_ARCHITECTURE[converter.architecture] = converter
  return converter


def _load_modules() -> None:
  for name in MODULES:
    try:
      importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name != name:  # a converter's own import failed: a real error
        raise


def converters() -> Dict[str, Converter]:
  """model_type -> converter, for every registered architecture."""
  _load_modules()
  return dict(_REGISTRY)


def unsupported(field: str, value: Any, why: str) -> ValueError:
  """The error for an outside config option we do not implement."""
  return ValueError(f"unsupported Hugging Face config: {field}={value!r} ({why})")


def read_config(path: str) -> dict:
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"{path!r} is not a Hugging Face checkpoint directory: no config.json")
  with open(file) as f:
    return json.load(f)


def read_tensors(path: str) -> Tensors:
  """All weights of a checkpoint directory as numpy arrays (bfloat16 kept via ml_dtypes)."""
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(single) or os.path.exists(index):
    from safetensors.flax import load_file
    files = [single] if os.path.exists(single) else sorted(
        {os.path.join(path, f) for f in json.load(open(index))["weight_map"].values()})
    out: Tensors = {}
    for f in files:
      out.update({k: np.asarray(v) for k, v in load_file(f).items()})
    return out
  bin_file = os.path.join(path, "pytorch_model.bin")
  if os.path.exists(bin_file):
    import torch  # only PyTorch-format checkpoints need it
    state = torch.load(bin_file, map_location="cpu", weights_only=True)
    return {k: _torch_to_numpy(v) for k, v in state.items()}
  raise FileNotFoundError(
      f"no weights in {path!r}: expected model.safetensors, model.safetensors.index.json "
      "or pytorch_model.bin")


def _torch_to_numpy(t) -> np.ndarray:
  import torch
  if t.dtype == torch.bfloat16:
    return t.float().numpy().astype(jnp.bfloat16)
  return t.numpy()


def flat_params(model: nnx.Module) -> Tensors:
  """Our parameters as {dotted path: array}."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(str(p) for p in path): v.get_value() if hasattr(v, "get_value") else v.value
          for path, v in flat}


def assign(model: nnx.Module, params: Mapping[str, Any]) -> None:
  """Fill every parameter of `model` from `params` (dotted paths), casting to each
  parameter's dtype; missing, unexpected or misshapen entries are one error naming them."""
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(state)
  ours = {".".join(str(p) for p in path): (path, v) for path, v in flat}
  missing = sorted(set(ours) - set(params))
  unexpected = sorted(set(params) - set(ours))
  wrong = []
  for name, (_, var) in ours.items():
    if name in params and tuple(np.shape(params[name])) != tuple(var.shape):
      wrong.append(f"{name}: ours {tuple(var.shape)}, converted {tuple(np.shape(params[name]))}")
  if missing or unexpected or wrong:
    raise ValueError("converted weights do not fit the model: "
                     f"missing {missing}, unexpected {unexpected}, wrong shapes {wrong}")
  for name, (path, var) in ours.items():
    var.set_value(jnp.asarray(params[name], dtype=var.dtype))
  nnx.update(model, state)


def load_hf(path: str, *, dtype: Optional[str] = None) -> Tuple[nnx.Module, ml_collections.ConfigDict]:
  """A Hugging Face checkpoint directory -> (our model, its `config.model`).

  dtype: our model's param_dtype/dtype ("float32", "bfloat16"); None keeps float32.
  """
  from zoo.registry import build_model
  hf_config = read_config(path)
  model_type = hf_config.get("model_type")
  table = converters()
  if model_type not in table:
    raise ValueError(f"unsupported Hugging Face model_type {model_type!r} in {path}/config.json; "
                     f"supported: {sorted(table)}")
  conv = table[model_type]
  model_cfg = conv.to_zoo_config(hf_config)
  if dtype is not None:
    _set_dtype(model_cfg, dtype)
  tensors = _Tracked(read_tensors(path))
  params = conv.to_zoo_params(tensors, hf_config, model_cfg)
  left = sorted(n for n in set(tensors) - tensors.used if not conv.ignorable(n))
  if left:
    raise ValueError(f"{conv.architecture}: outside weights with no place in our model: {left}")
  model = nnx.eval_shape(lambda: build_model(model_cfg))
  assign(model, params)
  return model, model_cfg


def _set_dtype(cfg, dtype: str) -> None:
  """Sets dtype and param_dtype on the model config, or on each tower of a dual encoder or
  captioner (whose own config has `image` / `text` sub-configs instead)."""
  towers = [cfg[k] for k in ("image", "text") if k in cfg]
  for target in towers + ([cfg] if "dtype" in cfg or not towers else []):
    target["dtype"] = target["param_dtype"] = dtype


class _Tracked(dict):
  """The outside tensors, remembering which ones a converter read."""

  def __init__(self, *a, **kw):
    super().__init__(*a, **kw)
    self.used = set()

  def __getitem__(self, name):
    self.used.add(name)
    return super().__getitem__(name)

  def get(self, name, default=None):
    if name in self:
      return self[name]
    return default


def export_hf(model: nnx.Module, path: str, *, architecture: Optional[str] = None) -> str:
  """Write `model` as a Hugging Face checkpoint directory (config.json, model.safetensors).

  architecture: the outside class to write ("LlamaForCausalLM", ...); None picks the
  first registered converter that exports this model. Returns `path`.
  """
  from safetensors.numpy import save_file
  _load_modules()
  if architecture is not None:
    if architecture not in _BY_ARCHITECTURE:
      raise ValueError(f"unsupported architecture {architecture!r}; "
                       f"choose one of {sorted(_BY_ARCHITECTURE)}")
    conv = _BY_ARCHITECTURE[architecture]
    if not conv.exports(model):
      raise ValueError(f"{type(model).__name__} cannot be written as {architecture}")
  else:
    found = [c for c in _BY_ARCHITECTURE.values() if c.exports(model)]
    if not found:
      raise ValueError(f"no Hugging Face architecture takes a {type(model).__name__} with "
                       f"config {getattr(model, 'cfg', None)}")
    conv = found[0]
  hf_config = dict(conv.to_hf_config(model), architectures=[conv.architecture])
  tensors = conv.to_hf_tensors(flat_params(model), model)
  os.makedirs(path, exist_ok=True)
  # np.require keeps 0-d tensors 0-d (CLIP's logit_scale); ascontiguousarray makes them [1].
  save_file({k: np.require(np.asarray(v, dtype=np.float32)
                           if np.asarray(v).dtype == jnp.bfloat16 else np.asarray(v),
                           requirements="C")
             for k, v in tensors.items()},
            os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  return path
