"""Hugging Face `GPT2LMHeadModel` <-> our `llama_lm` (DecoderLM) in its GPT-2 form.

GPT-2 is our decoder stack with a learned position table added to the token
embeddings (position_embedding="learned", positional="nope"), pre-norm LayerNorm
(eps layer_norm_epsilon), biases everywhere (use_bias=True), a plain GELU MLP and the
head tied to the token table. HF stores its projections as `Conv1D`, whose weight is
already [in, out] (no transpose); `c_attn` fuses q, k, v along its output axis:

  wte [V, d], wpe [n_positions, d]     -> embed.embedding, position_embed.embedding
  h.l.ln_1, h.l.ln_2                   -> blocks.l.attn_norm, blocks.l.mlp_norm (scale, bias)
  h.l.attn.c_attn [d, 3d] (+ [3d])     -> blocks.l.attention.qkv.{q,k,v} [d, H, D] (+ [H, D])
  h.l.attn.c_proj [d, d]               -> blocks.l.attention.out.o [H, D, d]
  h.l.mlp.c_fc [d, 4d], c_proj [4d, d] -> blocks.l.mlp.up, blocks.l.mlp.down
  ln_f                                 -> final_norm
  lm_head [V, d]                       -> embed (tied) / head.kernel [d, V] (untied)

activation_function: "gelu_new" (and its equal "gelu_pytorch_tanh") is our tanh "gelu";
"gelu" (erf) is our "gelu_exact"; "quick_gelu", "relu", "silu"/"swish" map to ours
(`tensors.activation_to_zoo`); others are unsupported. Export writes GPT-2's "gelu_new"
for our tanh GELU. Unsupported: scale_attn_by_inverse_layer_idx=true,
scale_attn_weights=false, add_cross_attention=true. `h.l.attn.bias` and
`h.l.attn.masked_bias` are causal-mask buffers of older checkpoints (ignored);
reorder_and_upcast_attn changes only the precision of HF's own attention (accepted).
"""

from __future__ import annotations

import re
from typing import Any, Dict

import ml_collections
import numpy as np

from zoo.hub import tensors as T
from zoo.hub.hf import Converter, Tensors, register, unsupported

# Our mlp_activation -> activation_function (None: mlp_kind "gelu"'s own tanh GELU).
EXPORT_ACTIVATIONS = dict(T.ZOO_TO_HF_ACTIVATIONS, gelu="gelu_new")
EXPORT_ACTIVATIONS[None] = "gelu_new"


def to_zoo_config(hf: Dict[str, Any]) -> ml_collections.ConfigDict:
  for field, value, ok in (
      ("scale_attn_by_inverse_layer_idx", hf.get("scale_attn_by_inverse_layer_idx", False), False),
      ("scale_attn_weights", hf.get("scale_attn_weights", True), True),
      ("add_cross_attention", hf.get("add_cross_attention", False), False)):
    if bool(value) != ok:
      raise unsupported(field, value, "our attention scales scores by 1/sqrt(head_dim) in every "
                        "layer and has no cross-attention")
  if hf.get("quantization_config"):
    raise unsupported("quantization_config", hf["quantization_config"], "quantized weights")
  act = T.activation_to_zoo(hf, "activation_function", "gelu_new")
  d = hf["n_embd"]
  return ml_collections.ConfigDict(dict(
      name="llama_lm", vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["n_layer"],
      num_heads=hf["n_head"], mlp_dim=T.get(hf, "n_inner", 4 * d), mlp_kind="gelu",
      mlp_activation=act, use_bias=True, position_embedding="learned",
      positional="nope", norm="layernorm", norm_eps=float(T.get(hf, "layer_norm_epsilon", 1e-5)),
      attention="mha", tie_embeddings=bool(T.get(hf, "tie_word_embeddings", True)),
      max_seq_len=int(T.get(hf, "n_positions", 1024))))


def to_zoo_params(tensors: Tensors, hf: Dict[str, Any], cfg) -> Tensors:
  p = T.prefix_of(tensors, "wte.weight", ("transformer.", ""))
  d, h = cfg.d_model, cfg.num_heads
  hd = d // h
  out: Tensors = {"embed.embedding": tensors[p + "wte.weight"],
                  "position_embed.embedding": tensors[p + "wpe.weight"],
                  "final_norm.scale": tensors[p + "ln_f.weight"],
                  "final_norm.bias": tensors[p + "ln_f.bias"]}
  for l in range(cfg.num_layers):
    src, dst = f"{p}h.{l}.", f"blocks.{l}."
    for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
      out[f"{dst}{ours}.scale"] = tensors[f"{src}{theirs}.weight"]
      out[f"{dst}{ours}.bias"] = tensors[f"{src}{theirs}.bias"]
    w, b = np.asarray(tensors[src + "attn.c_attn.weight"]), np.asarray(
        tensors[src + "attn.c_attn.bias"])
    if w.shape != (d, 3 * d) or b.shape != (3 * d,):
      raise ValueError(f"{src}attn.c_attn has shapes {w.shape}, {b.shape}; expected "
                       f"({d}, {3 * d}), ({3 * d},)")
    for i, n in enumerate("qkv"):
      out[f"{dst}attention.qkv.{n}.kernel"] = T.conv1d_to_kernel(
          w[:, i * d:(i + 1) * d], d, (h, hd))
      out[f"{dst}attention.qkv.{n}.bias"] = b[i * d:(i + 1) * d].reshape(h, hd)
    out[dst + "attention.out.o.kernel"] = T.conv1d_to_kernel(
        tensors[src + "attn.c_proj.weight"], (h, hd), d)
    out[dst + "attention.out.o.bias"] = tensors[src + "attn.c_proj.bias"]
    out[dst + "mlp.up.kernel"] = T.conv1d_to_kernel(tensors[src + "mlp.c_fc.weight"], d,
                                                    cfg.mlp_dim)
    out[dst + "mlp.up.bias"] = tensors[src + "mlp.c_fc.bias"]
    out[dst + "mlp.down.kernel"] = T.conv1d_to_kernel(tensors[src + "mlp.c_proj.weight"],
                                                      cfg.mlp_dim, d)
    out[dst + "mlp.down.bias"] = tensors[src + "mlp.c_proj.bias"]
  if cfg.tie_embeddings:
    T.tied_copy_check(tensors, "lm_head.weight", out["embed.embedding"])
  else:
    if "lm_head.weight" not in tensors:
      raise ValueError("tie_word_embeddings=false but the checkpoint has no lm_head.weight")
    out["head.kernel"] = T.linear_to_kernel(tensors["lm_head.weight"], d, cfg.vocab_size)
  return out


