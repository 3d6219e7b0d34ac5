"""Hugging Face `BertForMaskedLM` (model_type "bert") <-> our encoder (`TextEncoder`).

BERT is our encoder stack with the knobs of zoo/language/encoder.py set to: post-norm
blocks (`norm_position="post"`), no final norm, learned absolute positions and
token-type embeddings added to the token embeddings, then a LayerNorm (eps
`layer_norm_eps`, 1e-12), attention and MLP biases, a plain MLP with BERT's
`hidden_act` (gelu = exact erf GELU, gelu_new = tanh GELU, relu), every layer
global and bidirectional, and the MLM head Dense(bias) -> hidden_act -> LayerNorm ->
tied decoder + bias. The model is registered under our "modernbert" name (the
encoder's one builder; the knobs, not the name, make it BERT), so
`zoo.registry.name_of` stays one name per class. `pool="first"` ([CLS]).

Name mapping (`bert.` prefix; H heads of size Dh, kernels keep head axes):

    embeddings.word_embeddings           -> embed.embedding
    embeddings.position_embeddings       -> position_embed.embedding
    embeddings.token_type_embeddings     -> type_embed.embedding
    embeddings.LayerNorm                 -> embed_norm (scale, bias)
    encoder.layer.{l}.attention.self.{query,key,value} -> blocks.{l}.attention.qkv.{q,k,v}
    encoder.layer.{l}.attention.output.dense           -> blocks.{l}.attention.out.o
    encoder.layer.{l}.attention.output.LayerNorm       -> blocks.{l}.attn_norm (after attention)
    encoder.layer.{l}.intermediate.dense -> blocks.{l}.mlp.up
    encoder.layer.{l}.output.dense       -> blocks.{l}.mlp.down
    encoder.layer.{l}.output.LayerNorm   -> blocks.{l}.mlp_norm (after the MLP)
    cls.predictions.transform.dense      -> head_dense (kernel, bias)
    cls.predictions.transform.LayerNorm  -> head_norm
    cls.predictions.bias (= decoder.bias) -> head_bias;  decoder.weight: tied to embed

Not part of our model: the pooler (`bert.pooler.*`, Dense + tanh over [CLS]) and the
next-sentence head (`cls.seq_relationship.*`) of BertForPreTraining/BertModel
checkpoints are ignorable and dropped; so is the `embeddings.position_ids` buffer.
A bare `BertModel` checkpoint (architectures ["BertModel"], tensors without the
`bert.` prefix and without `cls.predictions.*`) loads as an encoder without the
MLM head (`mlm_head=False`: features and [CLS] pooling only); any other checkpoint
without `cls.predictions.*` is an error saying so. Export writes BertForMaskedLM
only (an encoder with the MLM head). Our model without biases (`use_bias`,
`head_bias` false) or token types (`type_vocab_size=0`) exports with zero biases
and a single zero token-type row: the same function.

Unsupported (`unsupported` errors naming the field): position_embedding_type other
than "absolute", hidden_act other than gelu/gelu_new/gelu_pytorch_tanh/relu,
is_decoder, add_cross_attention, tie_word_embeddings=false.
"""

from __future__ import annotations

from typing import Any, Dict

import ml_collections
import numpy as np

from zoo.hub import tensors as T
from zoo.hub.hf import Converter, Tensors, register, unsupported

HIDDEN_ACTS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
               "relu": "relu"}
TO_HF_ACTS = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}
# Checkpoint classes that carry the MLM head; a bare BertModel loads without it.
BARE = ("BertModel",)


def _has_mlm_head(hf: Dict[str, Any]) -> bool:
  archs = hf.get("architectures") or []
  return not (archs and archs[0] in BARE)


