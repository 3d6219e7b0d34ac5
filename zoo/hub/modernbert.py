"""Hugging Face `ModernBertForMaskedLM` (model_type "modernbert") <-> our `modernbert`
(`TextEncoder`).

The same architecture (zoo/language/encoder.py): embedding LayerNorm, pre-norm blocks
whose first attention norm is the identity, fused QKV with rotate-half RoPE, a GLU MLP,
a final norm, and the Dense -> act -> LayerNorm head with the tied decoder.

Name mapping (`model.` prefix; H heads of size Dh, I = intermediate_size):

    embeddings.tok_embeddings            -> embed.embedding
    embeddings.norm                      -> embed_norm
    layers.{l}.attn_norm (l > 0)         -> blocks.{l}.attn_norm  (layer 0: Identity, none)
    layers.{l}.attn.Wqkv [3d, d]         -> blocks.{l}.attention.qkv.{q,k,v} (rows: q | k | v,
                                            each head-major [H, Dh])
    layers.{l}.attn.Wo                   -> blocks.{l}.attention.out.o
    layers.{l}.mlp_norm                  -> blocks.{l}.mlp_norm
    layers.{l}.mlp.Wi [2I, d]            -> blocks.{l}.mlp.gate (rows :I, HF's `input`, the
                                            activated half) and mlp.up (rows I:, HF's `gate`)
    layers.{l}.mlp.Wo                    -> blocks.{l}.mlp.down
    final_norm                           -> final_norm
    head.dense / head.norm               -> head_dense / head_norm
    decoder.bias                         -> head_bias;  decoder.weight: tied to embed

HF computes Wo(act(input) * gate) with (input, gate) = Wi(x).chunk(2); ours is
down(act(gate(x)) * up(x)), hence the swap of names above.

Config: layer_types (transformers 5) or global_attn_every_n_layers (4) -> global_every
(layer l global when l % global_every == 0; any other pattern is unsupported);
local_attention -> local_window (both mask |i - j| > local_attention // 2);
the global/local RoPE thetas from `rope_parameters` {"full_attention",
"sliding_attention"} (5) or global_rope_theta / local_rope_theta (4); hidden_activation
and classifier_activation -> mlp_activation / head_activation ("gelu" = exact);
classifier_pooling cls/mean -> pool first/mean; norm_eps.

Deviations: our LayerNorms, projections and head always have the biases the flags
switch (use_bias covers attention and MLP, head_bias the head's dense layer, the
decoder's bias is always there); a flag that is false loads as zeros (exact), and
export sets norm_bias / attention_bias / mlp_bias / classifier_bias / decoder_bias
to whether any bias of that group is non-zero, writing the group only then.
Unsupported (`unsupported` naming the field): a RoPE type other than default,
tie_word_embeddings=false, a layer_types pattern not of the form above.
A bare `ModernBertModel` checkpoint (architectures ["ModernBertModel"]) loads
without the MLM head (`mlm_head=False`); export writes ModernBertForMaskedLM only.
"""

from __future__ import annotations

from typing import Any, Dict, List

import ml_collections
import numpy as np

from zoo.hub import tensors as T
from zoo.hub.hf import Converter, Tensors, flat_params, register, unsupported

GLOBAL, LOCAL = "full_attention", "sliding_attention"
BARE = ("ModernBertModel",)


# --------------------------------------------------------------------------- config

def global_every(hf: Dict[str, Any]) -> int:
  """HF's per-layer attention kinds -> our global_every (l global iff l % n == 0)."""
  layers = int(hf["num_hidden_layers"])
  types: List[str] = hf.get("layer_types")
  if not types:
    n = int(T.get(hf, "global_attn_every_n_layers", 3))
    if n < 1:
      raise unsupported("global_attn_every_n_layers", n, "must be >= 1")
    return n
  globals_ = [l for l, t in enumerate(types) if t == GLOBAL]
  n = globals_[1] if len(globals_) > 1 else max(layers, 1)
  want = [GLOBAL if l % n == 0 else LOCAL for l in range(layers)]
  if list(types) != want:
    raise unsupported("layer_types", types,
                      "only a global layer every n layers from layer 0, local ones between")
  return n


