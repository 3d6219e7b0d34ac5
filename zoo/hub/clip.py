"""Hugging Face CLIPModel ("clip") and SiglipModel ("siglip") <-> our `clip`
(zoo/multimodal/clip.py).

The towers are converted by their own modules: the vision tower by zoo/hub/vit.py
(`vision_*`: CLIP's pre_layrnorm / class token / quick GELU, SigLIP's MAP head), the
text tower by zoo/hub/clip_text.py (`text_*`: CLIP causal and pooled at the end token,
SigLIP bidirectional and pooled at the last slot). This module maps what joins them:

  ours                                 CLIPModel                 SiglipModel
  image_tower.*                        vision_model.*            vision_model.*
  text_tower.*                         text_model.*              text_model.* (but head)
  image_proj.kernel                    visual_projection.weight  - (image_projection=False)
  text_proj.kernel (/ .bias)           text_projection.weight    text_model.head.weight / .bias
  log_temperature                      logit_scale               logit_scale
  bias                                 -                         logit_bias
  embed_dim                            projection_dim            vision hidden_size
                                                                 (= text projection_size)
  loss                                 "softmax"                 "sigmoid"
  pad_id                               text pad_token_id         text pad_token_id

Both normalise the two embeddings and compute logits_per_image = exp(logit_scale)
u . v (+ logit_bias): our `CLIP.__call__(images, tokens)` is HF's logits_per_image,
`encode_image` / `encode_text` its image_embeds / text_embeds.

Deviations: converted models set `mask_padding=False`, so our text tower sees pads as
HF does when called without an attention_mask (SigLIP, trained on fixed-length padded
text, reads the last slot; CLIP's causal tower pooled at the end token never sees the
pads after it). Passing HF an attention_mask changes SigLIP's result and has no
counterpart here. Export accepts `mask_padding=True` for CLIP (the same on text padded
after the end token) but not for SigLIP, whose last slot is the padding. Unsupported
(an error naming the field): other architectures (`architectures`), a SigLIP text
projection_size that differs from the vision width (`text_config.projection_size`), and
whatever the towers' converters reject (named there).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import ml_collections
import numpy as np

from zoo.hub import clip_text
from zoo.hub import tensors as T
from zoo.hub import vit as hub_vit
from zoo.hub.hf import Converter, Tensors, register, unsupported
from zoo.multimodal.clip import CLIP, CLIPConfig

FAMILIES = ("clip", "siglip")
ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
TEXT, VISION = "text_model.", "vision_model."


def _sub(hf: Mapping[str, Any], key: str) -> Dict[str, Any]:
  return dict(hf.get(key) or {})


def _architecture(hf: Mapping[str, Any], family: str) -> None:
  arch = (hf.get("architectures") or [ARCHITECTURES[family]])[0]
  if arch != ARCHITECTURES[family]:
    raise unsupported("architectures", hf.get("architectures"),
                      f"model_type {family!r} converts {ARCHITECTURES[family]} only")


def _to_zoo_config(family: str):
  def fn(hf: dict) -> ml_collections.ConfigDict:
    _architecture(hf, family)
    vision = hub_vit.vision_config_to_zoo(_sub(hf, "vision_config"), family)
    vision.pop("num_classes")  # CLIPConfig.image_config sets it: a tower
    text_hf = _sub(hf, "text_config")
    text = clip_text.text_config_to_zoo(text_hf, family)
    vocab_size = text.pop("vocab_size")
    text.pop("mlm_head", None)  # CLIPConfig.text_config sets it: a tower
    pad_id = int(T.get(text_hf, "pad_token_id", 1))
    if family == "clip":
      cfg = dict(embed_dim=int(T.get(hf, "projection_dim", 512)), loss="softmax",
                 image_projection=True, text_projection_bias=False)
    else:
      width = vision["d_model"]
      proj = T.get(text_hf, "projection_size", text["d_model"])
      if proj != width:
        raise unsupported("text_config.projection_size", proj, f"SigLIP compares the text "
                          f"head's output with the image's pooled vector of width {width}")
      cfg = dict(embed_dim=width, loss="sigmoid", image_projection=False,
                 text_projection_bias=True)
    return ml_collections.ConfigDict(dict(name="clip", vocab_size=vocab_size, pad_id=pad_id,
                                          mask_padding=False, image=vision, text=text, **cfg))
  return fn


def _to_zoo_params(family: str):
  def fn(tensors: Tensors, hf: dict, model_cfg) -> Tensors:
    cfg = CLIPConfig.from_config(model_cfg)
    image = hub_vit.vision_params_to_zoo(tensors, VISION, _sub(hf, "vision_config"), family,
                                         cfg.image_config())
    text = clip_text.text_params_to_zoo(tensors, TEXT, _sub(hf, "text_config"), family)
    out = {"image_tower." + k: v for k, v in image.items()}
    out.update({"text_tower." + k: v for k, v in text.items()})
    d_img, d_txt = cfg.image_config().d_model, cfg.text_config().d_model
    if family == "clip":
      out["image_proj.kernel"] = T.linear_to_kernel(tensors["visual_projection.weight"], d_img,
                                                    cfg.embed_dim)
      out["text_proj.kernel"] = T.linear_to_kernel(tensors["text_projection.weight"], d_txt,
                                                   cfg.embed_dim)
    else:
      out["text_proj.kernel"] = T.linear_to_kernel(tensors[TEXT + "head.weight"], d_txt,
                                                   cfg.embed_dim)
      out["text_proj.bias"] = np.asarray(tensors[TEXT + "head.bias"])
      out["bias"] = np.asarray(tensors["logit_bias"]).reshape(())
    out["log_temperature"] = np.asarray(tensors["logit_scale"]).reshape(())
    return out
  return fn


def model_family(model) -> str | None:
  """Which HF dual encoder `model` has the joints of (None: neither)."""
  if not isinstance(model, CLIP):
    return None
  c = model.cfg
  if c.loss == "softmax" and c.image_projection and not c.text_projection_bias:
    return "clip"
  if c.loss == "sigmoid" and not c.image_projection and c.text_projection_bias:
    return "siglip"
  return None


def _to_hf_config(family: str):
  def fn(model: CLIP) -> dict:
    cfg = model.cfg
    if family == "siglip" and cfg.mask_padding:
      raise ValueError("model.mask_padding=True: SiglipModel attends to every token and pools "
                       "the last (padded) slot; only mask_padding=False exports as SigLIP")
    vision = hub_vit.vision_config_to_hf(cfg.image_config(), family, "model.image")
    text = dict(clip_text.text_config_to_hf(cfg.text_config(), family), pad_token_id=cfg.pad_id)
    if family == "clip":
      return dict(model_type="clip", text_config=text, vision_config=vision,
                  projection_dim=cfg.embed_dim)
    return dict(model_type="siglip", text_config=dict(text, projection_size=cfg.embed_dim),
                vision_config=vision)
  return fn


def _to_hf_tensors(family: str):
  def fn(params: Tensors, model: CLIP) -> Tensors:
    cfg = model.cfg
    tower = lambda name: {k[len(name) + 1:]: v for k, v in params.items()  # noqa: E731
                          if k.startswith(name + ".")}
    out = hub_vit.vision_params_to_hf(tower("image_tower"), cfg.image_config(), family, VISION)
    out.update(clip_text.text_params_to_hf(tower("text_tower"), cfg.text_config(), family, TEXT))
    p = lambda name: np.asarray(params[name], np.float32)  # noqa: E731
    if family == "clip":
      out["visual_projection.weight"] = T.kernel_to_linear(p("image_proj.kernel"))
      out["text_projection.weight"] = T.kernel_to_linear(p("text_proj.kernel"))
      out["logit_scale"] = p("log_temperature").reshape(())
    else:
      out[TEXT + "head.weight"] = T.kernel_to_linear(p("text_proj.kernel"))
      out[TEXT + "head.bias"] = p("text_proj.bias")
      out["logit_scale"] = p("log_temperature").reshape(1)
      out["logit_bias"] = p("bias").reshape(1)
    return out
  return fn


def _ignorable(name: str) -> bool:
  # buffers older checkpoints stored under either tower
  return clip_text.text_ignorable(name, TEXT) or name == VISION + "embeddings.position_ids"


for _family in FAMILIES:
  register(Converter(model_types=(_family,), architecture=ARCHITECTURES[_family],
                     to_zoo_config=_to_zoo_config(_family),
                     to_zoo_params=_to_zoo_params(_family),
                     to_hf_config=_to_hf_config(_family),
                     to_hf_tensors=_to_hf_tensors(_family),
                     exports=lambda model, f=_family: model_family(model) == f,
                     ignorable=_ignorable))
