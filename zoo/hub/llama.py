"""Hugging Face `LlamaForCausalLM` and `MistralForCausalLM` <-> our `llama_lm` (DecoderLM).

Both are the pre-norm RMSNorm stack with GQA attention (q/k/v/o projections,
rotate-half RoPE) and a SwiGLU MLP y = down(silu(gate(x)) * up(x)); Mistral
adds a causal sliding window. Mapping:

  embed_tokens [V, d]                      -> embed.embedding
  layers.l.input_layernorm                 -> blocks.l.attn_norm.scale
  layers.l.self_attn.{q,k,v}_proj [H*D, d] -> blocks.l.attention.qkv.{q,k,v}.kernel [d, H, D]
  layers.l.self_attn.o_proj [d, H*D]       -> blocks.l.attention.out.o.kernel [H, D, d]
  layers.l.post_attention_layernorm        -> blocks.l.mlp_norm.scale
  layers.l.mlp.{gate,up,down}_proj         -> blocks.l.mlp.{gate,up,down}.kernel (transposed)
  norm                                     -> final_norm.scale
  lm_head [V, d]                           -> head.kernel [d, V] (untied) / embed (tied)

Config: num_key_value_heads -> num_kv_heads, head_dim, rms_norm_eps -> norm_eps,
max_position_embeddings -> max_seq_len, tie_word_embeddings -> tie_embeddings,
rope theta and scaling (HF `rope_scaling`, or transformers-5 `rope_parameters`):
"default", "linear", "yarn" and "llama3" map to our rope_scaling_type (rope.py) where
HF's parameters equal ours (yarn beta_fast=32, beta_slow=1, truncate=true and the
attention factor 0.1 ln s + 1; llama3 low_freq_factor=1, high_freq_factor=4); every
other rope type or parameter value is an `unsupported` error naming the field.

Biases: HF has one flag for q/k/v/o (`attention_bias`) and one for the MLP
(`mlp_bias`); our `use_bias` covers both, so when only one is set the other
group's biases are filled with zeros (exact). Export writes a group's biases, and
sets its flag, only when some of them are non-zero.

Mistral: `sliding_window` w (HF: key j visible from query i when i - j < w) is our
`window` = w - 1 (i - window <= j); HF Mistral has no biases, so biases must be zero.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import ml_collections
import numpy as np

from zoo.hub import tensors as T
from zoo.hub.hf import Converter, Tensors, register, unsupported

ROPE_TYPES = ("default", "linear", "yarn", "llama3")
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # layers/attention/rope.py
LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR = 1.0, 4.0  # layers/attention/rope.py
HIDDEN_ACTS = ("silu", "swish")  # both torch SiLU in transformers' ACT2FN


# --------------------------------------------------------------------------- rope

def rope_fields(hf: Dict[str, Any]) -> Dict[str, Any]:
  """HF rope settings -> our rope_base, rope_scaling, rope_scaling_type, rope_original_max_len.

  As transformers reads them: `rope_scaling` (transformers 4) wins over `rope_parameters`
  (transformers 5); rope_theta inside the dict wins over the top-level field.
  """
  src = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  params = dict(hf.get(src) or {})
  if params and not any(k in params for k in ("rope_type", "type", "rope_theta", "factor")):
    raise unsupported(src, params, "per-layer-type rope parameters")
  base = float(T.get(params, "rope_theta", T.get(hf, "rope_theta", 10_000.0)))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise unsupported(f"{src}.rope_type", rope_type,
                      f"only {ROPE_TYPES} are implemented here (layers/attention/rope.py)")
  partial = T.get(params, "partial_rotary_factor", T.get(hf, "partial_rotary_factor", 1.0))
  if float(partial) != 1.0:
    raise unsupported("partial_rotary_factor", partial, "our RoPE rotates the whole head")
  out = dict(rope_base=base, rope_scaling=1.0, rope_scaling_type="linear",
             rope_original_max_len=None)
  if rope_type == "default":
    return out
  factor = params.get("factor")
  original = T.get(params, "original_max_position_embeddings",
                   T.get(hf, "original_max_position_embeddings",
                         hf.get("max_position_embeddings")))
  if rope_type == "yarn" and factor is None and original:  # as transformers: the context ratio
    factor = hf["max_position_embeddings"] / original
  if factor is None or not float(factor) > 0:
    raise unsupported(f"{src}.factor", factor, f"rope_type {rope_type!r} needs a positive factor")
  factor = float(factor)
  if rope_type == "linear":
    return dict(out, rope_scaling=factor)
  if not original:
    raise unsupported(f"{src}.original_max_position_embeddings", original,
                      f"rope_type {rope_type!r} needs the original context length")
  original = int(original)
  if rope_type == "llama3":
    for key, ours in (("low_freq_factor", LLAMA3_LOW_FREQ_FACTOR),
                      ("high_freq_factor", LLAMA3_HIGH_FREQ_FACTOR)):
      if params.get(key) is None or float(params[key]) != ours:
        raise unsupported(f"{src}.{key}", params.get(key),
                          f"our llama3 rule has {key}={ours} (layers/attention/rope.py)")
    return dict(out, rope_scaling=factor, rope_scaling_type="llama3",
                rope_original_max_len=original)
  # yarn: HF reads `x or default` for the betas.
  for key, ours in (("beta_fast", YARN_BETA_FAST), ("beta_slow", YARN_BETA_SLOW)):
    if float(params.get(key) or ours) != ours:
      raise unsupported(f"{src}.{key}", params[key],
                        f"our yarn rule has {key}={ours:g} (layers/attention/rope.py)")
  if params.get("truncate", True) is not True:
    raise unsupported(f"{src}.truncate", params["truncate"],
                      "our yarn rule rounds the correction range (truncate=true)")
  hf_factor = _hf_yarn_attention_factor(params, factor)
  ours = _our_yarn_attention_factor(factor)
  if not math.isclose(hf_factor, ours, rel_tol=1e-9, abs_tol=0.0):
    field = next((k for k in ("attention_factor", "mscale", "mscale_all_dim")
                  if params.get(k) is not None), "factor")
    raise unsupported(f"{src}.{field}", params.get(field, factor),
                      f"the attention factor {hf_factor:.6g} differs from our yarn's "
                      f"0.1 ln(s) + 1 = {ours:.6g}")
  if factor != 1.0:  # factor 1: the ramp blends theta with itself
    head_dim = T.get(hf, "head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    _check_yarn_ramp(head_dim, base, original,
                     lambda why: unsupported(f"{src}.original_max_position_embeddings",
                                             original, why))
  return dict(out, rope_scaling=factor, rope_scaling_type="yarn", rope_original_max_len=original)


def _our_yarn_attention_factor(factor: float) -> float:
  return 1.0 if factor == 1.0 else 0.1 * math.log(factor) + 1.0


def _hf_yarn_attention_factor(params: Dict[str, Any], factor: float) -> float:
  """transformers' `_compute_yarn_parameters` attention factor."""
  def mscale_of(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
  if params.get("attention_factor") is not None:
    return float(params["attention_factor"])
  if params.get("mscale") and params.get("mscale_all_dim"):
    return mscale_of(factor, params["mscale"]) / mscale_of(factor, params["mscale_all_dim"])
  return mscale_of(factor)


def _check_yarn_ramp(head_dim: int, base: float, original: int, error) -> None:
  """Our ramp clamps its width to >= 1e-3 where transformers divides by high - low as is;
  they agree (transformers widens an empty range by 1e-3 too) unless the clamped range is
  reversed (a context too short or too long for the head size). error(why) -> the
  exception to raise."""

  def dim_of(rotations):
    return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(dim_of(YARN_BETA_FAST)), 0)
  high = min(math.ceil(dim_of(YARN_BETA_SLOW)), head_dim - 1)
  if high < low:
    raise error(f"yarn's correction range [{low}, {high}] is reversed for head_dim={head_dim}, "
                f"rope_theta={base:g}")