def rope_thetas(hf: Dict[str, Any]) -> Dict[str, float]:
  """(global, local) RoPE bases from transformers-5 rope_parameters or the older fields."""
  if hf.get("rope_scaling"):
    raise unsupported("rope_scaling", hf["rope_scaling"], "only default RoPE is implemented")
  params = hf.get("rope_parameters") or {}
  out = {}
  for kind, ours, old, default in ((GLOBAL, "rope_base", "global_rope_theta", 160_000.0),
                                   (LOCAL, "local_rope_base", "local_rope_theta", 10_000.0)):
    p = params.get(kind) or {}
    rope_type = p.get("rope_type", "default")
    if rope_type != "default":
      raise unsupported(f"rope_parameters.{kind}.rope_type", rope_type,
                        "only default RoPE is implemented")
    out[ours] = float(T.get(p, "rope_theta", T.get(hf, old, default)))
  return out


def to_zoo_config(hf: Dict[str, Any]) -> ml_collections.ConfigDict:
  if not T.get(hf, "tie_word_embeddings", True):
    raise unsupported("tie_word_embeddings", False, "our MLM decoder is the embedding table")
  pooling = T.require(hf, "classifier_pooling", ("cls", "mean"), "cls or mean", "cls")
  d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  archs = hf.get("architectures") or []
  return ml_collections.ConfigDict(dict(
      name="modernbert", vocab_size=int(hf["vocab_size"]), d_model=d,
      num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
      mlp_dim=int(hf["intermediate_size"]), mlp_kind="geglu",
      mlp_activation=T.activation_to_zoo(hf, "hidden_activation", "gelu"),
      use_bias=bool(T.get(hf, "attention_bias", False) or T.get(hf, "mlp_bias", False)),
      norm="layernorm", norm_eps=float(T.get(hf, "norm_eps", 1e-5)), norm_position="pre",
      first_attn_norm=False, embed_norm=True, final_norm=True, position_embedding=None,
      positional="rope", **rope_thetas(hf), global_every=global_every(hf),
      local_window=int(T.get(hf, "local_attention", 128)), causal=False, attention="mha",
      max_seq_len=int(T.get(hf, "max_position_embeddings", 8192)),
      pool="first" if pooling == "cls" else "mean",
      mlm_head=not (archs and archs[0] in BARE),
      head_bias=bool(T.get(hf, "classifier_bias", False)),
      head_activation=T.activation_to_zoo(hf, "classifier_activation", "gelu")))


# --------------------------------------------------------------------------- weights

def to_zoo_params(tensors: Tensors, hf: Dict[str, Any], cfg) -> Tensors:
  p = T.prefix_of(tensors, "embeddings.tok_embeddings.weight", ("model.", ""))
  d, h, i = cfg.d_model, cfg.num_heads, cfg.mlp_dim
  dh = d // h
  t = lambda name: np.asarray(tensors[name])
  out: Tensors = {}

  def opt(name: str, shape) -> np.ndarray:  # a bias HF's flag may leave out: zeros are exact
    return t(name).reshape(shape) if name in tensors else np.zeros(shape, np.float32)

  def norm(ours: str, theirs: str):
    out[ours + ".scale"] = t(theirs + ".weight")
    out[ours + ".bias"] = opt(theirs + ".bias", (d,))

  out["embed.embedding"] = t(p + "embeddings.tok_embeddings.weight")
  norm("embed_norm", p + "embeddings.norm")
  for l in range(cfg.num_layers):
    src, dst = f"{p}layers.{l}.", f"blocks.{l}."
    if l > 0:
      norm(dst + "attn_norm", src + "attn_norm")
    qkv = T.linear_to_kernel(t(src + "attn.Wqkv.weight"), d, (3, h, dh))
    qkv_b = opt(src + "attn.Wqkv.bias", (3, h, dh))
    for j, n in enumerate("qkv"):
      out[f"{dst}attention.qkv.{n}.kernel"] = qkv[:, j]
    out[dst + "attention.out.o.kernel"] = T.linear_to_kernel(t(src + "attn.Wo.weight"), (h, dh), d)
    norm(dst + "mlp_norm", src + "mlp_norm")
    wi = T.linear_to_kernel(t(src + "mlp.Wi.weight"), d, (2, i))
    wi_b = opt(src + "mlp.Wi.bias", (2, i))
    out[dst + "mlp.gate.kernel"], out[dst + "mlp.up.kernel"] = wi[:, 0], wi[:, 1]
    out[dst + "mlp.down.kernel"] = T.linear_to_kernel(t(src + "mlp.Wo.weight"), i, d)
    if cfg.use_bias:
      for j, n in enumerate("qkv"):
        out[f"{dst}attention.qkv.{n}.bias"] = qkv_b[j]
      out[dst + "attention.out.o.bias"] = opt(src + "attn.Wo.bias", (d,))
      out[dst + "mlp.gate.bias"], out[dst + "mlp.up.bias"] = wi_b[0], wi_b[1]
      out[dst + "mlp.down.bias"] = opt(src + "mlp.Wo.bias", (d,))
  norm("final_norm", p + "final_norm")
  if not cfg.mlm_head:
    return out
  if "head.dense.weight" not in tensors:
    raise ValueError(
        "this ModernBERT checkpoint has no MLM head (head.*, decoder.*): its architectures "
        f"field says {hf.get('architectures')}; a bare encoder must say ['ModernBertModel'] "
        "to load without the head (mlm_head=False)")
  out["head_dense.kernel"] = T.linear_to_kernel(t("head.dense.weight"), d, d)
  if cfg.head_bias:
    out["head_dense.bias"] = opt("head.dense.bias", (d,))
  norm("head_norm", "head.norm")
  T.tied_copy_check(tensors, "decoder.weight", out["embed.embedding"])
  out["head_bias"] = opt("decoder.bias", (cfg.vocab_size,))
  return out


