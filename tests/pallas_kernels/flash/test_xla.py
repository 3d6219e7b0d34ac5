"""The memory-efficient XLA attention path against the dense reference, and the dispatch.

Comparisons (outputs and gradients, relative to the reference's scale) are
`parity.compare`'s. Shapes are small and lengths odd so that blocks of 16/32 leave ragged tails;
`block_b=block_h=1` forces one (batch, kv head) slab per loop step (the CPU
layout), `None` lets small shapes take one slab (the accelerator layout).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention
from pallas_kernels import dispatch
from pallas_kernels.flash import api, masking, xla
from tests.pallas_kernels.flash.parity import (BF16_TOL, F32_TOL, compare, inputs as _inputs,
                                               jit as _jit, normal as _normal, packed_segments)
from tests.numerics import rel_err as _rel_err


def _compare(q, k, v, do, *, mask_args=None, bias=None, sinks=None, distance_bias=None,
             logits_soft_cap=None, return_lse=False, tol=F32_TOL, **blocks):
  """parity.compare for the XLA path with the given block/slab sizes."""
  def fast(q, k, v, **kw):
    return xla.attention(q, k, v, **kw, **blocks)
  return compare(fast, q, k, v, do, mask_args=mask_args, bias=bias, sinks=sinks,
                 distance_bias=distance_bias, logits_soft_cap=logits_soft_cap,
                 return_lse=return_lse, tol=tol)


# ---------------------------------------------------------------------------
# Mask kinds.

B, T, HQ, HKV, D = 2, 37, 4, 2, 8


_segments = packed_segments  # B = 2 rows


MASKS = {
    "none": dict(),
    "causal": dict(is_causal=True),
    "bidirectional_padding": dict(kv_lengths=jnp.array([T, 20])),
    "padding_empty_batch_row": dict(is_causal=True, kv_lengths=jnp.array([25, 0])),
    "segments_causal": dict(is_causal=True, segment_ids=_segments(T)),
    "segments_bidirectional": dict(segment_ids=_segments(T)),
    "prefix_lm": dict(is_causal=True, prefix_lengths=jnp.array([10, 0])),
    "window_left": dict(is_causal=True, local_window_size=5),
    "window_left_right": dict(local_window_size=(4, 6)),
    "window_right_only": dict(local_window_size=(0, 3)),
    "window_right_unbounded_left": dict(local_window_size=(None, 3)),
    "chunked": dict(is_causal=True, chunk_size=8),
    "dense": dict(mask=jnp.asarray(np.random.default_rng(3).random((B, 1, T, T)) < 0.6)),
    "dense_per_head": dict(mask=jnp.asarray(np.random.default_rng(4).random((1, HQ, T, T)) < 0.6)),
    "combined": dict(is_causal=True, local_window_size=9, segment_ids=_segments(T),
                     kv_lengths=jnp.array([33, 17])),
    "custom_positions": dict(is_causal=True,
                             q_positions=jnp.tile(jnp.arange(T)[::-1], (B, 1)),
                             kv_positions=jnp.tile(jnp.arange(T)[::-1], (B, 1))),
}


@pytest.mark.parametrize("kind,slab", [(kind, "per_head") for kind in sorted(MASKS)] + [
    (kind, "whole") for kind in ("causal", "dense_per_head", "combined")])
def test_mask_kinds(kind, slab):
  q, k, v, do = _inputs(B, T, T, HQ, HKV, D)
  mask_args = masking.make_mask_args(B, T, T, num_heads=HQ, **MASKS[kind])
  blocks = dict(block_b=1, block_h=1) if slab == "per_head" else dict(block_b=B, block_h=HKV)
  _compare(q, k, v, do, mask_args=mask_args, block_q=16, block_k=16, **blocks)


def test_fully_masked_rows_are_zero_with_zero_grads():
  q, k, v, do = _inputs(B, T, T, HQ, HKV, D)
  # Batch row 1 sees no key; in row 0 the first 5 queries see none (window past the keys).
  mask = np.ones((B, 1, T, T), bool)
  mask[0, :, :5] = False
  mask_args = masking.make_mask_args(B, T, T, kv_lengths=jnp.array([T, 0]), mask=jnp.asarray(mask))
  (out, grads), _ = _compare(q, k, v, do, mask_args=mask_args, return_lse=True, block_q=16,
                             block_k=16)
  np.testing.assert_array_equal(out[1], 0.0)
  np.testing.assert_array_equal(out[0, :5], 0.0)
  np.testing.assert_array_equal(grads["q"][1], 0.0)
  np.testing.assert_array_equal(grads["q"][0, :5], 0.0)
  np.testing.assert_array_equal(grads["k"][1], 0.0)
  np.testing.assert_array_equal(grads["v"][1], 0.0)
  _, lse = _jit(lambda q, k, v: xla.attention(q, k, v, mask_args=mask_args, return_lse=True,
                                               block_q=16, block_k=16), q, k, v)
  assert np.all(np.isneginf(lse[1])) and np.all(np.isneginf(lse[0, :, :5]))


# ---------------------------------------------------------------------------
# Shapes: ragged lengths, Tq != Tk, GQA, head sizes.


@pytest.mark.parametrize("tq,tk,block_q,block_k", [
    (37, 37, 16, 16),
    (100, 100, 16, 32),
    (5, 100, 16, 32),  # a few new tokens against a longer cache (bottom-right causal)
    (1, 100, None, 32),  # one decode step
    (100, 37, 32, 16),  # more queries than keys: the first 63 rows see nothing under causal
    (64, 64, None, None),  # one block of the whole sequence: no loop at all
])
def test_lengths_and_blocks(tq, tk, block_q, block_k):
  q, k, v, do = _inputs(B, tq, tk, HQ, HKV, D, seed=1)
  mask_args = masking.make_mask_args(B, tq, tk, is_causal=True)
  _compare(q, k, v, do, mask_args=mask_args, block_q=block_q, block_k=block_k, block_b=1,
           block_h=1)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (4, 1)])  # (4, 2) is every other test
def test_gqa_ratios(hq, hkv):
  q, k, v, do = _inputs(B, T, T, hq, hkv, D, seed=2)
  mask_args = masking.make_mask_args(B, T, T, is_causal=True, segment_ids=_segments(T))
  _compare(q, k, v, do, mask_args=mask_args, block_q=16, block_k=16, block_b=1, block_h=1)


def test_value_head_dim_differs():
  q, k, v, do = _inputs(B, T, T, HQ, HKV, 16, dv=24, seed=3)
  _compare(q, k, v, do, mask_args=masking.make_mask_args(B, T, T, is_causal=True), block_q=16,
           block_k=16)


def test_bfloat16():
  q, k, v, do = _inputs(B, T, T, HQ, HKV, D, dtype=jnp.bfloat16, seed=4)
  mask_args = masking.make_mask_args(B, T, T, is_causal=True, segment_ids=_segments(T))
  _compare(q, k, v, do, mask_args=mask_args, tol=BF16_TOL, block_q=16, block_k=16, block_b=1,
           block_h=1)


def test_empty_sequences():
  q, k, v, _ = _inputs(1, 5, 5, 2, 1, 8)
  no_keys = k[:, :0], v[:, :0]
  out, lse = _jit(lambda q, k, v: xla.attention(q, k, v, sinks=jnp.zeros(2), return_lse=True),
                  q, *no_keys)
  np.testing.assert_array_equal(out, 0.0)
  np.testing.assert_array_equal(lse, 0.0)  # only the sink, exp(0) = 1, in the denominator
  out = _jit(lambda q, k, v: xla.attention(q, k, v), q[:, :0], k, v)
  assert out.shape == (1, 0, 2, 8)


# ---------------------------------------------------------------------------
# Score modifications and extra outputs.


def test_logits_soft_cap():
  q, k, v, do = _inputs(B, T, T, HQ, HKV, D, seed=5)
  mask_args = masking.make_mask_args(B, T, T, is_causal=True)
  # Scaled-up queries put many logits in tanh's curved range.
  _compare(4 * q, k, v, do, mask_args=mask_args, logits_soft_cap=3.0, block_q=16, block_k=16,
           block_b=1, block_h=1)


def test_sinks():
  q, k, v, do = _inputs(B, T, T, HQ, HKV, D, seed=6)
  sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
  # Batch row 1 has no visible key: its rows put all weight on the sink.
  mask_args = masking.make_mask_args(B, T, T, is_causal=True, kv_lengths=jnp.array([T, 0]))
  (out, grads), _ = _compare(q, k, v, do, mask_args=mask_args, sinks=sinks, return_lse=True,
                             block_q=16, block_k=16)
  np.testing.assert_array_equal(out[1], 0.0)
  assert np.any(grads["sinks"] != 0)


def test_return_lse_and_its_gradient():
  q, k, v, do = _inputs(B, 100, 100, HQ, HKV, D, seed=7)
  mask_args = masking.make_mask_args(B, 100, 100, is_causal=True, local_window_size=20)
  _compare(q, k, v, do, mask_args=mask_args, return_lse=True, block_q=32, block_k=16, block_b=1,
           block_h=1)


@pytest.mark.parametrize("bias_shape", [(B, HQ, T, T), (B, 1, 1, T), (T, T)])
def test_bias_and_its_gradient(bias_shape):
  q, k, v, do = _inputs(B, T, T, HQ, HKV, D, seed=8)
  bias = _normal(9, bias_shape)
  mask_args = masking.make_mask_args(B, T, T, is_causal=True)
  _compare(q, k, v, do, mask_args=mask_args, bias=bias, block_q=16, block_k=16, block_b=1,
           block_h=1)


@pytest.mark.parametrize("mask,slab", [
    (dict(is_causal=True), "per_head"), (dict(), "whole"),
    (dict(is_causal=True, segment_ids=_segments(T)), "whole")])
def test_distance_bias_per_tile_and_its_gradient(mask, slab):
  """ALiBi/BAM-style -slope |i - j - c|^p, evaluated per tile with parameter gradients."""
  q, k, v, do = _inputs(B, T, T, HQ, HKV, D, seed=13)
  distance_bias = jnp.array([[0.25, 1.0, 0.0], [0.1, 1.5, 3.0], [0.5, 0.7, -2.0], [0.05, 2.0, 1.0]])
  blocks = dict(block_b=1, block_h=1) if slab == "per_head" else dict(block_b=B, block_h=HKV)
  mask_args = masking.make_mask_args(B, T, T, **mask) if mask else None
  (_, grads), _ = _compare(q, k, v, do, mask_args=mask_args, distance_bias=distance_bias,
                           block_q=16, block_k=16, **blocks)
  assert np.all(grads["distance_bias"] != 0)


def test_everything_at_once():
  q, k, v, do = _inputs(B, 100, 100, 8, 2, D, dv=12, seed=10)
  bias = _normal(11, (1, 8, 100, 100))  # shared by the batch: its gradient sums over it
  sinks = _normal(12, (8,))
  mask_args = masking.make_mask_args(
      B, 100, 100, is_causal=True, local_window_size=40, segment_ids=_segments(100),
      kv_lengths=jnp.array([90, 60]))
  _compare(q, k, v, do, mask_args=mask_args, bias=bias, sinks=sinks, logits_soft_cap=5.0,
           return_lse=True, block_q=32, block_k=16, block_b=1, block_h=1)


# ---------------------------------------------------------------------------
# Memory: O(T) in sequence length, forward and backward.


def test_compiled_memory_grows_linearly():
  def temp_bytes(t):
    q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)

    def loss(q, k, v):
      mask_args = masking.make_mask_args(1, t, t, is_causal=True)
      return xla.attention(q, k, v, mask_args=mask_args, block_q=256, block_k=256).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

  m1, m2, m4 = temp_bytes(1024), temp_bytes(2048), temp_bytes(4096)
  # Doubling T adds twice as much scratch each time when it is linear (a
  # constant per-tile part plus O(T) buffers: dQ, lse, slabs); quadratic would
  # add four times as much.
  assert 1.5 < (m4 - m2) / (m2 - m1) < 2.5, (m1, m2, m4)
  assert m4 / m2 < 2.0, (m2, m4)
  # And far below one [T, T] float32 score matrix.
  assert m4 < 4096 * 4096 * 4


# ---------------------------------------------------------------------------
# Defaults.


@pytest.mark.parametrize("length,block", [(1, 1), (37, 37), (512, 512), (513, 264), (600, 304),
                                          (1024, 512), (4096, 512)])
def test_default_block(length, block):
  assert xla.default_block(length) == block


def test_default_slab():
  assert xla.default_slab(8, 8, 1, 512, 512, "gpu") == (8, 8)
  assert xla.default_slab(8, 8, 1, 512, 512, "cpu") == (1, 2)  # 2 x 512 x 512 scores: 2 MiB
  assert xla.default_slab(64, 1, 1, 64, 64, "cpu") == (64, 1)
  assert xla.default_slab(1, 1, 32, 512, 512, "cpu") == (1, 1)  # over budget, never smaller


# ---------------------------------------------------------------------------
# The public dispatch.


def test_flash_attention_matches_reference_and_auto_picks_xla_on_cpu():
  q, k, v, _ = _inputs(B, T, T, HQ, HKV, D)
  kw = dict(is_causal=True, segment_ids=_segments(T), block_q=16, block_k=16)
  auto, xla_out, ref = _jit(lambda q, k, v: [
      flash_attention(q, k, v, implementation=impl, **kw) for impl in ("auto", "xla", "reference")],
      q, k, v)
  np.testing.assert_array_equal(auto, xla_out)
  assert _rel_err(auto, ref) < F32_TOL
  mask_args = masking.make_mask_args(B, T, T, is_causal=True)
  call = api.describe_call(q, k, v, mask_args=mask_args)
  assert call.platform == "cpu" and call.mask_kinds == {"causal"} and call.group_size == 2
  assert api.select_backend(call, "auto") is api.XLA


def test_flash_attention_returns_lse_and_differentiates():
  q, k, v, _ = _inputs(B, T, T, HQ, HKV, D)

  def f(q, k, v):
    out, lse = flash_attention(q, k, v, is_causal=True, return_lse=True)
    return out, lse, jax.grad(lambda q: flash_attention(q, k, v, is_causal=True).sum())(q)

  out, lse, dq = _jit(f, q, k, v)
  assert out.shape == q.shape and lse.shape == (B, HQ, T) and dq.shape == q.shape
  assert np.all(np.isfinite(dq))


def test_unknown_implementation_is_an_error_naming_the_choices():
  q, k, v, _ = _inputs(1, 8, 8, 2, 2, 8)
  with pytest.raises(ValueError, match=r"implementation.*'xla'.*'nope'"):
    flash_attention(q, k, v, implementation="nope")


@pytest.mark.parametrize("change,match", [
    (dict(q=jnp.zeros((1, 8, 2))), "q, k, v must be"),
    (dict(k=jnp.zeros((1, 8, 3, 8)), v=jnp.zeros((1, 8, 3, 8))), "multiple of kv heads"),
    (dict(v=jnp.zeros((1, 9, 2, 8))), "k and v"),
    (dict(k=jnp.zeros((1, 8, 2, 4))), "head_dim"),
    (dict(bias=jnp.zeros((1, 3, 8, 8))), "bias"),
    (dict(mask=jnp.ones((1, 3, 8, 8), bool)), "mask"),
    (dict(sinks=jnp.zeros((3,))), "sinks"),
    (dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), "segment_ids"),
    (dict(kv_lengths=jnp.zeros((2,), jnp.int32)), "kv_lengths"),
    (dict(local_window_size=-1), "local_window_size"),
    (dict(logits_soft_cap=0.0), "logits_soft_cap"),
    (dict(q=jnp.zeros((1, 8, 2, 8), jnp.int32)), "q must be a floating"),
])
def test_bad_arguments_are_named(change, match):
  args = dict(q=jnp.zeros((1, 8, 2, 8)), k=jnp.zeros((1, 8, 2, 8)), v=jnp.zeros((1, 8, 2, 8)))
  args.update(change)
  q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
  with pytest.raises(ValueError, match=match):
    flash_attention(q, k, v, **args)


def test_auto_skips_an_unsupported_backend_and_logs_once(monkeypatch, caplog):
  class OnlyCausal:
    name = "only_causal"

    def __init__(self):
      self.calls = 0

    def is_supported(self, call):
      return ("causal" in call.mask_kinds), "needs a causal mask"

    def __call__(self, q, k, v, **kw):
      self.calls += 1
      return jnp.zeros(q.shape[:3] + v.shape[3:], q.dtype)

  backend = OnlyCausal()
  monkeypatch.setitem(api.BACKENDS, "cpu", list(api.BACKENDS["cpu"]))
  monkeypatch.setattr(api.DISPATCH, "_logged", set())
  api.register_backend(backend, ["cpu"])
  assert [b.name for b in api.BACKENDS["cpu"]] == ["only_causal", "xla"]
  q, k, v, _ = _inputs(1, 8, 8, 2, 2, 8)
  bidirectional = api.describe_call(q, k, v, mask_args=masking.make_mask_args(1, 8, 8))
  with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
    for _ in range(3):
      assert api.select_backend(bidirectional) is api.XLA
  skips = [r for r in caplog.records if "only_causal" in r.getMessage()]
  assert len(skips) == 1 and "needs a causal mask" in skips[0].getMessage()
  flash_attention(q, k, v, is_causal=True)
  assert backend.calls == 1
  with pytest.raises(ValueError, match="needs a causal mask"):
    flash_attention(q, k, v, implementation="only_causal")