def to_zoo_config(hf: Dict[str, Any]) -> ml_collections.ConfigDict:
  T.require(hf, "position_embedding_type", ("absolute",),
            "only absolute learned positions are implemented", "absolute")
  act = HIDDEN_ACTS[T.require(hf, "hidden_act", tuple(HIDDEN_ACTS),
                              f"supported: {sorted(HIDDEN_ACTS)}", "gelu")]
  for field, why in (("is_decoder", "a causal BERT decoder"),
                     ("add_cross_attention", "cross-attention layers")):
    if T.get(hf, field, False):
      raise unsupported(field, hf[field], f"{why}: our encoder is a bidirectional encoder only")
  if not T.get(hf, "tie_word_embeddings", True):
    raise unsupported("tie_word_embeddings", False, "our MLM decoder is the embedding table")
  return ml_collections.ConfigDict(dict(
      name="modernbert", vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
      mlp_dim=int(hf["intermediate_size"]), mlp_kind="gelu", mlp_activation=act,
      use_bias=True, norm="layernorm", norm_eps=float(T.get(hf, "layer_norm_eps", 1e-12)),
      norm_position="post", first_attn_norm=True, embed_norm=True, final_norm=False,
      position_embedding="learned", positional="nope",
      type_vocab_size=int(T.get(hf, "type_vocab_size", 2)), causal=False, attention="mha",
      global_every=1, max_seq_len=int(T.get(hf, "max_position_embeddings", 512)),
      pool="first", mlm_head=_has_mlm_head(hf), head_bias=True, head_activation=act))


def _prefix(tensors) -> str:
  return T.prefix_of(tensors, "embeddings.word_embeddings.weight", ("bert.", ""))


def to_zoo_params(tensors: Tensors, hf: Dict[str, Any], cfg) -> Tensors:
  p = _prefix(tensors)
  d, h = cfg.d_model, cfg.num_heads
  dh = d // h
  t = lambda name: np.asarray(tensors[name])
  out: Tensors = {}

  def norm(ours: str, theirs: str):
    out[ours + ".scale"], out[ours + ".bias"] = t(theirs + ".weight"), t(theirs + ".bias")

  def linear(ours: str, theirs: str, in_shape, out_shape):
    out[ours + ".kernel"] = T.linear_to_kernel(t(theirs + ".weight"), in_shape, out_shape)
    out[ours + ".bias"] = t(theirs + ".bias").reshape(out_shape)

  e = p + "embeddings."
  out["embed.embedding"] = t(e + "word_embeddings.weight")
  out["position_embed.embedding"] = t(e + "position_embeddings.weight")
  if cfg.type_vocab_size:
    out["type_embed.embedding"] = t(e + "token_type_embeddings.weight")
  norm("embed_norm", e + "LayerNorm")
  for l in range(cfg.num_layers):
    src, dst = f"{p}encoder.layer.{l}.", f"blocks.{l}."
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
      linear(f"{dst}attention.qkv.{ours}", f"{src}attention.self.{theirs}", d, (h, dh))
    linear(dst + "attention.out.o", src + "attention.output.dense", (h, dh), d)
    norm(dst + "attn_norm", src + "attention.output.LayerNorm")
    linear(dst + "mlp.up", src + "intermediate.dense", d, cfg.mlp_dim)
    linear(dst + "mlp.down", src + "output.dense", cfg.mlp_dim, d)
    norm(dst + "mlp_norm", src + "output.LayerNorm")
  if not cfg.mlm_head:
    return out
  c = "cls.predictions."
  if c + "transform.dense.weight" not in tensors:
    raise ValueError(
        "this BERT checkpoint has no MLM head (cls.predictions.*): its architectures field "
        f"says {hf.get('architectures')}; a bare encoder must say ['BertModel'] to load "
        "without the head (mlm_head=False)")
  linear("head_dense", c + "transform.dense", d, d)
  norm("head_norm", c + "transform.LayerNorm")
  T.tied_copy_check(tensors, c + "decoder.weight", out["embed.embedding"])
  bias = tensors.get(c + "bias")
  stored = tensors.get(c + "decoder.bias")  # older checkpoints store the same bias twice
  if bias is None:
    bias = stored
  elif stored is not None and not np.array_equal(np.asarray(stored), np.asarray(bias)):
    raise ValueError(f"{c}bias and {c}decoder.bias differ: which one is the decoder's?")
  if bias is None:
    raise ValueError(f"this BERT checkpoint has no {c}bias (the MLM decoder's bias)")
  out["head_bias"] = np.asarray(bias)
  return out


def ignorable(name: str) -> bool:
  return (name.startswith(("bert.pooler.", "pooler.", "cls.seq_relationship."))
          or name.endswith("embeddings.position_ids"))


# --------------------------------------------------------------------------- export