def ignorable(name: str) -> bool:
  return name.endswith("inv_freq")  # rotary buffers of older checkpoints


# --------------------------------------------------------------------------- export

def _groups(params: Tensors, cfg) -> Dict[str, bool]:
  """Which HF bias flags to set: a group is written when any of its biases is non-zero."""
  def nonzero(keep) -> bool:
    return any(not T.all_zero(v) for k, v in params.items()
               if (k.endswith(".bias") or k == "head_bias") and keep(k))
  norms = ("attn_norm.", "mlp_norm.", "embed_norm.", "final_norm.", "head_norm.")
  return {
      "norm_bias": nonzero(lambda k: any(n in k for n in norms)),
      "attention_bias": nonzero(lambda k: ".attention." in k),
      "mlp_bias": nonzero(lambda k: ".mlp." in k),
      "classifier_bias": nonzero(lambda k: k.startswith("head_dense.")),
      "decoder_bias": nonzero(lambda k: k == "head_bias"),
  }


def _check_exportable(model) -> None:
  """Every knob without a ModernBERT equivalent is an error naming it."""
  cfg = model.cfg
  checks = [
      *T.plain_mha_checks(cfg, equal_heads=True),
      ("norm_position", cfg.norm_position == "pre", "pre-norm blocks"),
      ("first_attn_norm", not cfg.first_attn_norm, "no norm before layer 0's attention"),
      ("embed_norm", cfg.embed_norm, "a LayerNorm on the embeddings"),
      ("final_norm", cfg.final_norm, "a final LayerNorm"),
      ("position_embedding", cfg.position_embedding is None, "no learned position table"),
      ("type_vocab_size", cfg.type_vocab_size == 0, "no token-type embeddings"),
      ("positional", cfg.positional == "rope", "RoPE"),
      ("causal", not cfg.causal, "bidirectional attention"),
      ("norm", cfg.norm == "layernorm", "LayerNorm"),
      ("mlp_kind", cfg.mlp_kind in ("geglu", "swiglu"), "a gated MLP"),
      ("mlp_activation", cfg.activation() in T.ZOO_TO_HF_ACTIVATIONS,
       f"one of the activations {sorted(T.ZOO_TO_HF_ACTIVATIONS)}"),
      ("head_activation", cfg.head_activation in T.ZOO_TO_HF_ACTIVATIONS,
       f"one of the activations {sorted(T.ZOO_TO_HF_ACTIVATIONS)}"),
      ("mlm_head", cfg.mlm_head, "an MLM head (ModernBertForMaskedLM)"),
      ("pool", cfg.pool in ("first", "mean"), "cls or mean classifier pooling"),
  ]
  T.refuse_unexportable(cfg, checks, "ModernBertForMaskedLM")


