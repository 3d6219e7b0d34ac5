"""Model name -> constructor. Each constructor takes the `config.model` ConfigDict."""

from __future__ import annotations

from typing import Callable, Dict

from flax import nnx


def _llama_lm(model_cfg, rngs: nnx.Rngs):
  from zoo.language.llama import DecoderLM, LMConfig
  return DecoderLM(LMConfig.from_config(model_cfg), rngs=rngs)


def _modernbert(model_cfg, rngs: nnx.Rngs):
  from zoo.language.encoder import build
  return build(model_cfg, rngs)


def _vit(model_cfg, rngs: nnx.Rngs):
  from zoo.vision.vit import build
  return build(model_cfg, rngs)


def _clip(model_cfg, rngs: nnx.Rngs):
  from zoo.multimodal.clip import build
  return build(model_cfg, rngs)


def _captioner(model_cfg, rngs: nnx.Rngs):
  from zoo.multimodal.captioner import build
  return build(model_cfg, rngs)


def _biformer_net(model_cfg, rngs: nnx.Rngs):
  from zoo.vision.biformer import build
  return build(model_cfg, rngs)


MODELS: Dict[str, Callable] = {"llama_lm": _llama_lm, "modernbert": _modernbert, "vit": _vit,
                               "biformer_net": _biformer_net, "clip": _clip,
                               "captioner": _captioner}


# The model class each name builds (module, class), for going from a model back to its name.
CLASSES: Dict[str, tuple] = {
    "llama_lm": ("zoo.language.llama", "DecoderLM"),
    "modernbert": ("zoo.language.encoder", "TextEncoder"),
    "vit": ("zoo.vision.vit", "ViT"),
    "biformer_net": ("zoo.vision.biformer", "BiFormer"),
    "clip": ("zoo.multimodal.clip", "CLIP"),
    "captioner": ("zoo.multimodal.captioner", "Captioner"),
}


def name_of(model: nnx.Module) -> str:
  """The registered name that builds `model`'s class (e.g. DecoderLM -> "llama_lm")."""
  cls = type(model)
  for name, (module, qualname) in CLASSES.items():
    if cls.__module__ == module and cls.__qualname__ == qualname:
      return name
  raise ValueError(f"{cls.__module__}.{cls.__qualname__} is not a registered model; "
                   f"registered: {sorted(MODELS)}")


def build_model(model_cfg, *, seed: int = 0) -> nnx.Module:
  name = model_cfg.get("name")
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r} (model.name); choose one of {sorted(MODELS)}")
  return MODELS[name](model_cfg, nnx.Rngs(params=seed))
