"""BERT and ModernBERT checkpoints (zoo/hub/bert.py, zoo/hub/modernbert.py) against
transformers on the same random weights, in float32: MLM logits, the export round trip
through `AutoModelForMaskedLM.from_pretrained`, and unsupported options."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from zoo.hub.hf import assign, converters, export_hf, flat_params, load_hf
from zoo.language.encoder import EncoderConfig, TextEncoder

torch.set_num_threads(1)
V, T = 64, 16
# float32 rounding of logits of magnitude ~1-10 through a few layers: relative to max |logit|.
TOL = 1e-5


def _perturb(model):
  """HF initialises LayerNorms to (1, 0) and biases to 0, which would hide a swapped or
  dropped one: move every parameter off its init."""
  torch.manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _save(model, path):
  model.save_pretrained(path)
  return str(path)


def _logits(model, toks, **kw):
  with torch.no_grad():
    return model(input_ids=torch.tensor(toks), **{k: torch.tensor(v) for k, v in kw.items()}
                 ).logits.numpy()


def _check(ours, ref, what):
  err = float(np.abs(np.asarray(ours, np.float64) - ref).max())
  msg = f"{what}: max abs diff {err:.2e}, max |ref| {np.abs(ref).max():.2f}"
  print(msg)  # shown with pytest -s
  assert err <= TOL * np.abs(ref).max(), msg
  return err


def _round_trip(ours, ref, tmp_path, toks, **kw):
  """export_hf -> from_pretrained gives the original's logits exactly."""
  out = export_hf(ours, str(tmp_path / "export"))
  back = transformers.AutoModelForMaskedLM.from_pretrained(out, attn_implementation="eager")
  np.testing.assert_array_equal(_logits(back.eval(), toks, **kw), ref)
  return out


def _abstract(**fields) -> TextEncoder:
  """Our encoder without initialising its weights (no compiles): `assign` fills them."""
  return nnx.eval_shape(lambda: TextEncoder(EncoderConfig(**fields), rngs=nnx.Rngs(0)))


def _tokens(seed=0):
  return np.random.default_rng(seed).integers(3, V, size=(2, T))


# --------------------------------------------------------------------------- BERT

BERT = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=T, attn_implementation="eager")


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_bert_mlm_matches_transformers_and_exports_back(act, tmp_path):
  torch.manual_seed(0)
  hf = _perturb(transformers.BertForMaskedLM(transformers.BertConfig(**BERT, hidden_act=act)))
  toks, types = _tokens(), np.zeros((2, T), np.int64)
  types[:, T // 2:] = 1  # segment B
  ref = _logits(hf, toks, token_type_ids=types)
  ours, cfg = load_hf(_save(hf, tmp_path / "hf"))
  assert cfg.norm_position == "post" and not cfg.final_norm and cfg.mlp_activation == (
      "gelu_exact" if act == "gelu" else "relu")
  _check(ours(jnp.asarray(toks), token_type_ids=jnp.asarray(types)), ref, f"bert {act}")
  _round_trip(ours, ref, tmp_path, toks, token_type_ids=types)


def test_bert_pretraining_and_bare_checkpoints(tmp_path):
  """BertForPreTraining: the pooler and NSP head are dropped. BertModel: loads without the
  MLM head. A head-less checkpoint that claims one is an error saying so."""
  config = transformers.BertConfig(**BERT)
  torch.manual_seed(0)
  pre = _perturb(transformers.BertForPreTraining(config))
  toks = _tokens()
  with torch.no_grad():
    out = pre(input_ids=torch.tensor(toks))
  ours, _ = load_hf(_save(pre, tmp_path / "pre"))
  _check(ours(jnp.asarray(toks)), out.prediction_logits.numpy(), "BertForPreTraining")

  bare = pre.bert
  path = _save(bare, tmp_path / "bare")
  ours, cfg = load_hf(path)
  assert not cfg.mlm_head
  with torch.no_grad():
    feats = bare(input_ids=torch.tensor(toks)).last_hidden_state.numpy()
  _check(ours.encode(jnp.asarray(toks)), feats, "BertModel features")

  with open(os.path.join(path, "config.json")) as f:
    c = json.load(f)
  c["architectures"] = ["BertForMaskedLM"]
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(c, f)
  with pytest.raises(ValueError, match=r"no MLM head \(cls.predictions"):
    load_hf(path)


@pytest.mark.parametrize("field,value", [("position_embedding_type", "relative_key"),
                                         ("hidden_act", "tanh"), ("is_decoder", True),
                                         ("add_cross_attention", True),
                                         ("tie_word_embeddings", False)])
def test_bert_unsupported_options_name_the_field(field, value):
  hf = transformers.BertConfig(**BERT).to_dict()
  hf[field] = value
  with pytest.raises(ValueError, match=f"unsupported Hugging Face config: {field}="):
    converters()["bert"].to_zoo_config(hf)


def test_bert_export_refuses_what_bert_lacks(tmp_path):
  cfg = converters()["bert"].to_zoo_config(transformers.BertConfig(**BERT).to_dict())
  bertish = dict(cfg.to_dict(), final_norm=True)
  del bertish["name"]
  with pytest.raises(ValueError, match=r"model.final_norm=True: BertForMaskedLM"):
    export_hf(_abstract(**bertish), str(tmp_path), architecture="BertForMaskedLM")
  with pytest.raises(ValueError, match="cannot be written as BertForMaskedLM"):
    export_hf(_abstract(vocab_size=V, d_model=32, num_layers=1, mlp_dim=32), str(tmp_path),
              architecture="BertForMaskedLM")


# --------------------------------------------------------------------------- ModernBERT

MODERNBERT = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=64, local_attention=8,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                  sep_token_id=2, attn_implementation="eager")