def hf_rope_parameters(cfg) -> Dict[str, Any]:
  """Our rope settings -> the HF `rope_parameters` dict (rope_theta included)."""
  kind, s, base = cfg.rope_scaling_type, float(cfg.rope_scaling), float(cfg.rope_base)
  if kind == "truncated" or (kind == "ntk" and s != 1.0):
    raise ValueError(f"model.rope_scaling_type={kind!r} has no Hugging Face rope_type")
  if s == 1.0:
    return {"rope_type": "default", "rope_theta": base}
  if kind == "linear":
    return {"rope_type": "linear", "factor": s, "rope_theta": base}
  original = int(cfg.rope_original_max_len)
  if kind == "llama3":
    return {"rope_type": "llama3", "factor": s, "low_freq_factor": LLAMA3_LOW_FREQ_FACTOR,
            "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
            "original_max_position_embeddings": original, "rope_theta": base}
  # yarn: the attention factor written out, so HF uses ours for every factor.
  _check_yarn_ramp(cfg.head_dim or cfg.d_model // cfg.num_heads, base, original,
                   lambda why: ValueError(f"model.rope_original_max_len={original}: {why}"))
  return {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": original,
          "beta_fast": YARN_BETA_FAST, "beta_slow": YARN_BETA_SLOW,
          "attention_factor": float(_our_yarn_attention_factor(s)), "rope_theta": base}