def _check_exportable(model) -> None:
  cfg = model.cfg
  checks = [
      *T.plain_mha_checks(cfg, equal_heads=True),
      ("positional", cfg.positional == "nope", "no positional encoding inside attention"),
      ("norm", cfg.norm == "layernorm", "LayerNorm"),
      ("mlp_kind", cfg.mlp_kind == "gelu", "a plain (ungated) MLP"),
      ("mlp_activation", cfg.mlp_activation in EXPORT_ACTIVATIONS, "a transformers activation"),
      ("window", cfg.window is None, "full causal attention"),
  ]
  T.refuse_unexportable(cfg, checks, "GPT2LMHeadModel")


def to_hf_config(model) -> Dict[str, Any]:
  _check_exportable(model)
  cfg = model.cfg
  return {
      "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model,
      "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
      "n_inner": None if cfg.mlp_dim == 4 * cfg.d_model else cfg.mlp_dim,
      "n_positions": cfg.max_seq_len, "layer_norm_epsilon": float(cfg.norm_eps),
      "activation_function": EXPORT_ACTIVATIONS[cfg.mlp_activation],
      "tie_word_embeddings": bool(cfg.tie_embeddings), "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
      "add_cross_attention": False, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
      "initializer_range": 0.02, "use_cache": True, "dtype": "float32",
      # Our model knows no tokenizer: no special token ids rather than HF's defaults.
      "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
  }


def to_hf_tensors(params: Tensors, model) -> Tensors:
  cfg = model.cfg
  d = cfg.d_model

  def bias(name, shape):  # use_bias=False: zeros (GPT-2 always has biases)
    return np.asarray(params[name]).reshape(-1) if name in params else np.zeros(shape, np.float32)

  out: Tensors = {"transformer.wte.weight": np.asarray(params["embed.embedding"]),
                  "transformer.wpe.weight": np.asarray(params["position_embed.embedding"]),
                  "transformer.ln_f.weight": np.asarray(params["final_norm.scale"]),
                  "transformer.ln_f.bias": np.asarray(params["final_norm.bias"])}
  for l in range(cfg.num_layers):
    src, dst = f"blocks.{l}.", f"transformer.h.{l}."
    for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
      out[f"{dst}{theirs}.weight"] = np.asarray(params[f"{src}{ours}.scale"])
      out[f"{dst}{theirs}.bias"] = np.asarray(params[f"{src}{ours}.bias"])
    out[dst + "attn.c_attn.weight"] = np.concatenate(
        [T.kernel_to_conv1d(params[f"{src}attention.qkv.{n}.kernel"], 1) for n in "qkv"], axis=1)
    out[dst + "attn.c_attn.bias"] = np.concatenate(
        [bias(f"{src}attention.qkv.{n}.bias", (d,)) for n in "qkv"])
    out[dst + "attn.c_proj.weight"] = T.kernel_to_conv1d(params[src + "attention.out.o.kernel"], 2)
    out[dst + "attn.c_proj.bias"] = bias(src + "attention.out.o.bias", (d,))
    out[dst + "mlp.c_fc.weight"] = T.kernel_to_conv1d(params[src + "mlp.up.kernel"], 1)
    out[dst + "mlp.c_fc.bias"] = bias(src + "mlp.up.bias", (cfg.mlp_dim,))
    out[dst + "mlp.c_proj.weight"] = T.kernel_to_conv1d(params[src + "mlp.down.kernel"], 1)
    out[dst + "mlp.c_proj.bias"] = bias(src + "mlp.down.bias", (d,))
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = T.kernel_to_linear(params["head.kernel"], 1)
  return out


_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(masked_)?bias$")


def _exports(model) -> bool:
  from zoo.language.llama import DecoderLM
  return isinstance(model, DecoderLM) and model.cfg.position_embedding == "learned"


GPT2 = register(Converter(
    model_types=("gpt2",), architecture="GPT2LMHeadModel", to_zoo_config=to_zoo_config,
    to_zoo_params=to_zoo_params, to_hf_config=to_hf_config, to_hf_tensors=to_hf_tensors,
    exports=_exports, ignorable=lambda name: bool(_BUFFER.search(name))))
