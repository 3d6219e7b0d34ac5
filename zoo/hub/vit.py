"""Hugging Face ViT, CLIP-vision and SigLIP-vision <-> our `vit` (zoo/vision/vit.py).

Converters (model_type -> the class written on export):
  "vit"                  ViTForImageClassification (reads ViTModel too, see below)
  "clip_vision_model"    CLIPVisionModel
  "siglip_vision_model"  SiglipVisionModel
and the tower functions zoo/hub/clip.py uses for CLIPModel / SiglipModel
(`vision_config_to_zoo`, `vision_params_to_zoo`, `vision_config_to_hf`,
`vision_params_to_hf`; family "vit" | "clip" | "siglip").

Name mapping (ours <- HF; layer l; torch Linear [out, in] transposed into our kernels,
which keep the head axes: q/k/v [d, heads, head_dim], out [heads, head_dim, d]):

  ours                       ViT (prefix "vit." when classifying)    CLIP / SigLIP vision
  patch_embed.kernel/bias    embeddings.patch_embeddings.projection  embeddings.patch_embedding
                             (conv [d, C, P, P] -> [P, P, C, d]; CLIP's conv has no bias)
  cls_token, posemb          embeddings.cls_token,                   embeddings.class_embedding,
                             embeddings.position_embeddings          embeddings.position_embedding
  embed_norm                 -                                       pre_layrnorm (CLIP only)
  blocks.l.attn_norm         encoder.layer.l.layernorm_before        encoder.layers.l.layer_norm1
  blocks.l.attention.qkv.q   ...attention.attention.query            ...self_attn.q_proj (k, v too)
  blocks.l.attention.out.o   ...attention.output.dense               ...self_attn.out_proj
  blocks.l.mlp_norm          ...layernorm_after                      ...layer_norm2
  blocks.l.mlp.up / down     ...intermediate.dense / output.dense    ...mlp.fc1 / mlp.fc2
  final_norm                 layernorm                               post_layernorm
  head.linear                classifier (on the CLS token)           -
  head.queries, head.q/k/v   -                                       head.probe, head.attention.
  head.o, head.norm,                                                 in_proj_weight/bias (split
  head.mlp.up/down                                                   into q, k, v), .out_proj,
                                                                     head.layernorm, head.mlp.fc1/2
                                                                     (SigLIP's MAP head)
  norm scale/bias            weight/bias

Deviations, all exact:
  * HF adds position embeddings [N+1, d] after prepending the class token; ours adds
    `posemb` [N, d] to the patches and prepends a class token with no position. Loading
    folds them: cls_token = cls + pos[0], posemb = pos[1:]; export writes cls_token = ours
    and pos[0] = 0. The sum entering the first block is the same.
  * CLIP's post_layernorm normalises the pooled CLS vector only; ours normalises every token
    then pools the CLS one: the same vector (and `encode` differs from CLIP's
    last_hidden_state, which is before that norm).
  * ViT with qkv_bias=False loads zero q/k/v biases (ours has biases everywhere); export
    always writes qkv_bias=True.
  * ViTModel (no classifier) loads as a tower (num_classes=0, the final-norm CLS vector);
    its tanh `pooler` is not part of our model and is ignored (declared, not silently
    dropped): compare our output with its last_hidden_state[:, 0], not pooler_output.
    A tower is exported only as CLIP/SigLIP vision; a classifier as ViTForImageClassification.
  * hidden_act maps to our exact activation (ViT "gelu" = erf GELU, CLIP "quick_gelu",
    SigLIP "gelu_pytorch_tanh" = our tanh "gelu"); others are an error naming hidden_act.

Unsupported (an error naming the field): ViTForMaskedImageModeling and other heads
(`architectures`; `encoder_stride` only serves that MIM decoder and is otherwise
ignored), CLIPVisionModelWithProjection, SigLIP `vision_use_head=False`. HF's
`interpolate_pos_encoding=True` (a forward argument, images at another size) has no
counterpart: our model takes images of `image_size` only and says so.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import ml_collections
import numpy as np

from zoo.hub import tensors as T
from zoo.hub.hf import Converter, Tensors, register, unsupported
from zoo.model_config import parse_pattern
from zoo.vision.vit import ViT, ViTConfig

FAMILIES = ("vit", "clip", "siglip")
# HF's own defaults, for fields a config.json leaves out.
DEFAULTS = {
    "vit": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, hidden_act="gelu", layer_norm_eps=1e-12, image_size=224,
                patch_size=16, num_channels=3),
    "clip": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 image_size=224, patch_size=32, num_channels=3),
    "siglip": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                   image_size=224, patch_size=16, num_channels=3),
}
MODEL_TYPES = {"vit": "vit", "clip": "clip_vision_model", "siglip": "siglip_vision_model"}
ARCHITECTURES = {"vit": ("ViTForImageClassification", "ViTModel"),
                 "clip": ("CLIPVisionModel",), "siglip": ("SiglipVisionModel",)}


def _field(hf: Mapping[str, Any], key: str, family: str):
  return T.get(hf, key, DEFAULTS[family][key])


def _image_size(value, family: str):
  if isinstance(value, (list, tuple)):
    if family != "vit" and value[0] != value[1]:
      raise unsupported("image_size", value, f"{family} vision takes square images only")
    return tuple(int(v) for v in value)
  return int(value)


def _num_classes(hf: Mapping[str, Any]) -> int:
  if hf.get("id2label"):
    return len(hf["id2label"])
  return int(T.get(hf, "num_labels", 2))


def vision_config_to_zoo(hf: Mapping[str, Any], family: str) -> Dict[str, Any]:
  """An HF vision config (ViTConfig / CLIPVisionConfig / SiglipVisionConfig as a dict) ->
  our ViT fields (no `name`, `num_classes`=0: a tower)."""
  if family not in FAMILIES:
    raise ValueError(f"vision family {family!r} is not one of {FAMILIES}")
  d, heads = _field(hf, "hidden_size", family), _field(hf, "num_attention_heads", family)
  if d % heads:
    raise unsupported("num_attention_heads", heads, f"does not divide hidden_size={d}")
  if family == "siglip" and not T.get(hf, "vision_use_head", True):
    raise unsupported("vision_use_head", False, "the converted tower pools with SigLIP's MAP "
                      "head; without it HF gives no pooled vector")
  cfg = dict(num_classes=0, image_size=_image_size(_field(hf, "image_size", family), family),
             patch_size=int(_field(hf, "patch_size", family)),
             num_channels=int(_field(hf, "num_channels", family)), d_model=int(d),
             num_layers=int(_field(hf, "num_hidden_layers", family)), num_heads=int(heads),
             mlp_dim=int(_field(hf, "intermediate_size", family)), mlp_kind="gelu",
             mlp_activation=T.activation_to_zoo(hf, default=DEFAULTS[family]["hidden_act"]),
             norm="layernorm", norm_eps=float(_field(hf, "layer_norm_eps", family)),
             use_bias=True, attention="mha", posemb="learn")
  if family == "siglip":
    cfg.update(pool="map", class_token=False)
  else:
    cfg.update(pool="cls", class_token=True)
  if family == "clip":
    cfg.update(patch_bias=False, pre_norm=True)
  return cfg


# ----------------------------------------------------------------------------- name tables


def _layer_names(family: str, l: int) -> Dict[str, str]:
  """Our block-relative module -> HF module, for layer l."""
  if family == "vit":
    p = f"encoder.layer.{l}."
    return {"attn_norm": p + "layernorm_before", "mlp_norm": p + "layernorm_after",
            "attention.qkv.q": p + "attention.attention.query",
            "attention.qkv.k": p + "attention.attention.key",
            "attention.qkv.v": p + "attention.attention.value",
            "attention.out.o": p + "attention.output.dense",
            "mlp.up": p + "intermediate.dense", "mlp.down": p + "output.dense"}
  p = f"encoder.layers.{l}."
  return {"attn_norm": p + "layer_norm1", "mlp_norm": p + "layer_norm2",
          "attention.qkv.q": p + "self_attn.q_proj", "attention.qkv.k": p + "self_attn.k_proj",
          "attention.qkv.v": p + "self_attn.v_proj", "attention.out.o": p + "self_attn.out_proj",
          "mlp.up": p + "mlp.fc1", "mlp.down": p + "mlp.fc2"}


def _linear_shapes(cfg: ViTConfig, module: str):
  """(in_shape, out_shape) of our kernel for a block-relative or head module."""
  d, h = cfg.d_model, cfg.num_heads
  hd = d // h
  if module.endswith((".q", ".k", ".v")):
    return (d,), (h, hd)
  if module.endswith(".o"):
    return (h, hd), (d,)
  if module.endswith("up"):
    return (d,), (cfg.mlp_dim,)
  return (cfg.mlp_dim,), (d,)


def _names(cfg: ViTConfig, family: str):
  """(norms, linears): our module -> HF module, for everything mapped one to one."""
  norms, linears = {}, {}
  for l in range(cfg.num_layers):
    for ours, hf in _layer_names(family, l).items():
      (norms if ours.endswith("norm") else linears)[f"blocks.{l}.{ours}"] = hf
  norms["final_norm"] = "layernorm" if family == "vit" else "post_layernorm"
  if family == "clip":
    norms["embed_norm"] = "pre_layrnorm"
  if family == "siglip":
    norms["head.norm"] = "head.layernorm"
    linears.update({"head.o": "head.attention.out_proj", "head.mlp.up": "head.mlp.fc1",
                    "head.mlp.down": "head.mlp.fc2"})
  return norms, linears


def _embedding_names(family: str) -> Dict[str, str]:
  if family == "vit":
    return {"patch": "embeddings.patch_embeddings.projection", "cls": "embeddings.cls_token",
            "pos": "embeddings.position_embeddings"}
  return {"patch": "embeddings.patch_embedding", "cls": "embeddings.class_embedding",
          "pos": "embeddings.position_embedding.weight"}


# ----------------------------------------------------------------------------- HF -> ours


def vision_params_to_zoo(tensors: Mapping[str, np.ndarray], prefix: str,
                         hf: Mapping[str, Any], family: str, cfg: ViTConfig) -> Tensors:
  """HF tensors under `prefix` -> our ViT parameters (ViT-relative dotted paths)."""
  t = lambda name: np.asarray(tensors[prefix + name])  # noqa: E731
  out: Tensors = {}
  norms, linears = _names(cfg, family)
  for ours, name in norms.items():
    out[ours + ".scale"], out[ours + ".bias"] = t(name + ".weight"), t(name + ".bias")
  for ours, name in linears.items():
    shape_in, shape_out = _linear_shapes(cfg, ours)
    out[ours + ".kernel"] = T.linear_to_kernel(t(name + ".weight"), shape_in, shape_out)
    if family == "vit" and ours.endswith((".q", ".k", ".v")) and not T.get(hf, "qkv_bias", True):
      out[ours + ".bias"] = np.zeros(shape_out, np.float32)  # our biases stay, at zero
    else:
      out[ours + ".bias"] = t(name + ".bias").reshape(shape_out)
  e = _embedding_names(family)
  out["patch_embed.kernel"] = T.conv_to_patch_kernel(t(e["patch"] + ".weight"))
  if cfg.patch_bias:
    out["patch_embed.bias"] = t(e["patch"] + ".bias")
  d, n = cfg.d_model, cfg.num_patches
  pos = t(e["pos"])
  want = n + int(cfg.class_token)
  if pos.size != want * d:
    raise unsupported("image_size", hf.get("image_size"), f"{prefix}{e['pos']} has shape "
                      f"{pos.shape}, not the {want} positions of {cfg.grid} patches (+ class)")
  pos = pos.reshape(want, d)
  if cfg.class_token:  # fold: HF's class token gets pos[0]; ours has no position of its own
    out["cls_token"] = t(e["cls"]).reshape(d) + pos[0]
    pos = pos[1:]
  out["posemb"] = pos
  if family == "siglip":
    h = cfg.num_heads
    out["head.queries"] = t("head.probe").reshape(1, d)
    w, b = t("head.attention.in_proj_weight"), t("head.attention.in_proj_bias")
    for i, name in enumerate("qkv"):  # torch MultiheadAttention stacks W_q; W_k; W_v
      out[f"head.{name}.kernel"] = T.linear_to_kernel(w[i * d:(i + 1) * d], d, (h, d // h))
      out[f"head.{name}.bias"] = b[i * d:(i + 1) * d].reshape(h, d // h)
  return out


# ----------------------------------------------------------------------------- ours -> HF


def vision_family(cfg: ViTConfig) -> str | None:
  """Which HF vision model `cfg` has the structure of (None: none)."""
  if cfg.pool == "cls" and cfg.class_token and cfg.patch_bias and not cfg.pre_norm:
    return "vit" if cfg.num_classes else None
  if (cfg.pool == "cls" and cfg.class_token and not cfg.patch_bias and cfg.pre_norm
      and not cfg.num_classes):
    return "clip"
  if (cfg.pool == "map" and not cfg.class_token and cfg.patch_bias and not cfg.pre_norm
      and not cfg.num_classes):
    return "siglip"
  return None


def check_exportable(cfg: ViTConfig, family: str, field: str = "model") -> None:
  """An error naming the setting for anything the HF `family` model cannot express."""
  if vision_family(cfg) != family:
    raise ValueError(f"{field} is not the {family} vision layout: needs " + {
        "vit": "pool='cls', class_token, patch_bias, no pre_norm, num_classes > 0",
        "clip": "pool='cls', class_token, patch_bias=False, pre_norm=True, num_classes=0",
        "siglip": "pool='map', no class_token, patch_bias, no pre_norm, num_classes=0"}[family])
  fixed = dict(posemb="learn", norm="layernorm", mlp_kind="gelu", use_bias=True,
               prune_layers=(), attention_options=(), pooling_options=())
  for name, value in fixed.items():
    if getattr(cfg, name) != value:
      raise ValueError(f"{field}.{name}={getattr(cfg, name)!r}: Hugging Face {family} vision "
                       f"needs {value!r}")
  if set(parse_pattern(cfg.attention, cfg.num_layers)) != {"mha"}:
    raise ValueError(f"{field}.attention={cfg.attention!r}: Hugging Face {family} vision "
                     "is plain multi-head attention ('mha')")
  if cfg.num_kv_heads not in (None, cfg.num_heads):
    raise ValueError(f"{field}.num_kv_heads={cfg.num_kv_heads}: Hugging Face {family} vision "
                     "has as many key/value heads as query heads")
  if cfg.head_dim not in (None, cfg.d_model // cfg.num_heads) or cfg.d_model % cfg.num_heads:
    raise ValueError(f"{field}.head_dim={cfg.head_dim}: Hugging Face {family} vision has "
                     "head_dim = d_model / num_heads")
  act = cfg.mlp_activation or "gelu"
  if act not in T.ZOO_TO_HF_ACTIVATIONS:
    raise ValueError(f"{field}.mlp_activation={cfg.mlp_activation!r} has no Hugging Face name")
  if family != "vit" and cfg.image_size[0] != cfg.image_size[1]:
    raise ValueError(f"{field}.image_size={cfg.image_size}: Hugging Face {family} vision "
                     "takes square images only")


def vision_config_to_hf(cfg: ViTConfig, family: str, field: str = "model") -> Dict[str, Any]:
  """Our ViT config -> the HF vision config dict (with its model_type)."""
  check_exportable(cfg, family, field)
  h, w = cfg.image_size
  out = dict(model_type=MODEL_TYPES[family], hidden_size=cfg.d_model,
             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
             intermediate_size=cfg.mlp_dim,
             hidden_act=T.ZOO_TO_HF_ACTIVATIONS[cfg.mlp_activation or "gelu"],
             layer_norm_eps=cfg.norm_eps, image_size=h if h == w else [h, w],
             patch_size=cfg.patch_size, num_channels=cfg.num_channels, attention_dropout=0.0)
  if family == "vit":
    out.update(qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               id2label={str(i): f"LABEL_{i}" for i in range(cfg.num_classes)},
               label2id={f"LABEL_{i}": i for i in range(cfg.num_classes)})
  if family == "siglip":
    out["vision_use_head"] = True
  return out


def vision_params_to_hf(params: Mapping[str, Any], cfg: ViTConfig, family: str,
                        prefix: str = "") -> Tensors:
  """Our ViT parameters (ViT-relative paths) -> HF tensors under `prefix`."""
  p = lambda name: np.asarray(params[name], np.float32)  # noqa: E731
  out: Tensors = {}
  norms, linears = _names(cfg, family)
  for ours, name in norms.items():
    out[prefix + name + ".weight"], out[prefix + name + ".bias"] = (p(ours + ".scale"),
                                                                    p(ours + ".bias"))
  for ours, name in linears.items():
    n_in = len(_linear_shapes(cfg, ours)[0])
    out[prefix + name + ".weight"] = T.kernel_to_linear(p(ours + ".kernel"), n_in)
    out[prefix + name + ".bias"] = p(ours + ".bias").reshape(-1)
  e = _embedding_names(family)
  out[prefix + e["patch"] + ".weight"] = T.patch_kernel_to_conv(p("patch_embed.kernel"))
  if cfg.patch_bias:
    out[prefix + e["patch"] + ".bias"] = p("patch_embed.bias")
  d, pos = cfg.d_model, p("posemb")
  if cfg.class_token:  # ours has no class position: write cls as is and a zero pos[0]
    pos = np.concatenate([np.zeros((1, d), np.float32), pos])
    cls = p("cls_token")
    out[prefix + e["cls"]] = cls.reshape(1, 1, d) if family == "vit" else cls
  out[prefix + e["pos"]] = pos[None] if family == "vit" else pos
  if family == "siglip":
    out[prefix + "head.probe"] = p("head.queries").reshape(1, 1, d)
    out[prefix + "head.attention.in_proj_weight"] = np.concatenate(
        [T.kernel_to_linear(p(f"head.{n}.kernel")) for n in "qkv"])
    out[prefix + "head.attention.in_proj_bias"] = np.concatenate(
        [p(f"head.{n}.bias").reshape(-1) for n in "qkv"])
  return out


# ----------------------------------------------------------------------------- converters


def _architecture(hf: Mapping[str, Any], family: str) -> str:
  arch = (hf.get("architectures") or [ARCHITECTURES[family][-1]])[0]
  if arch not in ARCHITECTURES[family]:
    raise unsupported("architectures", hf.get("architectures"),
                      f"model_type {hf.get('model_type')!r} converts "
                      f"{list(ARCHITECTURES[family])} only")
  return arch


def _to_zoo_config(family: str):
  def fn(hf: dict) -> ml_collections.ConfigDict:
    arch = _architecture(hf, family)
    cfg = vision_config_to_zoo(hf, family)
    if arch == "ViTForImageClassification":
      cfg["num_classes"] = _num_classes(hf)
    return ml_collections.ConfigDict(dict(name="vit", **cfg))
  return fn


# A classifier saves the backbone under "vit."; ViTModel and the v5 vision towers under no
# prefix; older CLIP/SigLIP vision checkpoints under "vision_model.".
PREFIXES = {"vit": ("vit.", ""), "clip": ("", "vision_model."), "siglip": ("", "vision_model.")}


def _to_zoo_params(family: str):
  def fn(tensors: Tensors, hf: dict, model_cfg) -> Tensors:
    cfg = ViTConfig.from_config(model_cfg)
    prefix = T.prefix_of(tensors, "post_layernorm.weight" if family != "vit" else
                         "layernorm.weight", PREFIXES[family])
    out = vision_params_to_zoo(tensors, prefix, hf, family, cfg)
    if family == "vit" and cfg.num_classes:
      out["head.linear.kernel"] = T.linear_to_kernel(tensors["classifier.weight"], cfg.d_model,
                                                     cfg.num_classes)
      out["head.linear.bias"] = np.asarray(tensors["classifier.bias"])
    return out
  return fn


def _to_hf_config(family: str):
  return lambda model: vision_config_to_hf(model.cfg, family)


def _to_hf_tensors(family: str):
  def fn(params: Tensors, model: ViT) -> Tensors:
    cfg = model.cfg
    out = vision_params_to_hf(params, cfg, family, "vit." if family == "vit" else "")
    if family == "vit":
      out["classifier.weight"] = T.kernel_to_linear(np.asarray(params["head.linear.kernel"]))
      out["classifier.bias"] = np.asarray(params["head.linear.bias"])
    return out
  return fn


def _exports(family: str):
  return lambda model: isinstance(model, ViT) and vision_family(model.cfg) == family


def _ignorable(family: str):
  if family == "vit":  # ViTModel's tanh pooler: not part of our model (module docstring)
    return lambda name: name.startswith(("pooler.dense.", "vit.pooler.dense."))
  return lambda name: name.endswith("position_ids")  # a buffer older checkpoints stored


for _family in FAMILIES:
  register(Converter(model_types=(MODEL_TYPES[_family],),
                     architecture=ARCHITECTURES[_family][0],
                     to_zoo_config=_to_zoo_config(_family),
                     to_zoo_params=_to_zoo_params(_family),
                     to_hf_config=_to_hf_config(_family),
                     to_hf_tensors=_to_hf_tensors(_family),
                     exports=_exports(_family), ignorable=_ignorable(_family)))