# --------------------------------------------------------------------------- config

def _check_common(hf: Dict[str, Any]) -> None:
  if hf.get("quantization_config"):
    raise unsupported("quantization_config", hf["quantization_config"], "quantized weights")
  act = T.get(hf, "hidden_act", "silu")
  if act not in HIDDEN_ACTS:
    raise unsupported("hidden_act", act, "the SwiGLU MLP here is silu-gated only")


def _zoo_config(hf: Dict[str, Any], *, use_bias: bool, window: Optional[int],
                tie_default: bool) -> ml_collections.ConfigDict:
  heads = hf["num_attention_heads"]
  return ml_collections.ConfigDict(dict(
      name="llama_lm", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=T.get(hf, "num_key_value_heads", heads),
      head_dim=T.get(hf, "head_dim", hf["hidden_size"] // heads),
      mlp_dim=hf["intermediate_size"], mlp_kind="swiglu", use_bias=use_bias,
      norm="rmsnorm", norm_eps=float(T.get(hf, "rms_norm_eps", 1e-6)), attention="mha",
      positional="rope", **rope_fields(hf), window=window,
      tie_embeddings=bool(T.get(hf, "tie_word_embeddings", tie_default)),
      max_seq_len=int(T.get(hf, "max_position_embeddings", 2048))))


def llama_to_zoo_config(hf: Dict[str, Any]) -> ml_collections.ConfigDict:
  _check_common(hf)
  use_bias = bool(hf.get("attention_bias")) or bool(hf.get("mlp_bias"))
  return _zoo_config(hf, use_bias=use_bias, window=None, tie_default=False)


def mistral_to_zoo_config(hf: Dict[str, Any]) -> ml_collections.ConfigDict:
  _check_common(hf)
  sw = hf.get("sliding_window")
  if sw is not None and not (isinstance(sw, int) and sw >= 1):
    raise unsupported("sliding_window", sw, "must be a positive integer or null")
  window = None if sw is None else sw - 1
  return _zoo_config(hf, use_bias=False, window=window, tie_default=False)


# --------------------------------------------------------------------------- weights

def _prefix(tensors) -> str:
  return T.prefix_of(tensors, "embed_tokens.weight", ("model.", ""))


def to_zoo_params(tensors: Tensors, hf: Dict[str, Any], cfg) -> Tensors:
  p = _prefix(tensors)
  d, hq = cfg.d_model, cfg.num_heads
  hkv = cfg.num_kv_heads or hq
  hd = cfg.head_dim or d // hq
  out: Tensors = {"embed.embedding": tensors[p + "embed_tokens.weight"],
                  "final_norm.scale": tensors[p + "norm.weight"]}
  shapes = {"q": (hq, hd), "k": (hkv, hd), "v": (hkv, hd)}
  for l in range(cfg.num_layers):
    src, dst = f"{p}layers.{l}.", f"blocks.{l}."
    out[dst + "attn_norm.scale"] = tensors[src + "input_layernorm.weight"]
    out[dst + "mlp_norm.scale"] = tensors[src + "post_attention_layernorm.weight"]
    for n, shape in shapes.items():
      out[f"{dst}attention.qkv.{n}.kernel"] = T.linear_to_kernel(
          tensors[f"{src}self_attn.{n}_proj.weight"], d, shape)
    out[dst + "attention.out.o.kernel"] = T.linear_to_kernel(
        tensors[src + "self_attn.o_proj.weight"], (hq, hd), d)
    for n in ("gate", "up"):
      out[f"{dst}mlp.{n}.kernel"] = T.linear_to_kernel(
          tensors[f"{src}mlp.{n}_proj.weight"], d, cfg.mlp_dim)
    out[dst + "mlp.down.kernel"] = T.linear_to_kernel(
        tensors[src + "mlp.down_proj.weight"], cfg.mlp_dim, d)
    if cfg.use_bias:
      biases = {f"attention.qkv.{n}.bias": ("attention_bias", f"self_attn.{n}_proj.bias", shape)
                for n, shape in shapes.items()}
      biases["attention.out.o.bias"] = ("attention_bias", "self_attn.o_proj.bias", (d,))
      biases.update({f"mlp.{n}.bias": ("mlp_bias", f"mlp.{n}_proj.bias", (cfg.mlp_dim,))
                     for n in ("gate", "up")})
      biases["mlp.down.bias"] = ("mlp_bias", "mlp.down_proj.bias", (d,))
      for ours, (flag, theirs, shape) in biases.items():
        # The group HF has no biases for (its flag false) gets zeros.
        out[dst + ours] = (np.asarray(tensors[src + theirs]).reshape(shape) if hf.get(flag)
                           else np.zeros(shape, np.float32))
  head = "lm_head.weight"
  if cfg.tie_embeddings:
    T.tied_copy_check(tensors, head, out["embed.embedding"])
  else:
    if head not in tensors:
      raise ValueError(f"tie_word_embeddings=false but the checkpoint has no {head}")
    out["head.kernel"] = T.linear_to_kernel(tensors[head], d, cfg.vocab_size)
  return out


def to_hf_tensors(params: Tensors, model) -> Tensors:
  cfg = model.cfg
  bias_groups = _bias_groups(params, cfg)
  out: Tensors = {"model.embed_tokens.weight": np.asarray(params["embed.embedding"]),
                  "model.norm.weight": np.asarray(params["final_norm.scale"])}
  for l in range(cfg.num_layers):
    src, dst = f"blocks.{l}.", f"model.layers.{l}."
    out[dst + "input_layernorm.weight"] = np.asarray(params[src + "attn_norm.scale"])
    out[dst + "post_attention_layernorm.weight"] = np.asarray(params[src + "mlp_norm.scale"])
    for n in ("q", "k", "v"):
      out[f"{dst}self_attn.{n}_proj.weight"] = T.kernel_to_linear(
          params[f"{src}attention.qkv.{n}.kernel"], 1)
      if bias_groups["attention"]:
        out[f"{dst}self_attn.{n}_proj.bias"] = np.asarray(
            params[f"{src}attention.qkv.{n}.bias"]).reshape(-1)
    out[dst + "self_attn.o_proj.weight"] = T.kernel_to_linear(
        params[src + "attention.out.o.kernel"], 2)
    if bias_groups["attention"]:
      out[dst + "self_attn.o_proj.bias"] = np.asarray(params[src + "attention.out.o.bias"])
    for n in ("gate", "up", "down"):
      out[f"{dst}mlp.{n}_proj.weight"] = T.kernel_to_linear(params[f"{src}mlp.{n}.kernel"], 1)
      if bias_groups["mlp"]:
        out[f"{dst}mlp.{n}_proj.bias"] = np.asarray(params[f"{src}mlp.{n}.bias"])
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = T.kernel_to_linear(params["head.kernel"], 1)
  return out


def _bias_groups(params: Tensors, cfg) -> Dict[str, bool]:
  """Which HF bias flags to set: a group is written when any of its biases is non-zero."""
  if not cfg.use_bias:
    return {"attention": False, "mlp": False}
  attn = [v for k, v in params.items() if ".attention." in k and k.endswith(".bias")]
  mlp = [v for k, v in params.items() if ".mlp." in k and k.endswith(".bias")]
  return {"attention": not all(T.all_zero(v) for v in attn),
          "mlp": not all(T.all_zero(v) for v in mlp)}


def _check_exportable(model) -> None:
  """Everything of our config that has no Llama/Mistral equivalent is an error naming it."""
  cfg = model.cfg
  checks = [
      *T.plain_mha_checks(cfg, equal_heads=False),
      ("positional", cfg.positional == "rope", "RoPE"),
      ("positional_schedule", cfg.positional_schedule is None, "no schedule"),
      ("rope_window", cfg.rope_window is None, "no RoPE window"),
      ("norm", cfg.norm == "rmsnorm", "RMSNorm"),
      ("mlp_kind", cfg.mlp_kind == "swiglu", "a SwiGLU MLP"),
      ("mlp_activation", cfg.mlp_activation in (None, "silu"), "silu gating"),
      ("position_embedding", cfg.position_embedding is None, "no learned position table"),
  ]
  T.refuse_unexportable(cfg, checks, "LlamaForCausalLM")


def _hf_config(model, model_type: str) -> Dict[str, Any]:
  cfg = model.cfg
  _check_exportable(model)
  rope = hf_rope_parameters(cfg)
  heads = cfg.num_heads
  return {
      "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": heads, "num_key_value_heads": cfg.num_kv_heads or heads,
      "head_dim": cfg.head_dim or cfg.d_model // heads, "hidden_act": "silu",
      "rms_norm_eps": float(cfg.norm_eps), "max_position_embeddings": cfg.max_seq_len,
      "tie_word_embeddings": bool(cfg.tie_embeddings),
      # transformers 5 reads rope_parameters; transformers 4 rope_theta and rope_scaling.
      "rope_parameters": rope, "rope_theta": rope["rope_theta"],
      "rope_scaling": None if rope["rope_type"] == "default" else {
          k: v for k, v in rope.items() if k != "rope_theta"},
      # Our model knows no tokenizer: no special token ids rather than HF's defaults.
      "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
      "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
      "dtype": "float32",
  }


def llama_to_hf_config(model) -> Dict[str, Any]:
  from zoo.hub.hf import flat_params
  out = _hf_config(model, "llama")
  groups = _bias_groups(flat_params(model), model.cfg)
  out.update(attention_bias=groups["attention"], mlp_bias=groups["mlp"], pretraining_tp=1)
  return out


def mistral_to_hf_config(model) -> Dict[str, Any]:
  from zoo.hub.hf import flat_params
  cfg = model.cfg
  if not isinstance(cfg.window, int) or cfg.window < 0:
    raise ValueError(f"model.window={cfg.window!r}: MistralForCausalLM has a causal window "
                     "(a non-negative integer)")
  if any(_bias_groups(flat_params(model), cfg).values()):
    raise ValueError("model.use_bias=True with non-zero biases: MistralForCausalLM has none")
  return dict(_hf_config(model, "mistral"), sliding_window=cfg.window + 1)


def mistral_to_hf_tensors(params: Tensors, model) -> Tensors:
  return to_hf_tensors(params, model)  # zero biases are left out (mistral_to_hf_config)


def _is_decoder_lm(model) -> bool:
  from zoo.language.llama import DecoderLM
  return isinstance(model, DecoderLM) and model.cfg.position_embedding is None


def ignorable(name: str) -> bool:
  return name.endswith("rotary_emb.inv_freq")  # a buffer in older checkpoints


LLAMA = register(Converter(
    model_types=("llama",), architecture="LlamaForCausalLM",
    to_zoo_config=llama_to_zoo_config, to_zoo_params=to_zoo_params,
    to_hf_config=llama_to_hf_config, to_hf_tensors=to_hf_tensors,
    exports=lambda m: _is_decoder_lm(m) and m.cfg.window is None, ignorable=ignorable))

MISTRAL = register(Converter(
    model_types=("mistral",), architecture="MistralForCausalLM",
    to_zoo_config=mistral_to_zoo_config, to_zoo_params=to_zoo_params,
    to_hf_config=mistral_to_hf_config, to_hf_tensors=mistral_to_hf_tensors,
    exports=lambda m: _is_decoder_lm(m) and m.cfg.window is not None, ignorable=ignorable))