@pytest.mark.parametrize("extra", [
    dict(global_attn_every_n_layers=3),
    dict(global_attn_every_n_layers=2, attention_bias=True, mlp_bias=False, norm_bias=True,
         classifier_bias=True, decoder_bias=False, hidden_activation="gelu_pytorch_tanh",
         classifier_pooling="mean",
         rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5000.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}),
], ids=["defaults", "biases"])
def test_modernbert_mlm_matches_transformers_and_exports_back(extra, tmp_path):
  """seq 16 > local_attention 8: local layers see |i - j| <= 4, as HF's mask."""
  torch.manual_seed(0)
  config = transformers.ModernBertConfig(**MODERNBERT, **extra)
  hf = _perturb(transformers.ModernBertForMaskedLM(config))
  if not extra.get("decoder_bias", True):
    assert hf.decoder.bias is None
  toks, ones = _tokens(), np.ones((2, T), np.int64)
  ref = _logits(hf, toks, attention_mask=ones)
  ours, cfg = load_hf(_save(hf, tmp_path / "hf"))
  assert cfg.local_window == 8 and not cfg.first_attn_norm
  assert cfg.global_every == extra["global_attn_every_n_layers"]
  _check(ours(jnp.asarray(toks)), ref, "modernbert")
  out = _round_trip(ours, ref, tmp_path, toks, attention_mask=ones)
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  for flag in ("attention_bias", "mlp_bias", "norm_bias", "classifier_bias", "decoder_bias"):
    assert written[flag] == extra.get(flag, config.to_dict()[flag]), flag

  # The window is what makes the match: one token more or less each side does not.
  params = flat_params(ours)
  for window in (6, 10):
    other = _abstract(**{k: v for k, v in dict(cfg, local_window=window).items() if k != "name"})
    assign(other, params)
    assert float(np.abs(np.asarray(other(jnp.asarray(toks))) - ref).max()) > 1e-3

  if "attention_bias" not in extra:  # a bare ModernBertModel loads without the MLM head
    bare, _ = load_hf(_save(hf.model, tmp_path / "bare"))
    assert not bare.cfg.mlm_head
    with torch.no_grad():
      feats = hf.model(input_ids=torch.tensor(toks)).last_hidden_state.numpy()
    _check(bare.encode(jnp.asarray(toks)), feats, "ModernBertModel features")


def test_our_encoder_exports_as_modernbert(tmp_path):
  """A model trained here (norm biases, the tanh-GELU GeGLU) written out and run by HF."""
  model = _abstract(vocab_size=V, d_model=32, num_layers=3, num_heads=4, mlp_dim=48,
                    local_window=8, global_every=3)
  rng = np.random.default_rng(0)
  assign(model, {k: float(k.endswith(".scale")) + 0.2 * rng.standard_normal(v.shape)
                 for k, v in flat_params(model).items()})
  toks = _tokens(1)
  path = export_hf(model, str(tmp_path))
  hf = transformers.AutoModelForMaskedLM.from_pretrained(path, attn_implementation="eager")
  ref = _logits(hf.eval(), toks, attention_mask=np.ones((2, T), np.int64))
  _check(model(jnp.asarray(toks)), ref, "ours -> ModernBertForMaskedLM")


def test_modernbert_config_forms_and_unsupported_options():
  conv = converters()["modernbert"]
  base = dict(MODERNBERT, num_hidden_layers=4, architectures=["ModernBertForMaskedLM"])
  base.pop("attn_implementation")
  # transformers-4 fields.
  cfg = conv.to_zoo_config(dict(base, global_attn_every_n_layers=2, global_rope_theta=1e5,
                                local_rope_theta=1e3))
  assert (cfg.global_every, cfg.rope_base, cfg.local_rope_base) == (2, 1e5, 1e3)
  full, slide = "full_attention", "sliding_attention"
  cfg = conv.to_zoo_config(dict(base, layer_types=[full, slide, slide, slide]))
  assert cfg.global_every == 4
  bad = [
      ("layer_types", dict(layer_types=[full, slide, full, full])),
      ("rope_parameters.full_attention.rope_type",
       dict(rope_parameters={full: {"rope_type": "linear", "factor": 2.0}})),
      ("tie_word_embeddings", dict(tie_word_embeddings=False)),
      ("hidden_activation", dict(hidden_activation="tanh")),
      ("classifier_pooling", dict(classifier_pooling="max")),
  ]
  for field, change in bad:
    with pytest.raises(ValueError, match=f"unsupported Hugging Face config: {field}="):
      conv.to_zoo_config(dict(base, **change))
