"""Hugging Face decoder LMs (Llama, Mistral, GPT-2) <-> our llama_lm.

Every case builds a tiny random transformers model (all weights random, norms and
biases included, so a transposed or misplaced tensor shows), saves it, loads it with
`zoo.hub.load_hf` and compares logits on one random token batch in float32; then
`export_hf` writes it back and transformers' own loader must give identical logits.
Also: our rope rules against transformers' own, unsupported options and unused tensors as
errors naming them, bfloat16 loading, models of ours exported, and greedy
`zoo.generation.generate` against transformers' `generate`.
"""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from layers.attention.rope import rope_frequencies  # noqa: E402
from tests.numerics import rel_err  # noqa: E402
from zoo.hub import export_hf, load_hf  # noqa: E402
from zoo.hub.llama import rope_fields  # noqa: E402

VOCAB, BATCH, SEQ = 96, 2, 16
# Measured float32 rel_err (max |ours - HF| / max |HF|, max |HF| about 2): 3.5e-7 to 5.2e-7
# over the cases below.
F32_TOL = 5e-6
# bfloat16 parameters and activations against the float32 HF model: measured 7.9e-3 to 1.4e-2.
BF16_TOL = 3e-2

LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)

CASES = {
    "llama_mha_untied": ("LlamaConfig", dict(LLAMA, num_key_value_heads=4,
                                             tie_word_embeddings=False)),
    "llama_gqa_tied_llama3": ("LlamaConfig", dict(
        LLAMA, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8,
                             rope_theta=500.0))),
    "llama_gqa_yarn": ("LlamaConfig", dict(
        LLAMA, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                             rope_theta=100.0))),
    "llama_linear_rope_v4_style": ("LlamaConfig", dict(
        LLAMA, num_key_value_heads=2, rope_theta=1000.0,
        rope_scaling=dict(type="linear", factor=2.0))),
    "llama_attention_bias": ("LlamaConfig", dict(LLAMA, num_key_value_heads=2,
                                                 attention_bias=True)),
    "llama_mlp_bias": ("LlamaConfig", dict(LLAMA, num_key_value_heads=2, mlp_bias=True,
                                           tie_word_embeddings=True)),
    "mistral_window": ("MistralConfig", dict(LLAMA, num_key_value_heads=2, sliding_window=5)),
    "gpt2": ("GPT2Config", dict(GPT2)),
    "gpt2_erf_gelu_untied": ("GPT2Config", dict(GPT2, activation_function="gelu",
                                                tie_word_embeddings=False, n_inner=48)),
}


def hf_model(case: str, seed: int = 0):
  """A transformers causal LM of `case` with every parameter random."""
  config_cls, kw = CASES[case]
  config = getattr(transformers, config_cls)(**kw)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      norm = "norm" in name or ".ln_" in name
      p.copy_((1.0 if norm and name.endswith("weight") else 0.0)
              + 0.1 * torch.randn(p.shape, generator=gen))
  return model


def tokens(seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, VOCAB, (BATCH, SEQ)).astype(np.int32)


def hf_logits(model, toks) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(toks, dtype=torch.long)).logits.float().numpy()