def to_hf_config(model) -> Dict[str, Any]:
  _check_exportable(model)
  cfg = model.cfg
  types = [GLOBAL if cfg.is_global(l) else LOCAL for l in range(cfg.num_layers)]
  return dict(
      model_type="modernbert", vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
      intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      hidden_activation=T.ZOO_TO_HF_ACTIVATIONS[cfg.activation()],
      classifier_activation=T.ZOO_TO_HF_ACTIVATIONS[cfg.head_activation],
      max_position_embeddings=cfg.max_seq_len, norm_eps=float(cfg.norm_eps),
      local_attention=cfg.local_window, layer_types=types,
      global_attn_every_n_layers=cfg.global_every,  # transformers 4 reads this
      rope_parameters={GLOBAL: {"rope_type": "default", "rope_theta": float(cfg.rope_base)},
                       LOCAL: {"rope_type": "default", "rope_theta": float(cfg.local_rope_base)}},
      global_rope_theta=float(cfg.rope_base), local_rope_theta=float(cfg.local_rope_base),
      classifier_pooling="cls" if cfg.pool == "first" else "mean",
      tie_word_embeddings=True, **_groups(flat_params(model), cfg),
      # Our model knows no tokenizer: no special token ids rather than HF's defaults.
      pad_token_id=None, bos_token_id=None, eos_token_id=None, cls_token_id=None,
      sep_token_id=None, dtype="float32")


def to_hf_tensors(params: Tensors, model) -> Tensors:
  cfg = model.cfg
  g = _groups(params, cfg)
  a = lambda name: np.asarray(params[name])
  out: Tensors = {}

  def norm(ours: str, theirs: str):
    out[theirs + ".weight"] = a(ours + ".scale")
    if g["norm_bias"]:
      out[theirs + ".bias"] = a(ours + ".bias")

  out["model.embeddings.tok_embeddings.weight"] = a("embed.embedding")
  norm("embed_norm", "model.embeddings.norm")
  for l in range(cfg.num_layers):
    src, dst = f"blocks.{l}.", f"model.layers.{l}."
    if l > 0:
      norm(src + "attn_norm", dst + "attn_norm")
    out[dst + "attn.Wqkv.weight"] = np.concatenate(
        [T.kernel_to_linear(a(f"{src}attention.qkv.{n}.kernel")) for n in "qkv"])
    out[dst + "attn.Wo.weight"] = T.kernel_to_linear(a(src + "attention.out.o.kernel"), 2)
    norm(src + "mlp_norm", dst + "mlp_norm")
    out[dst + "mlp.Wi.weight"] = np.concatenate(
        [T.kernel_to_linear(a(f"{src}mlp.{n}.kernel")) for n in ("gate", "up")])
    out[dst + "mlp.Wo.weight"] = T.kernel_to_linear(a(src + "mlp.down.kernel"))
    if g["attention_bias"]:
      out[dst + "attn.Wqkv.bias"] = np.concatenate(
          [a(f"{src}attention.qkv.{n}.bias").reshape(-1) for n in "qkv"])
      out[dst + "attn.Wo.bias"] = a(src + "attention.out.o.bias")
    if g["mlp_bias"]:
      out[dst + "mlp.Wi.bias"] = np.concatenate([a(f"{src}mlp.{n}.bias") for n in ("gate", "up")])
      out[dst + "mlp.Wo.bias"] = a(src + "mlp.down.bias")
  norm("final_norm", "model.final_norm")
  out["head.dense.weight"] = T.kernel_to_linear(a("head_dense.kernel"))
  if g["classifier_bias"]:
    out["head.dense.bias"] = a("head_dense.bias")
  norm("head_norm", "head.norm")
  if g["decoder_bias"]:
    out["decoder.bias"] = a("head_bias")
  return out


def _exports(model) -> bool:
  from zoo.language.encoder import TextEncoder
  return isinstance(model, TextEncoder) and model.cfg.norm_position == "pre"


MODERNBERT = register(Converter(
    model_types=("modernbert",), architecture="ModernBertForMaskedLM",
    to_zoo_config=to_zoo_config, to_zoo_params=to_zoo_params, to_hf_config=to_hf_config,
    to_hf_tensors=to_hf_tensors, exports=_exports, ignorable=ignorable))
