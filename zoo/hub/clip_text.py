"""The text towers of Hugging Face CLIP and SigLIP <-> our `TextEncoder` (mlm_head=False).

Converts `CLIPTextModel` / the `text_model` of `CLIPModel` (family "clip") and
`SiglipTextModel` / the `text_model` of `SiglipModel` (family "siglip"). These are
pieces, not a registered `Converter`: zoo/hub/clip.py composes them with the
vision tower and the projections. `prefix` is where the tower's tensors live
("text_model." in a CLIPModel/SiglipModel checkpoint or an older CLIPTextModel one,
"" in a transformers-5 CLIPTextModel/SiglipTextModel one).

Name mapping (HF under `prefix` -> ours, relative to the TextEncoder):

    embeddings.token_embedding           -> embed.embedding
    embeddings.position_embedding        -> position_embed.embedding    (learned positions)
    encoder.layers.{i}.layer_norm1       -> blocks.{i}.attn_norm         (scale, bias)
    encoder.layers.{i}.self_attn.q/k/v_proj -> blocks.{i}.attention.qkv.q/k/v (kernel [d, H, Dh])
    encoder.layers.{i}.self_attn.out_proj   -> blocks.{i}.attention.out.o     (kernel [H, Dh, d])
    encoder.layers.{i}.layer_norm2       -> blocks.{i}.mlp_norm
    encoder.layers.{i}.mlp.fc1 / fc2     -> blocks.{i}.mlp.up / mlp.down
    final_layer_norm                     -> final_norm

Architecture (as `EncoderConfig` knobs): pre-norm LayerNorm blocks with biases, a plain
MLP (CLIP: quick GELU, SigLIP: tanh GELU = gelu_pytorch_tanh), learned absolute
positions added to the token embeddings (`positional="nope"` in attention), no
embedding norm, a final norm, every layer global. CLIP's tower is causal and pools
at the end-of-text token: `pool="argmax"` (the largest id in each row) when the
config's eos_token_id is 2 (HF's legacy rule), else `pool="eos"` with `eos_id` (its
first occurrence); SigLIP's is bidirectional and pools the last position
(`pool="last"`). SigLIP's `head` (a Linear after pooling) is not part of the tower:
the composing converter maps it. Deviations: none in the function; the
`vocab_size` and `mlm_head=False` in `text_config_to_zoo` duplicate what
`CLIPConfig.text_config()` sets anyway. Buffers such as `embeddings.position_ids`
in older checkpoints are the composer's to declare ignorable (`text_ignorable`).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

from zoo.hub.hf import unsupported
from zoo.hub.tensors import (ZOO_TO_HF_ACTIVATIONS, activation_to_zoo, get, kernel_to_linear,
                             linear_to_kernel)

FAMILIES = ("clip", "siglip")
# HF defaults of fields a stored config may omit.
_DEFAULTS = {
    "clip": dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, vocab_size=49408, hidden_size=512,
                 intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                 max_position_embeddings=77, eos_token_id=49407),
    "siglip": dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vocab_size=32000,
                   hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=64),
}
_MODEL_TYPES = {"clip": "clip_text_model", "siglip": "siglip_text_model"}


def _family(family: str) -> str:
  if family not in FAMILIES:
    raise ValueError(f"family={family!r} is not one of {FAMILIES}")
  return family


def _get(hf: Mapping[str, Any], key: str, family: str):
  return get(hf, key, _DEFAULTS[family].get(key))


def text_config_to_zoo(hf_text_config: Mapping[str, Any], family: str) -> Dict[str, Any]:
  """HF CLIPTextConfig / SiglipTextConfig (as a dict) -> `EncoderConfig` field values."""
  family = _family(family)
  hf = hf_text_config
  d, heads = int(_get(hf, "hidden_size", family)), int(_get(hf, "num_attention_heads", family))
  if d % heads:
    raise unsupported("num_attention_heads", heads, f"does not divide hidden_size={d}")
  out = dict(
      vocab_size=int(_get(hf, "vocab_size", family)), d_model=d,
      num_layers=int(_get(hf, "num_hidden_layers", family)), num_heads=heads,
      mlp_dim=int(_get(hf, "intermediate_size", family)), mlp_kind="gelu",
      mlp_activation=activation_to_zoo(hf, "hidden_act", _DEFAULTS[family]["hidden_act"]),
      use_bias=True, norm="layernorm", norm_eps=float(_get(hf, "layer_norm_eps", family)),
      norm_position="pre", first_attn_norm=True, embed_norm=False, final_norm=True,
      position_embedding="learned", positional="nope",
      max_seq_len=int(_get(hf, "max_position_embeddings", family)),
      causal=family == "clip", global_every=1, mlm_head=False, attention="mha")
  if family == "clip":
    eos = _get(hf, "eos_token_id", family)
    if not isinstance(eos, int) or isinstance(eos, bool):
      raise unsupported("eos_token_id", eos, "the pooled position needs one integer id")
    # HF's legacy configs say eos_token_id=2 and pool at the largest id (the end token's).
    out.update(dict(pool="argmax") if eos == 2 else dict(pool="eos", eos_id=eos))
  else:
    out.update(pool="last")
  return out


def text_params_to_zoo(tensors: Mapping[str, Any], prefix: str, hf_text_config: Mapping[str, Any],
                       family: str) -> Dict[str, np.ndarray]:
  """HF tower tensors under `prefix` -> our TextEncoder's parameters (dotted paths)."""
  cfg = text_config_to_zoo(hf_text_config, family)
  d, h = cfg["d_model"], cfg["num_heads"]
  dh = d // h
  t = lambda name: np.asarray(tensors[prefix + name])
  out = {"embed.embedding": t("embeddings.token_embedding.weight"),
         "position_embed.embedding": t("embeddings.position_embedding.weight"),
         "final_norm.scale": t("final_layer_norm.weight"),
         "final_norm.bias": t("final_layer_norm.bias")}
  for i in range(cfg["num_layers"]):
    hf, us = f"encoder.layers.{i}.", f"blocks.{i}."
    for hf_norm, our_norm in (("layer_norm1", "attn_norm"), ("layer_norm2", "mlp_norm")):
      out[us + our_norm + ".scale"] = t(hf + hf_norm + ".weight")
      out[us + our_norm + ".bias"] = t(hf + hf_norm + ".bias")
    for p in "qkv":
      w = hf + f"self_attn.{p}_proj."
      out[us + f"attention.qkv.{p}.kernel"] = linear_to_kernel(t(w + "weight"), d, (h, dh))
      out[us + f"attention.qkv.{p}.bias"] = t(w + "bias").reshape(h, dh)
    out[us + "attention.out.o.kernel"] = linear_to_kernel(
        t(hf + "self_attn.out_proj.weight"), (h, dh), d)
    out[us + "attention.out.o.bias"] = t(hf + "self_attn.out_proj.bias")
    for hf_fc, ours in (("fc1", "up"), ("fc2", "down")):
      out[us + f"mlp.{ours}.kernel"] = linear_to_kernel(
          t(hf + f"mlp.{hf_fc}.weight"), *((d, cfg["mlp_dim"]) if ours == "up"
                                         else (cfg["mlp_dim"], d)))
      out[us + f"mlp.{ours}.bias"] = t(hf + f"mlp.{hf_fc}.bias")
  return out


