"""`generate` with the KV cache equals recomputing the full forward at every step."""

import numpy as np
import pytest
from flax import nnx

from zoo.generation import generate, generate_without_cache
from zoo.language.llama import DecoderLM, LMConfig
from zoo.multimodal.captioner import Captioner, CaptionerConfig

VOCAB = 40
PROMPTS = [[1, 7, 3], [1, 9, 2, 30, 4, 11], [5]]  # different lengths, positions from 0 each
LOGIT_TOL = dict(atol=5e-5, rtol=5e-5)  # float32 rounding; logits are of order 1

LMS = {
    "rope_gqa": dict(num_kv_heads=2),
    "gated": dict(attention="gated", num_kv_heads=2),  # the gate reads each new token's input
    "gpt2": dict(position_embedding="learned", positional="nope", norm="layernorm",
                 mlp_kind="gelu", use_bias=True, tie_embeddings=False),
}


def lm(**kw):
  cfg = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_seq_len=16)
  cfg.update(kw)
  return DecoderLM(LMConfig(**cfg), rngs=nnx.Rngs(0))


IMAGE = dict(image_size=8, patch_size=4, d_model=16, num_layers=1, num_heads=2, mlp_dim=32)


def captioner(variant):
  return Captioner(CaptionerConfig(vocab_size=VOCAB, variant=variant, d_model=32, num_layers=2,
                                   num_heads=4, num_kv_heads=2, mlp_dim=64, image=IMAGE),
                   rngs=nnx.Rngs(0))


def images(n=3):
  return np.random.default_rng(0).normal(size=(n, 8, 8, 3)).astype(np.float32)


def assert_same_generation(model, **kw):
  got = generate(model, PROMPTS, max_new_tokens=5, return_logits=True, **kw)
  want = generate_without_cache(model, PROMPTS, max_new_tokens=5, return_logits=True, **kw)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[2], want[2], **LOGIT_TOL)
  return got


@pytest.mark.parametrize("name", sorted(LMS))
def test_cached_greedy_equals_recomputing(name):
  tokens, lengths, _ = assert_same_generation(lm(**LMS[name]))
  assert tokens.shape == (3, 5)
  np.testing.assert_array_equal(lengths, [5, 5, 5])


@pytest.mark.parametrize("variant", ["cross", "prefix"])
def test_captioner_cached_greedy_equals_recomputing(variant):
  assert_same_generation(captioner(variant), images=images())


def test_sampling_is_seeded_and_equals_recomputing():
  model = lm(num_kv_heads=2)
  kw = dict(temperature=1.5, top_k=10, top_p=0.9, seed=3)
  a = assert_same_generation(model, **kw)
  b = generate(model, PROMPTS, max_new_tokens=5, **kw)
  np.testing.assert_array_equal(a[0], b[0])
  c = generate(model, PROMPTS, max_new_tokens=5, **{**kw, "seed": 4})
  assert not np.array_equal(a[0], c[0])


def test_stop_tokens_end_a_sequence_and_pad_the_rest():
  model = lm(num_kv_heads=2)
  free, _ = generate(model, PROMPTS, max_new_tokens=5, temperature=1.0, seed=1)
  stop = int(free[0, 1])
  hits = [next((i for i, t in enumerate(row) if t == stop), None) for row in np.asarray(free)]
  tokens, lengths = generate(model, PROMPTS, max_new_tokens=5, temperature=1.0, seed=1,
                             stop_tokens=(stop,), pad_id=VOCAB - 1)
  for b, hit in enumerate(hits):
    n = 5 if hit is None else hit + 1  # the stop token is kept and counted
    assert int(lengths[b]) == n
    np.testing.assert_array_equal(tokens[b, :n], free[b, :n])
    np.testing.assert_array_equal(tokens[b, n:], VOCAB - 1)


def test_the_reference_decode_path_equals_xla():
  """implementation='reference' (dense flash prefill, dense decode attention) against 'xla'."""
  a = generate(lm(num_kv_heads=2, implementation="reference"), PROMPTS, max_new_tokens=3,
               return_logits=True)
  b = generate(lm(num_kv_heads=2, implementation="xla"), PROMPTS, max_new_tokens=3,
               return_logits=True)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_allclose(a[2], b[2], **LOGIT_TOL)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match=r"attention='entmax' \(model.attention\) has no KV-cache"):
    generate(lm(attention="entmax"), PROMPTS, max_new_tokens=2)
  with pytest.raises(ValueError, match="model.max_seq_len=16"):
    generate(lm(), PROMPTS, max_new_tokens=20)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate(lm(), [[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(lm(), PROMPTS, max_new_tokens=0)
  with pytest.raises(ValueError, match="reads no images"):
    generate(lm(), PROMPTS, max_new_tokens=2, images=images())
  with pytest.raises(ValueError, match="pass images="):
    generate(captioner("cross"), PROMPTS, max_new_tokens=2)
