"""Hugging Face ViT / CLIP-vision / SigLIP-vision <-> our `vit`: outputs of tiny random HF
models (built offline from a config) match ours in float32, and `export_hf` reloads in
transformers with the original's outputs."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from zoo.hub import export_hf, load_hf  # noqa: E402

torch.set_num_threads(1)

EAGER = dict(attn_implementation="eager")  # reloads default to SDPA, which rounds differently
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             image_size=16, patch_size=4, **EAGER)
# Float32 rounding level: a few hundred ulps of the output's own scale (measured: <= 5e-7 x).
REL_TOL = 1e-5


def pixels(seed=0, size=16):
  return np.random.default_rng(seed).normal(size=(2, 3, size, size)).astype(np.float32)


def nhwc(x):
  return jnp.asarray(x.transpose(0, 2, 3, 1))  # HF pixel_values are NCHW, ours NHWC


def save(model, path):
  model.eval()
  model.save_pretrained(path)
  return str(path)


def close(ours, ref, name):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, name
  err, tol = np.abs(ours - ref).max(), REL_TOL * np.abs(ref).max()
  print(f"{name}: max abs diff {err:.3g} (tolerance {tol:.3g})")  # shown with pytest -s
  assert err <= tol, f"{name}: max abs diff {err:.3g} > {tol:.3g}"


def hf_out(model, x):
  with torch.no_grad():
    return model(pixel_values=torch.tensor(x))


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.ViTConfig(**SIZES, num_labels=5)
  return save(transformers.ViTForImageClassification(cfg), tmp_path_factory.mktemp("vit"))


def test_vit_classifier_matches_and_round_trips(vit_dir, tmp_path):
  hf = transformers.ViTForImageClassification.from_pretrained(vit_dir, **EAGER).eval()
  model, cfg = load_hf(vit_dir)
  assert cfg.mlp_activation == "gelu_exact" and cfg.norm_eps == 1e-12 and cfg.num_classes == 5
  x = pixels()
  ref = hf_out(hf, x).logits.numpy()
  close(model(nhwc(x)), ref, "ViT logits")
  with torch.no_grad():
    tokens = hf.vit(pixel_values=torch.tensor(x)).last_hidden_state.numpy()
  close(model.encode(nhwc(x)), tokens, "ViT last_hidden_state")

  export_hf(model, tmp_path)
  back = transformers.AutoModelForImageClassification.from_pretrained(tmp_path, **EAGER).eval()
  assert type(back).__name__ == "ViTForImageClassification"
  np.testing.assert_array_equal(hf_out(back, x).logits.numpy(), ref)


def test_vit_without_qkv_bias_and_vit_model_tower(tmp_path):
  torch.manual_seed(1)
  hf = transformers.ViTModel(transformers.ViTConfig(**SIZES, qkv_bias=False))
  model, cfg = load_hf(save(hf, tmp_path))  # the tanh pooler is declared ignorable
  assert cfg.num_classes == 0
  x = pixels(1)
  out = hf_out(hf, x)
  close(model(nhwc(x)), out.last_hidden_state[:, 0].numpy(), "ViTModel CLS")
  close(model.encode(nhwc(x)), out.last_hidden_state.numpy(), "ViTModel last_hidden_state")


def test_clip_vision_tower_matches_and_round_trips(tmp_path):
  torch.manual_seed(2)
  hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SIZES))
  model, cfg = load_hf(save(hf, tmp_path / "in"))
  assert (cfg.pre_norm, cfg.patch_bias, cfg.mlp_activation) == (True, False, "quick_gelu")
  x = pixels(2)
  out = hf_out(hf, x)
  # CLIP's last_hidden_state is before post_layernorm; the pooled CLS vector is after it.
  close(model(nhwc(x)), out.pooler_output.numpy(), "CLIP vision pooler_output")

  export_hf(model, tmp_path / "out")
  back = transformers.AutoModel.from_pretrained(tmp_path / "out", **EAGER).eval()
  assert type(back).__name__ == "CLIPVisionModel"
  again = hf_out(back, x)
  np.testing.assert_array_equal(again.pooler_output.numpy(), out.pooler_output.numpy())
  np.testing.assert_array_equal(again.last_hidden_state.numpy(), out.last_hidden_state.numpy())


def test_siglip_vision_tower_matches_and_round_trips(tmp_path):
  torch.manual_seed(3)
  hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIZES))
  model, cfg = load_hf(save(hf, tmp_path / "in"))
  assert (cfg.pool, cfg.class_token, cfg.mlp_activation) == ("map", False, "gelu")
  x = pixels(3)
  out = hf_out(hf, x)
  close(model(nhwc(x)), out.pooler_output.numpy(), "SigLIP vision pooler_output (MAP head)")
  close(model.encode(nhwc(x)), out.last_hidden_state.numpy(), "SigLIP last_hidden_state")

  export_hf(model, tmp_path / "out")
  back = transformers.AutoModel.from_pretrained(tmp_path / "out", **EAGER).eval()
  assert type(back).__name__ == "SiglipVisionModel"
  np.testing.assert_array_equal(hf_out(back, x).pooler_output.numpy(), out.pooler_output.numpy())


def _edit_config(path, **fields):
  file = os.path.join(path, "config.json")
  with open(file) as f:
    cfg = json.load(f)
  cfg.update(fields)
  with open(file, "w") as f:
    json.dump(cfg, f)


@pytest.mark.parametrize("fields, named", [
    (dict(hidden_act="gelu_fast"), "hidden_act"),
    (dict(architectures=["ViTForMaskedImageModeling"]), "architectures"),
    (dict(num_attention_heads=3), "num_attention_heads"),
])
def test_unsupported_vit_options_name_the_field(vit_dir, tmp_path, fields, named):
  import shutil
  path = shutil.copytree(vit_dir, tmp_path / "ckpt")
  _edit_config(path, **fields)
  with pytest.raises(ValueError, match=f"unsupported Hugging Face config: {named}="):
    load_hf(str(path))


def test_siglip_without_head_and_other_image_sizes_are_errors(tmp_path):
  torch.manual_seed(4)
  path = save(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIZES)), tmp_path)
  _edit_config(path, vision_use_head=False)
  with pytest.raises(ValueError, match="vision_use_head=False"):
    load_hf(path)
  _edit_config(path, vision_use_head=True)
  model, _ = load_hf(path)
  # HF's interpolate_pos_encoding has no counterpart: another size is an error naming it.
  with pytest.raises(ValueError, match=r"model\.image_size"):
    model(nhwc(pixels(size=24)))


def test_export_names_what_hf_cannot_express(vit_dir, tmp_path):
  from zoo.hub.vit import vision_config_to_hf
  from zoo.vision.vit import ViTConfig
  model, cfg = load_hf(vit_dir)
  with pytest.raises(ValueError, match=r"model\.posemb"):
    vision_config_to_hf(ViTConfig.from_config(dict(cfg, posemb="sincos2d")), "vit")
  with pytest.raises(ValueError, match=r"model\.num_kv_heads"):
    vision_config_to_hf(ViTConfig.from_config(dict(cfg, num_kv_heads=1)), "vit")
  with pytest.raises(ValueError, match="not the clip vision layout"):
    vision_config_to_hf(model.cfg, "clip")