def saved(model, path) -> str:
  model.save_pretrained(path)
  return str(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_matches_transformers_and_export_reloads(case, tmp_path):
  ref_model = hf_model(case)
  toks = tokens()
  ref = hf_logits(ref_model, toks)
  ours, cfg = load_hf(saved(ref_model, tmp_path / "hf"))
  assert cfg.name == "llama_lm"
  got = np.asarray(ours(jnp.asarray(toks)))
  assert got.dtype == np.float32
  assert rel_err(got, ref) < F32_TOL, rel_err(got, ref)

  out = export_hf(ours, str(tmp_path / "export"))
  written = json.load(open(os.path.join(out, "config.json")))
  assert written["architectures"] == [type(ref_model).__name__]
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(back) is type(ref_model)
  np.testing.assert_array_equal(hf_logits(back, toks), ref)
  for key in ("num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias",
              "mlp_bias", "sliding_window", "activation_function", "n_inner"):
    if hasattr(ref_model.config, key):
      assert getattr(back.config, key) == getattr(ref_model.config, key), key


def test_transformers4_config_json(tmp_path):
  """A config.json in the transformers-4 form (top-level rope_theta, `rope_scaling` with
  "type") loads to the same model as the transformers-5 form."""
  model = hf_model("llama_linear_rope_v4_style")
  path = saved(model, tmp_path / "hf")
  file = os.path.join(path, "config.json")
  config = json.load(open(file))
  assert config.pop("rope_parameters")["rope_type"] == "linear"
  config.update(rope_theta=1000.0, rope_scaling={"type": "linear", "factor": 2.0})
  json.dump(config, open(file, "w"))
  ours, cfg = load_hf(path)
  assert (cfg.rope_base, cfg.rope_scaling, cfg.rope_scaling_type) == (1000.0, 2.0, "linear")
  toks = tokens()
  assert rel_err(np.asarray(ours(jnp.asarray(toks))), hf_logits(model, toks)) < F32_TOL


def test_sliding_window_is_exercised(tmp_path):
  """The Mistral case's window (5 < SEQ) changes the logits, so its parity above means
  HF's sliding_window w is our window w - 1."""
  model = hf_model("mistral_window")
  ours, cfg = load_hf(saved(model, tmp_path / "hf"))
  assert cfg.window == 4
  toks = tokens()
  windowed = hf_logits(model, toks)
  model.config.sliding_window = None
  assert rel_err(hf_logits(model, toks), windowed) > 1e-2


@pytest.mark.parametrize("case", ["llama_gqa_tied_llama3", "gpt2"])
def test_bfloat16_load(case, tmp_path):
  model = hf_model(case)
  toks = tokens(1)
  ours, cfg = load_hf(saved(model, tmp_path / "hf"), dtype="bfloat16")
  assert cfg.dtype == cfg.param_dtype == "bfloat16"
  assert ours.embed.embedding[...].dtype == jnp.bfloat16
  got = np.asarray(ours(jnp.asarray(toks)))
  assert np.all(np.isfinite(got))
  assert rel_err(got, hf_logits(model, toks)) < BF16_TOL


def _rope_grid():
  for theta in (1e4, 5e5):
    for head_dim in (16, 64, 128):
      for factor in (1.0, 2.0, 8.0):
        yield head_dim, dict(rope_type="linear", factor=factor, rope_theta=theta)
      for factor in (1.0, 4.0, 32.0):
        for original in (16, 256, 8192):
          yield head_dim, dict(rope_type="yarn", factor=factor, rope_theta=theta,
                               original_max_position_embeddings=original)
          yield head_dim, dict(rope_type="llama3", factor=factor, rope_theta=theta,
                               low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=original)
  # transformers' yarn defaults written out, and an explicit attention factor equal to ours
  yield 64, dict(rope_type="yarn", factor=4.0, rope_theta=1e4, beta_fast=32, beta_slow=1,
                 truncate=True, original_max_position_embeddings=2048,
                 attention_factor=0.1 * math.log(4.0) + 1)


def test_rope_rules_equal_transformers():
  """Our linear / yarn / llama3 frequencies and attention factor equal transformers' own
  `ROPE_INIT_FUNCTIONS` over a grid of the parameters HF allows and we implement."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  n = 0
  for head_dim, params in _rope_grid():
    config = transformers.LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
        max_position_embeddings=4 * params.get("original_max_position_embeddings", 64),
        rope_parameters=dict(params))
    inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None)
    fields = rope_fields(config.to_dict())
    theta, factor = rope_frequencies(
        head_dim, fields["rope_base"], scaling=fields["rope_scaling"],
        scaling_type=fields["rope_scaling_type"],
        original_max_len=fields["rope_original_max_len"])
    # transformers computes the frequencies in float32 powers, ours in float64.
    np.testing.assert_allclose(theta, inv_freq.numpy(), rtol=2e-6, err_msg=str(params))
    assert math.isclose(factor, hf_factor, rel_tol=1e-6), params
    n += 1
  assert n > 100


def _write_config(path, config: dict) -> str:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return str(path)


def _llama_json(**kw):
  return dict(transformers.LlamaConfig(**dict(LLAMA, **kw)).to_dict(), **kw)


UNSUPPORTED = {
    "hidden_act": lambda: _llama_json(hidden_act="gelu"),
    "rope_type": lambda: _llama_json(rope_scaling=dict(rope_type="dynamic", factor=2.0)),
    "low_freq_factor": lambda: _llama_json(rope_parameters=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=2.0, high_freq_factor=4.0,
        original_max_position_embeddings=32, rope_theta=1e4)),
    "high_freq_factor": lambda: _llama_json(rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=8.0,
        original_max_position_embeddings=32)),
    "beta_fast": lambda: _llama_json(rope_parameters=dict(
        rope_type="yarn", factor=4.0, beta_fast=16.0, original_max_position_embeddings=32,
        rope_theta=1e4)),
    "beta_slow": lambda: _llama_json(rope_scaling=dict(
        rope_type="yarn", factor=4.0, beta_slow=2.0, original_max_position_embeddings=32)),
    "mscale": lambda: _llama_json(rope_scaling=dict(
        rope_type="yarn", factor=4.0, mscale=0.707, mscale_all_dim=1.0,
        original_max_position_embeddings=32)),
    "attention_factor": lambda: _llama_json(rope_scaling=dict(
        rope_type="yarn", factor=4.0, attention_factor=1.0, original_max_position_embeddings=32)),
    "truncate": lambda: _llama_json(rope_scaling=dict(
        rope_type="yarn", factor=4.0, truncate=False, original_max_position_embeddings=32)),
    "partial_rotary_factor": lambda: _llama_json(partial_rotary_factor=0.5),
    # a reversed yarn correction range, where transformers' ramp and ours differ
    "original_max_position_embeddings": lambda: _llama_json(rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=10**6, rope_theta=10.0)),
    "scale_attn_by_inverse_layer_idx": lambda: dict(
        transformers.GPT2Config(**GPT2).to_dict(), scale_attn_by_inverse_layer_idx=True),
    "scale_attn_weights": lambda: dict(transformers.GPT2Config(**GPT2).to_dict(),
                                       scale_attn_weights=False),
    "add_cross_attention": lambda: dict(transformers.GPT2Config(**GPT2).to_dict(),
                                        add_cross_attention=True),
    "activation_function": lambda: dict(transformers.GPT2Config(**GPT2).to_dict(),
                                        activation_function="gelu_10"),
}


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_unsupported_option_is_an_error_naming_the_field(field, tmp_path):
  path = _write_config(tmp_path / "hf", UNSUPPORTED[field]())
  with pytest.raises(ValueError, match=f"unsupported Hugging Face config: .*{field}"):
    load_hf(path)


def test_unused_outside_tensor_is_an_error_naming_it(tmp_path):
  path = saved(hf_model("llama_mha_untied"), tmp_path / "hf")
  file = os.path.join(path, "model.safetensors")
  weights = load_file(file)
  weights["model.layers.1.self_attn.extra_proj.weight"] = np.zeros((4, 4), np.float32)
  save_file(weights, file, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.extra_proj\.weight"):
    load_hf(path)


@pytest.mark.parametrize("case", ["gpt2", "llama_mha_untied"])
def test_older_hub_layouts(case, tmp_path):
  """Checkpoints as older hubs store them: GPT-2 without the `transformer.` prefix and with
  its causal-mask buffers (attn.bias, attn.masked_bias), Llama with rotary inv_freq buffers;
  the buffers are ignored, the weights found."""
  model = hf_model(case)
  path = saved(model, tmp_path / "hf")
  file = os.path.join(path, "model.safetensors")
  weights = load_file(file)
  for l in range(2):
    if case == "gpt2":
      weights[f"h.{l}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
      weights[f"h.{l}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    else:
      weights[f"model.layers.{l}.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  if case == "gpt2":
    weights = {k.removeprefix("transformer."): v for k, v in weights.items()}
  save_file(weights, file, metadata={"format": "pt"})
  ours, _ = load_hf(path)
  toks = tokens()
  assert rel_err(np.asarray(ours(jnp.asarray(toks))), hf_logits(model, toks)) < F32_TOL


@pytest.mark.parametrize("style", [
    dict(num_kv_heads=2, tie_embeddings=True, rope_base=5e4),
    dict(num_kv_heads=1, head_dim=16, tie_embeddings=False, rope_scaling=4.0,
         rope_scaling_type="yarn", rope_original_max_len=8),
    dict(positional="nope", position_embedding="learned", norm="layernorm", mlp_kind="gelu",
         use_bias=True, mlp_activation="quick_gelu")],
    ids=["llama_gqa_tied", "llama_mqa_yarn_untied", "gpt2_quick_gelu"])
def test_zoo_model_exports_to_transformers(style, tmp_path):
  """A model of ours (not from a checkpoint) written out runs in transformers with our logits."""
  from flax import nnx
  from zoo.hub.hf import assign, flat_params
  from zoo.language.llama import DecoderLM, LMConfig
  model = DecoderLM(LMConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                             mlp_dim=48, max_seq_len=32, **style), rngs=nnx.Rngs(0))
  rng = np.random.RandomState(0)  # norms and biases random too
  assign(model, {k: np.asarray(v) + 0.1 * rng.standard_normal(v.shape)
                 for k, v in flat_params(model).items()})
  toks = tokens(2)
  back = transformers.AutoModelForCausalLM.from_pretrained(
      export_hf(model, str(tmp_path / "out"))).eval()
  assert rel_err(hf_logits(back, toks), np.asarray(model(jnp.asarray(toks)))) < F32_TOL


def test_export_names_what_has_no_outside_equivalent(tmp_path):
  from flax import nnx
  from zoo.language.llama import DecoderLM, LMConfig
  model = DecoderLM(LMConfig(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4,
                             mlp_dim=64, positional="alibi"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="model.positional='alibi'"):
    export_hf(model, str(tmp_path / "out"))
  model = DecoderLM(LMConfig(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4,
                             mlp_dim=64, rope_scaling=2.0, rope_scaling_type="ntk"),
                    rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="model.rope_scaling_type='ntk'"):
    export_hf(model, str(tmp_path / "out2"))


@pytest.mark.parametrize("case", ["llama_mha_untied", "llama_attention_bias", "mistral_window",
                                  "gpt2", "gpt2_erf_gelu_untied"])
def test_greedy_generation_equals_transformers(case, tmp_path):
  """`zoo.generation.generate` (KV cache) on the loaded model emits transformers' greedy
  tokens; the Mistral case runs past its window (prompt 6 + 8 new > 5)."""
  from zoo.generation import generate
  model = hf_model(case)
  ours, _ = load_hf(saved(model, tmp_path / "hf"))
  prompt = tokens(3)[:, :6]
  with torch.no_grad():
    ref = model.generate(torch.tensor(prompt, dtype=torch.long), do_sample=False,
                         max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
  # No near-ties: float32 rounding cannot flip an argmax (top-2 gaps measured >= 5.6e-3).
  scores = np.sort(np.stack([s.numpy() for s in ref.scores]), axis=-1)
  assert np.min(scores[..., -1] - scores[..., -2]) > 1e-4
  out, lengths = generate(ours, prompt, max_new_tokens=8)
  np.testing.assert_array_equal(np.asarray(out), ref.sequences.numpy()[:, 6:])
  np.testing.assert_array_equal(np.asarray(lengths), [8, 8])
