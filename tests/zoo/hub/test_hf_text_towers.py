"""CLIP and SigLIP text towers (zoo/hub/clip_text.py) against transformers' own, on the same
random weights, in float32."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from zoo.hub.clip_text import (text_config_to_hf, text_config_to_zoo, text_params_to_hf,
                               text_params_to_zoo)
from zoo.hub.hf import assign, flat_params, read_tensors
from zoo.language.encoder import EncoderConfig, TextEncoder

torch.set_num_threads(1)
V, T = 64, 12
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, pad_token_id=1)
TOL = 2e-5  # float32 rounding after LayerNorm-scaled outputs of magnitude ~1-5, relative


def _hf_tower(cls, config, tmp_path):
  torch.manual_seed(0)
  model = cls(config)
  # HF initialises LayerNorms to (1, 0) and biases to 0, which would hide a swapped or
  # dropped one: move every parameter off its init.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval().save_pretrained(tmp_path)
  return model, read_tensors(str(tmp_path))


def _ours(hf_config: dict, tensors, family: str, prefix: str = "") -> TextEncoder:
  cfg = EncoderConfig(**text_config_to_zoo(hf_config, family))
  model = nnx.eval_shape(lambda: TextEncoder(cfg, rngs=nnx.Rngs(0)))  # assign fills it
  assign(model, text_params_to_zoo(tensors, prefix, hf_config, family))
  return model


def _close(ours, ref, what):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  err = float(np.abs(ours - ref).max())
  msg = f"{what}: max abs diff {err:.2e}, max |ref| {np.abs(ref).max():.2f}"
  print(msg)  # shown with pytest -s
  assert err <= TOL * np.abs(ref).max(), msg
  return err


EOS = 10  # the newer rule's end-of-text id: not the largest id, so the two rules differ


def _tokens(end: int):
  """Random ids above EOS with the end token `end` at 7 (row 0, repeated at 9 as padding
  with the eos id would be: the first occurrence counts) and at the last slot (row 1)."""
  toks = np.random.default_rng(0).integers(EOS + 1, V - 1, size=(2, T))
  toks[0, 7], toks[0, 9], toks[1, T - 1] = end, end, end
  return toks


@pytest.mark.parametrize("eos", [2, EOS], ids=["argmax", "eos"])
def test_clip_text_tower_matches_transformers(eos, tmp_path):
  config = transformers.CLIPTextConfig(**SMALL, eos_token_id=eos, attn_implementation="eager")
  hf, tensors = _hf_tower(transformers.CLIPTextModel, config, tmp_path)
  # eos_token_id=2 (legacy): the end token is the largest id, V - 1.
  toks = _tokens(V - 1 if eos == 2 else EOS)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(toks))
  ours_cfg = text_config_to_zoo(config.to_dict(), "clip")
  assert ours_cfg["causal"] and ours_cfg["pool"] == ("argmax" if eos == 2 else "eos")
  # A CLIPModel stores the tower under "text_model.": the same tensors under a prefix.
  model = _ours(config.to_dict(), {"text_model." + k: v for k, v in tensors.items()}, "clip",
                "text_model.")
  feats = model.encode(jnp.asarray(toks))
  _close(feats, out.last_hidden_state.numpy(), "last_hidden_state")
  _close(model.pool(feats, tokens=jnp.asarray(toks)), out.pooler_output.numpy(), "pooler_output")


def test_siglip_text_tower_matches_transformers(tmp_path):
  config = transformers.SiglipTextConfig(**SMALL, attn_implementation="eager")
  hf, tensors = _hf_tower(transformers.SiglipTextModel, config, tmp_path)
  toks = _tokens(EOS)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(toks))
  head = {k: v for k, v in tensors.items() if k.startswith("head.")}
  assert sorted(head) == ["head.bias", "head.weight"]  # the composer's, not the tower's
  model = _ours(config.to_dict(), tensors, "siglip")
  assert not model.cfg.causal
  feats = model.encode(jnp.asarray(toks))
  ref = out.last_hidden_state.numpy()
  _close(feats, ref, "last_hidden_state")
  _close(model.pool(feats), ref[:, -1], "pre-head pooled vector")


@pytest.mark.parametrize("family,cls", [("clip", "CLIPTextModel"), ("siglip", "SiglipTextModel")])
def test_export_is_the_inverse(family, cls, tmp_path):
  config_cls = getattr(transformers, cls.replace("Model", "Config"))
  config = config_cls(**SMALL, eos_token_id=V - 1)
  hf, tensors = _hf_tower(getattr(transformers, cls), config, tmp_path)
  model = _ours(config.to_dict(), tensors, family)
  hf_cfg = text_config_to_hf(model.cfg, family)
  for k, v in hf_cfg.items():
    assert config.to_dict()[k] == v, k
  back = text_params_to_hf(flat_params(model), model.cfg, family, "text_model.")
  tower = {k: v for k, v in tensors.items() if not k.startswith("head.")}
  assert sorted(back) == sorted("text_model." + k for k in tower)
  for k, v in tower.items():
    np.testing.assert_array_equal(back["text_model." + k], v, err_msg=k)


def test_errors_name_the_field():
  with pytest.raises(ValueError, match="hidden_act"):
    text_config_to_zoo(dict(SMALL, hidden_act="mish"), "clip")
  with pytest.raises(ValueError, match="eos_token_id"):
    text_config_to_zoo(dict(SMALL, eos_token_id=[2, 3]), "clip")
  with pytest.raises(ValueError, match="family"):
    text_config_to_zoo(SMALL, "align")
  cfg = EncoderConfig(**text_config_to_zoo(SMALL, "siglip"))
  with pytest.raises(ValueError, match=r"model.text.causal=True"):
    text_config_to_hf(dataclasses.replace(cfg, causal=True), "siglip")
  with pytest.raises(ValueError, match=r"model.text.pool='mean'"):
    text_config_to_hf(dataclasses.replace(cfg, pool="mean"), "siglip")