def _check_exportable(model) -> None:
  """Every knob without a BERT equivalent is an error naming it."""
  cfg = model.cfg
  checks = [
      *T.plain_mha_checks(cfg, equal_heads=True),
      ("norm_position", cfg.norm_position == "post", "post-norm blocks"),
      ("final_norm", not cfg.final_norm, "no norm after the last block"),
      ("embed_norm", cfg.embed_norm, "a LayerNorm on the embeddings"),
      ("position_embedding", cfg.position_embedding == "learned", "learned positions"),
      ("positional", cfg.positional == "nope", "no positional transform inside attention"),
      ("causal", not cfg.causal, "bidirectional attention"),
      ("global_every", all(cfg.is_global(l) for l in range(cfg.num_layers)),
       "every layer global (no local windows)"),
      ("norm", cfg.norm == "layernorm", "LayerNorm"),
      ("mlp_kind", cfg.mlp_kind in ("gelu", "relu"), "a plain (ungated) MLP"),
      ("mlp_activation", cfg.activation() in TO_HF_ACTS,
       f"one of the activations {sorted(TO_HF_ACTS)}"),
      ("head_activation", cfg.head_activation == cfg.activation(),
       "the MLP's activation in the MLM head (hidden_act)"),
      ("mlm_head", cfg.mlm_head, "an MLM head (BertForMaskedLM)"),
  ]
  T.refuse_unexportable(cfg, checks, "BertForMaskedLM")


def to_hf_config(model) -> Dict[str, Any]:
  _check_exportable(model)
  cfg = model.cfg
  return {
      "model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "intermediate_size": cfg.mlp_dim, "hidden_act": TO_HF_ACTS[cfg.activation()],
      "max_position_embeddings": cfg.max_seq_len,
      # HF always adds a token-type row (index 0 by default): one zero row is "none".
      "type_vocab_size": max(cfg.type_vocab_size, 1), "layer_norm_eps": float(cfg.norm_eps),
      "position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False,
      "tie_word_embeddings": True, "hidden_dropout_prob": 0.1,
      "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
      # Our model knows no tokenizer: no special token ids rather than HF's defaults.
      "pad_token_id": None, "dtype": "float32",
  }


def to_hf_tensors(params: Tensors, model) -> Tensors:
  cfg = model.cfg
  d = cfg.d_model
  a = lambda name: np.asarray(params[name])
  out: Tensors = {}

  def bias(name: str, shape) -> np.ndarray:
    return a(name).reshape(-1) if name in params else np.zeros(shape, np.float32)

  def norm(ours: str, theirs: str):
    out[theirs + ".weight"], out[theirs + ".bias"] = a(ours + ".scale"), a(ours + ".bias")

  def linear(ours: str, theirs: str, n_in: int):
    w = T.kernel_to_linear(a(ours + ".kernel"), n_in)
    out[theirs + ".weight"], out[theirs + ".bias"] = w, bias(ours + ".bias", w.shape[0])

  e = "bert.embeddings."
  out[e + "word_embeddings.weight"] = a("embed.embedding")
  out[e + "position_embeddings.weight"] = a("position_embed.embedding")
  out[e + "token_type_embeddings.weight"] = (a("type_embed.embedding") if cfg.type_vocab_size
                                             else np.zeros((1, d), np.float32))
  norm("embed_norm", e + "LayerNorm")
  for l in range(cfg.num_layers):
    src, dst = f"blocks.{l}.", f"bert.encoder.layer.{l}."
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
      linear(f"{src}attention.qkv.{ours}", f"{dst}attention.self.{theirs}", 1)
    linear(src + "attention.out.o", dst + "attention.output.dense", 2)
    norm(src + "attn_norm", dst + "attention.output.LayerNorm")
    linear(src + "mlp.up", dst + "intermediate.dense", 1)
    linear(src + "mlp.down", dst + "output.dense", 1)
    norm(src + "mlp_norm", dst + "output.LayerNorm")
  c = "cls.predictions."
  linear("head_dense", c + "transform.dense", 1)
  norm("head_norm", c + "transform.LayerNorm")
  out[c + "bias"] = a("head_bias")
  return out


def _exports(model) -> bool:
  from zoo.language.encoder import TextEncoder
  return isinstance(model, TextEncoder) and model.cfg.norm_position == "post"


BERT = register(Converter(
    model_types=("bert",), architecture="BertForMaskedLM", to_zoo_config=to_zoo_config,
    to_zoo_params=to_zoo_params, to_hf_config=to_hf_config, to_hf_tensors=to_hf_tensors,
    exports=_exports, ignorable=ignorable))