def text_ignorable(name: str, prefix: str) -> bool:
  """Buffers older checkpoints store under the tower (not weights)."""
  return name == prefix + "embeddings.position_ids"


def _check_tower(cfg, family: str) -> None:
  """Every knob of `cfg` must be the tower's: an error names each one that is not."""
  pools = ("argmax", "eos") if family == "clip" else ("last",)
  if cfg.pool not in pools:
    raise ValueError(f"model.text.pool={cfg.pool!r}: the {family} text tower pools with one of "
                     f"{pools}")
  if cfg.activation() not in ZOO_TO_HF_ACTIVATIONS:
    raise ValueError(f"model.text.mlp_activation={cfg.activation()!r} has no Hugging Face "
                     f"hidden_act; one of {sorted(ZOO_TO_HF_ACTIVATIONS)}")
  want = text_config_to_zoo(_hf_config(cfg, family), family)
  ours = lambda k: cfg.activation() if k == "mlp_activation" else getattr(cfg, k)
  wrong = [f"model.text.{k}={ours(k)!r} (the {family} text tower has {v!r})"
           for k, v in want.items() if k != "mlm_head" and ours(k) != v]
  if cfg.num_kv_heads not in (None, cfg.num_heads):
    wrong.append(f"model.text.num_kv_heads={cfg.num_kv_heads} (the tower is MHA)")
  if cfg.head_dim not in (None, cfg.d_model // cfg.num_heads):
    wrong.append(f"model.text.head_dim={cfg.head_dim} (the tower has d_model // num_heads)")
  if cfg.type_vocab_size:
    wrong.append(f"model.text.type_vocab_size={cfg.type_vocab_size} (the tower has none)")
  if cfg.mlm_head:
    wrong.append("model.text.mlm_head=True (the tower has no prediction head)")
  if cfg.attention_options:
    wrong.append(f"model.text.attention_options={cfg.attention_options!r} (the tower has none)")
  if wrong:
    raise ValueError(f"this text encoder cannot be written as a {family} text tower: "
                     + "; ".join(wrong))


def _hf_config(cfg, family: str) -> Dict[str, Any]:
  family = _family(family)
  act = ZOO_TO_HF_ACTIVATIONS[cfg.activation()]
  out = dict(model_type=_MODEL_TYPES[family], vocab_size=cfg.vocab_size,
             hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
             max_position_embeddings=cfg.max_seq_len, hidden_act=act,
             layer_norm_eps=cfg.norm_eps)
  if family == "clip":
    out["eos_token_id"] = 2 if cfg.pool == "argmax" else cfg.eos_id
  return out


def text_config_to_hf(encoder_cfg, family: str) -> Dict[str, Any]:
  """Our `EncoderConfig` -> the HF text config dict (with `model_type`); a knob the tower
  does not have is an error naming it (model.text.<field>)."""
  _check_tower(encoder_cfg, _family(family))
  return _hf_config(encoder_cfg, family)


def text_params_to_hf(params: Mapping[str, Any], encoder_cfg, family: str,
                      prefix: str) -> Dict[str, np.ndarray]:
  """Our TextEncoder's parameters (dotted paths relative to it) -> HF names under `prefix`."""
  _check_tower(encoder_cfg, _family(family))
  p = lambda name: np.asarray(params[name])
  out = {"embeddings.token_embedding.weight": p("embed.embedding"),
         "embeddings.position_embedding.weight": p("position_embed.embedding"),
         "final_layer_norm.weight": p("final_norm.scale"),
         "final_layer_norm.bias": p("final_norm.bias")}
  for i in range(encoder_cfg.num_layers):
    hf, us = f"encoder.layers.{i}.", f"blocks.{i}."
    for hf_norm, our_norm in (("layer_norm1", "attn_norm"), ("layer_norm2", "mlp_norm")):
      out[hf + hf_norm + ".weight"] = p(us + our_norm + ".scale")
      out[hf + hf_norm + ".bias"] = p(us + our_norm + ".bias")
    for q in "qkv":
      out[hf + f"self_attn.{q}_proj.weight"] = kernel_to_linear(p(us + f"attention.qkv.{q}.kernel"))
      out[hf + f"self_attn.{q}_proj.bias"] = p(us + f"attention.qkv.{q}.bias").reshape(-1)
    out[hf + "self_attn.out_proj.weight"] = kernel_to_linear(p(us + "attention.out.o.kernel"), 2)
    out[hf + "self_attn.out_proj.bias"] = p(us + "attention.out.o.bias")
    for hf_fc, ours in (("fc1", "up"), ("fc2", "down")):
      out[hf + f"mlp.{hf_fc}.weight"] = kernel_to_linear(p(us + f"mlp.{ours}.kernel"))
      out[hf + f"mlp.{hf_fc}.bias"] = p(us + f"mlp.{ours}.bias")
  return {prefix + k: v for k, v in out.items()}
