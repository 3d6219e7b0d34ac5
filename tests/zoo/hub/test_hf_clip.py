"""Hugging Face CLIPModel / SiglipModel <-> our `clip`: logits and embeddings of tiny random HF
models (built offline from a config) match ours in float32, `export_hf` reloads in
transformers with the original's logits, and options we lack are errors naming the field."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from zoo.hub import export_hf, load_hf  # noqa: E402

torch.set_num_threads(1)

EAGER = dict(attn_implementation="eager")  # reloads default to SDPA, which rounds differently
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              image_size=16, patch_size=4)
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            vocab_size=100, max_position_embeddings=16)
EOS, PAD = 99, 1
VISION_ZOO = dict(image_size=16, patch_size=4, d_model=32, num_layers=1, num_heads=2, mlp_dim=64)
# Float32 rounding level: a few hundred ulps of the output's own scale (measured: <= 6e-7 x).
REL_TOL = 1e-5


def inputs(seed=0):
  """3 images (NCHW) and 4 texts of 12 tokens: the end token at a different slot in each row,
  pads after it. HF is called without an attention_mask (CLIP's causal tower never sees the
  pads after its end token; SigLIP attends to every slot and reads the last)."""
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
  ids = rng.integers(3, EOS, (4, 12))
  for row, end in enumerate((11, 8, 5, 9)):
    ids[row, end], ids[row, end + 1:] = EOS, PAD
  return pixels, ids


def hf_out(model, pixels, ids):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels))


def ours(model, pixels, ids):
  x, t = jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids)  # NCHW -> NHWC
  u, v = model.encode_image(x), model.encode_text(t)
  return {"logits_per_image": model.logits(u, v), "image_embeds": u, "text_embeds": v}


def check_parity(model, out, pixels, ids, name):
  got = ours(model, pixels, ids)
  for key, value in got.items():
    ref = getattr(out, key).numpy()
    err, tol = np.abs(np.asarray(value) - ref).max(), REL_TOL * np.abs(ref).max()
    assert np.asarray(value).shape == ref.shape, f"{name} {key}"
    print(f"{name} {key}: max abs diff {err:.3g} (tolerance {tol:.3g})")  # pytest -s shows it
    assert err <= tol, f"{name} {key}: max abs diff {err:.3g} > {tol:.3g}"


def save(model, path):
  model.eval()
  model.save_pretrained(path)
  return str(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.CLIPConfig(text_config=dict(TEXT, eos_token_id=EOS, pad_token_id=PAD),
                                vision_config=VISION, projection_dim=24, **EAGER)
  return save(transformers.CLIPModel(cfg), tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
  torch.manual_seed(1)
  cfg = transformers.SiglipConfig(text_config=dict(TEXT, pad_token_id=PAD),
                                  vision_config=VISION, **EAGER)
  return save(transformers.SiglipModel(cfg), tmp_path_factory.mktemp("siglip"))


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_logits_match_and_export_round_trips(which, clip_dir, siglip_dir, tmp_path):
  path = clip_dir if which == "clip" else siglip_dir
  hf = transformers.AutoModel.from_pretrained(path, **EAGER).eval()
  model, cfg = load_hf(path)
  assert cfg.mask_padding is False
  assert (cfg.loss, cfg.image_projection) == (("softmax", True) if which == "clip"
                                              else ("sigmoid", False))
  pixels, ids = inputs()
  out = hf_out(hf, pixels, ids)
  check_parity(model, out, pixels, ids, which)

  export_hf(model, tmp_path)
  back = transformers.AutoModel.from_pretrained(tmp_path, **EAGER).eval()
  assert type(back) is type(hf)
  np.testing.assert_array_equal(hf_out(back, pixels, ids).logits_per_image.numpy(),
                                out.logits_per_image.numpy())


def _copy_with(src, dst, edit):
  path = shutil.copytree(src, dst)
  file = os.path.join(path, "config.json")
  with open(file) as f:
    cfg = json.load(f)
  edit(cfg)
  with open(file, "w") as f:
    json.dump(cfg, f)
  return str(path)


@pytest.mark.parametrize("which, edit, named", [
    ("clip", lambda c: c.update(architectures=["CLIPForImageClassification"]), "architectures"),
    ("clip", lambda c: c["text_config"].update(hidden_act="gelu_fast"), "hidden_act"),
    ("siglip", lambda c: c["text_config"].update(projection_size=24),
     "text_config.projection_size"),
    ("siglip", lambda c: c["vision_config"].update(vision_use_head=False), "vision_use_head"),
])
def test_unsupported_options_name_the_field(which, edit, named, clip_dir, siglip_dir, tmp_path):
  path = _copy_with(clip_dir if which == "clip" else siglip_dir, tmp_path / "ckpt", edit)
  with pytest.raises(ValueError, match=f"unsupported Hugging Face config: {named}="):
    load_hf(path)


def test_export_names_what_hf_cannot_express(siglip_dir, tmp_path):
  from flax import nnx

  from zoo.multimodal.clip import CLIP, CLIPConfig
  model, cfg = load_hf(siglip_dir)
  masked = nnx.eval_shape(lambda: CLIP(CLIPConfig.from_config(dict(cfg, mask_padding=True)),
                                       rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"model\.mask_padding"):
    export_hf(masked, tmp_path, architecture="SiglipModel")
  # The zoo's default CLIP (ViT without CLIP's pre-norm, ModernBERT text) is no CLIPModel.
  default = nnx.eval_shape(lambda: CLIP(CLIPConfig(
      vocab_size=30, embed_dim=16, image=dict(VISION_ZOO), text=dict(d_model=32, num_layers=1,
                                                                      num_heads=2, mlp_dim=64)),
      rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"model\.image"):
    export_hf(default, tmp_path)



def test_bfloat16_load_sets_both_towers(clip_dir):
  model, cfg = load_hf(clip_dir, dtype="bfloat16")
  assert cfg.image.dtype == cfg.text.dtype == "bfloat16"
  assert model.image_tower.blocks[0].attention.qkv.q.kernel[...].dtype == jnp.bfloat16
  pixels, ids = inputs()
  ref = hf_out(transformers.AutoModel.from_pretrained(clip_dir, **EAGER).eval(), pixels, ids)
  got = np.asarray(ours(model, pixels, ids)["logits_per_image"], np.float32)
  ref = ref.logits_per_image.numpy()
  assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()  # bf16 rounding, 8 mantissa bits
