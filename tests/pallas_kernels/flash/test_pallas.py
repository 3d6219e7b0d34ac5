"""The Pallas flash kernels against the dense reference, their schedules, and the dispatch.

Both kernel styles run here in interpret mode (the same kernel bodies the
hardware compiles): "triton" (the GPU program that loops over its key blocks)
and "tpu" (the grid walks scalar-prefetched block lists). Every case checks
outputs and gradients with `parity.compare`. Tiles of 8/16 rows cut the odd
lengths into several blocks with ragged tails, so the block schedule, the
padding and the tile skipping are all exercised. GPU-marked tests compile
the Triton and cuDNN backends for real and are skipped without a GPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention
from pallas_kernels import mosaic_gpu
from pallas_kernels.flash import api, masking, pallas, reference, schedule
from pallas_kernels.triton_backend import triton_backend
from tests.numerics import rel_err
from tests.pallas_kernels.flash.parity import packed_segments, BF16_TOL, compare, inputs, jit

KERNELS = ("triton", "tpu")
B, T, HQ, HKV, D = 2, 37, 4, 2, 8


_segments = packed_segments  # B = 2 rows


def _fast(kernel, block_q=8, block_k=16, on_gpu=False, bwd_blocks=None):
  def fast(q, k, v, *, mask_args, bias, **kw):
    assert bias is None
    if mask_args is None:
      mask_args = masking.MaskArgs()
    return pallas.attention(q, k, v, mask_args=mask_args, block_q=block_q, block_k=block_k,
                            kernel=kernel, interpret=not on_gpu, bwd_blocks=bwd_blocks, **kw)
  return fast


MASKS = {
    "none": dict(),
    "causal": dict(is_causal=True),
    "padding_empty_batch_row": dict(is_causal=True, kv_lengths=jnp.array([25, 0])),
    "segments_causal": dict(is_causal=True, segment_ids=_segments(T)),
    "segments_bidirectional": dict(segment_ids=_segments(T)),
    "prefix_lm": dict(is_causal=True, prefix_lengths=jnp.array([10, 0])),
    "window_left_right": dict(local_window_size=(4, 6)),
    "window_right_unbounded_left": dict(local_window_size=(None, 3)),
    "chunked": dict(is_causal=True, chunk_size=8),
    "combined": dict(is_causal=True, local_window_size=9, segment_ids=_segments(T),
                     kv_lengths=jnp.array([33, 17])),
    "custom_positions": dict(is_causal=True,
                             q_positions=jnp.tile(jnp.arange(T)[::-1], (B, 1)),
                             kv_positions=jnp.tile(jnp.arange(T)[::-1], (B, 1))),
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", sorted(MASKS))
def test_mask_kinds(kernel, kind):
  q, k, v, do = inputs(B, T, T, HQ, HKV, D)
  mask_args = masking.make_mask_args(B, T, T, num_heads=HQ, **MASKS[kind])
  compare(_fast(kernel), q, k, v, do, mask_args=mask_args)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["combined", "window_left_right", "padding_empty_batch_row"])
def test_backward_tiles_differ_from_forward(kernel, kind):
  """The backward on its own block schedule (the GPU default): T pads to both tilings."""
  q, k, v, do = inputs(B, T, T, HQ, HKV, D, seed=3)
  mask_args = masking.make_mask_args(B, T, T, num_heads=HQ, **MASKS[kind])
  compare(_fast(kernel, block_q=16, block_k=8, bwd_blocks=(8, 32)), q, k, v, do,
          mask_args=mask_args, sinks=jnp.array([0.5, -1.0, 2.0, 0.0]), return_lse=True)


def test_backward_tiles_must_match_a_block_mask():
  q, k, v, _ = inputs(1, 32, 32, 2, 2, D)
  mask_args = masking.MaskArgs(block_mask=jnp.ones((1, 1, 2, 4), bool), block_shape=(16, 8))
  with pytest.raises(ValueError, match="bwd_blocks"):
    pallas.attention(q, k, v, mask_args=mask_args, block_q=16, block_k=8, kernel="triton",
                     interpret=True, bwd_blocks=(8, 8))


@pytest.mark.parametrize("kernel", KERNELS)
def test_modifications_and_empty_rows(kernel):
  """Soft cap, sinks, distance bias (their gradients too) and lse, with rows that see nothing."""
  q, k, v, do = inputs(B, T, T, HQ, HKV, D, seed=1)
  sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
  # (slope, power, center): ALiBi-like, a BAM prior off-centre, a sub-linear and a super-linear one.
  distance_bias = jnp.array([[0.25, 1.0, 0.0], [0.1, 1.5, 3.0], [0.5, 0.7, -2.0], [0.05, 2.0, 1.0]])
  mask_args = masking.make_mask_args(B, T, T, is_causal=True, kv_lengths=jnp.array([T, 0]))
  (out, grads), _ = compare(_fast(kernel), 4 * q, k, v, do, mask_args=mask_args, sinks=sinks,
                            distance_bias=distance_bias, logits_soft_cap=3.0, return_lse=True)
  np.testing.assert_array_equal(out[1], 0.0)  # all weight on the sink, which has no value
  np.testing.assert_array_equal(grads["k"][1], 0.0)
  assert np.all(grads["sinks"] != 0) and np.all(grads["distance_bias"] != 0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fully_masked_rows_without_sinks(kernel):
  q, k, v, do = inputs(B, T, T, HQ, HKV, D, seed=2)
  # Batch row 1 sees no key; in row 0 the first 10 queries sit before every key (causal).
  mask_args = masking.make_mask_args(B, T, T, is_causal=True,
                                     q_positions=jnp.tile(jnp.arange(T) - 10, (B, 1)),
                                     kv_positions=jnp.tile(jnp.arange(T), (B, 1)),
                                     kv_lengths=jnp.array([T, 0]))
  (out, grads), _ = compare(_fast(kernel), q, k, v, do, mask_args=mask_args, return_lse=True)
  np.testing.assert_array_equal(out[1], 0.0)
  np.testing.assert_array_equal(out[0, :10], 0.0)
  np.testing.assert_array_equal(grads["q"][0, :10], 0.0)
  np.testing.assert_array_equal(grads["k"][1], 0.0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("tq,tk,block_q,block_k", [
    (33, 47, 8, 16),  # bottom-right causal: queries are the last 33 keys
    (47, 33, 16, 8),  # more queries than keys: the first rows see nothing
    (1, 40, 8, 8),  # one decode step
    (24, 24, 8, 8),  # lengths that are whole blocks
])
def test_lengths_and_blocks(kernel, tq, tk, block_q, block_k):
  q, k, v, do = inputs(B, tq, tk, HQ, HKV, D, seed=3)
  mask_args = masking.make_mask_args(B, tq, tk, is_causal=True)
  compare(_fast(kernel, block_q, block_k), q, k, v, do, mask_args=mask_args, return_lse=True)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("head_dim", [64, 128, 192, 256])
def test_head_dims(kernel, head_dim):
  q, k, v, do = inputs(1, 20, 20, 2, 1, head_dim, seed=4)
  mask_args = masking.make_mask_args(1, 20, 20, is_causal=True)
  compare(_fast(kernel, 8, 8), q, k, v, do, mask_args=mask_args)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 2), (4, 1)])
def test_gqa_ratios(kernel, hq, hkv):
  q, k, v, do = inputs(B, T, T, hq, hkv, D, dv=12, seed=5)
  mask_args = masking.make_mask_args(B, T, T, is_causal=True, segment_ids=_segments(T))
  compare(_fast(kernel), q, k, v, do, mask_args=mask_args)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bfloat16(kernel):
  q, k, v, do = inputs(B, T, T, HQ, HKV, D, dtype=jnp.bfloat16, seed=6)
  mask_args = masking.make_mask_args(B, T, T, is_causal=True, segment_ids=_segments(T))
  compare(_fast(kernel), q, k, v, do, mask_args=mask_args, tol=BF16_TOL)


# ---------------------------------------------------------------------------
# Block schedules.


def test_schedule_lists_and_transpose():
  block_mask = jnp.asarray(np.random.default_rng(0).random((2, 3, 5, 4)) < 0.4)
  s = schedule.from_block_mask(block_mask)
  for b, h, i in np.ndindex(2, 3, 5):
    want = np.flatnonzero(block_mask[b, h, i])
    n = int(s.counts[b, h, i])
    assert list(np.asarray(s.indices[b, h, i, :n])) == list(want)
    # Past the count, the last listed block repeats (no new DMA on TPU).
    assert np.all(np.asarray(s.indices[b, h, i, n:]) == (want[-1] if n else 0))
  for b, h, j in np.ndindex(2, 3, 4):
    want = np.flatnonzero(block_mask[b, h, :, j])
    assert list(np.asarray(s.t_indices[b, h, j, :int(s.t_counts[b, h, j])])) == list(want)


@pytest.mark.parametrize("kind", sorted(MASKS))
def test_block_mask_keeps_every_visible_tile(kind):
  """Conservative: a tile with a visible pair is never skipped."""
  bq, bk = 8, 16
  m = masking.make_mask_args(B, T, T, **MASKS[kind])
  kept = np.asarray(schedule.block_mask_from_mask(m, T, T, bq, bk, B))[:, 0]
  vis = np.asarray(masking.visible(m, jnp.arange(T), jnp.arange(T)) if not m.is_trivial
                   else jnp.ones((B, 1, T, T), bool))
  vis = np.broadcast_to(vis, (B, 1, T, T))[:, 0]
  pad = np.zeros((B, 5 * bq, 3 * bk), bool)
  pad[:, :T, :T] = vis
  needed = pad.reshape(B, 5, bq, 3, bk).any(axis=(2, 4))
  assert np.all(kept[needed])


def test_causal_schedule_skips_the_upper_triangle():
  m = masking.make_mask_args(1, 64, 64, is_causal=True)
  s = schedule.from_block_mask(schedule.block_mask_from_mask(m, 64, 64, 16, 16, 1))
  np.testing.assert_array_equal(s.counts[0, 0], [1, 2, 3, 4])
  m = masking.make_mask_args(1, 64, 64, is_causal=True, local_window_size=16)
  s = schedule.from_block_mask(schedule.block_mask_from_mask(m, 64, 64, 16, 16, 1))
  np.testing.assert_array_equal(s.counts[0, 0], [1, 2, 2, 2])


# ---------------------------------------------------------------------------
# Dispatch.


def _call(**kw):
  q, k, v, _ = inputs(1, 16, 16, 2, 1, 8)
  mask_args = masking.make_mask_args(1, 16, 16, **kw.pop("mask", {}))
  return api.describe_call(q, k, v, mask_args=mask_args, **kw)


@pytest.mark.parametrize("head_dim,fwd,bwd", [(128, (128, 64), (64, 64)), (64, (128, 64), (64, 64)),
                                              (256, (64, 64), None)])
def test_triton_default_tiles_per_pass(head_dim, fwd, bwd):
  """Compiled Triton's own tiles (measured on an H100) differ per pass up to D = 128."""
  shape = jax.ShapeDtypeStruct((1, 4096, 2, head_dim), jnp.bfloat16)
  call = api.describe_call(shape, shape, shape, mask_args=masking.make_mask_args(1, 4096, 4096))
  assert pallas.PALLAS_TRITON.blocks(call) == fwd
  assert pallas.PALLAS_TRITON.bwd_blocks(call) == bwd
  assert pallas.PALLAS_INTERPRET.bwd_blocks(call) is None
  assert pallas.PALLAS_TRITON.bwd_blocks(dataclasses.replace(call, block_q=32)) is None


def test_auto_on_cpu_is_xla_and_pallas_means_interpret():
  assert api.select_backend(_call(), "auto") is api.XLA
  assert api.select_backend(_call(), "pallas") is pallas.PALLAS_INTERPRET
  q, k, v, _ = inputs(B, T, T, HQ, HKV, D)
  outs = jit(lambda q, k, v: [
      flash_attention(q, k, v, is_causal=True, implementation=impl, block_q=8, block_k=8)
      for impl in ("pallas", "pallas_tpu_interpret", "xla")], q, k, v)
  assert rel_err(outs[0], outs[2]) < 1e-5 and rel_err(outs[1], outs[2]) < 1e-5


def test_query_scale_is_per_query_temperature():
  q, k, v, _ = inputs(B, T, T, HQ, HKV, D)
  tau = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, (B, T, HQ)), jnp.float32)
  got = flash_attention(q, k, v, is_causal=True, query_scale=tau, implementation="pallas",
                        block_q=8, block_k=8)
  want = reference.attention(q * tau[..., None], k, v,
                             mask_args=masking.make_mask_args(B, T, T, is_causal=True))
  assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("kw,reason", [
    (dict(mask=dict(mask=jnp.ones((1, 1, 16, 16), bool))), "dense boolean mask"),
    (dict(bias=jnp.zeros((16, 16))), "dense additive bias"),
])
def test_pallas_refuses_what_it_cannot_do_and_auto_moves_on(kw, reason):
  call = _call(**kw)
  for backend in (pallas.PALLAS_INTERPRET, pallas.PALLAS_TPU_INTERPRET, pallas.PALLAS_TRITON,
                  pallas.PALLAS_TPU):
    ok, why = backend.is_supported(call)
    assert not ok and reason in why
  with pytest.raises(ValueError, match=reason):
    api.select_backend(call, "pallas")
  assert api.select_backend(call, "auto") is api.XLA


def test_hardware_tiling_rules():
  gpu = dataclasses.replace(_call(), platform="gpu", num_q_heads=6, num_kv_heads=2)
  ok, why = pallas.PALLAS_TRITON.is_supported(gpu)
  assert not ok and "power of two" in why
  tpu = dataclasses.replace(_call(block_q=8, block_k=64), platform="tpu")
  ok, why = pallas.PALLAS_TPU.is_supported(tpu)
  assert not ok and "block_k % 128" in why
  assert pallas.PALLAS_TPU.blocks(dataclasses.replace(_call(), q_len=300, kv_len=300)) == (128, 128)
  assert pallas.PALLAS_TRITON.blocks(dataclasses.replace(_call(), q_len=20, kv_len=20)) == (32, 32)


def test_other_platforms_are_errors():
  q, k, v, _ = inputs(1, 8, 8, 2, 2, 8)
  with pytest.raises(ValueError, match="registered for platform 'tpu'"):
    flash_attention(q, k, v, implementation="pallas_tpu")
  with pytest.raises(ValueError, match="registered for platform 'gpu'"):
    flash_attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match="registered for platform 'gpu'"):
    flash_attention(q, k, v, implementation="pallas_mosaic_gpu")
  hopper = dataclasses.replace(_call(), platform="gpu", q_dtype=jnp.dtype("float32"),
                               kv_dtype=jnp.dtype("float32"))
  ok, why = pallas.PALLAS_MOSAIC_GPU.is_supported(hopper)
  assert not ok and "wgmma takes bfloat16" in why
  bf16 = dict(q_dtype=jnp.dtype("bfloat16"), kv_dtype=jnp.dtype("bfloat16"))
  ok, why = pallas.PALLAS_MOSAIC_GPU.is_supported(dataclasses.replace(hopper, block_k=64, **bf16))
  assert not ok and "block_k=64 is not 128" in why
  ok, why = pallas.PALLAS_MOSAIC_GPU.is_supported(dataclasses.replace(hopper, head_dim=192,
                                                                      v_head_dim=192, **bf16))
  assert not ok and "head dims above 128" in why
  ok, why = api.DISPATCH._find("cudnn", "gpu").is_supported(
      dataclasses.replace(_call(logits_soft_cap=2.0), platform="gpu", q_dtype=jnp.dtype("bfloat16"),
                          kv_dtype=jnp.dtype("bfloat16")))
  assert not ok and "soft cap" in why


# ---------------------------------------------------------------------------
# The hardware backends, lowered without the hardware: the Triton lowering (to
# TTIR), the Mosaic GPU lowering (layouts, wgmma shapes, barriers) and the Mosaic
# TPU lowering accept every kernel, forward and backward, with every
# modification at once, at the tile sizes the backends choose.


def _chip_info_for_tpu_lowering(monkeypatch):
  try:
    from jax._src.pallas.mosaic import tpu_info
    info = tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
  except (ImportError, AttributeError) as e:
    pytest.skip(f"this JAX's Mosaic has no chip info to lower against: {e}")
  monkeypatch.setattr(tpu_info, "get_tpu_info", lambda: info)


@pytest.mark.parametrize("backend,platform,head_dim,dtype", [
    (pallas.PALLAS_TRITON, "cuda", 64, jnp.bfloat16),
    (pallas.PALLAS_TRITON, "cuda", 192, jnp.float32),  # padded to 256
    (pallas.PALLAS_TPU, "tpu", 128, jnp.bfloat16),
    (pallas.PALLAS_TPU, "tpu", 64, jnp.float32),  # padded to 128
    (pallas.PALLAS_MOSAIC_GPU, "mosaic_gpu", 128, jnp.bfloat16),
    (pallas.PALLAS_MOSAIC_GPU, "mosaic_gpu", 80, jnp.float16),  # padded to 128
])
def test_hardware_backends_lower(monkeypatch, backend, platform, head_dim, dtype):
  if backend is pallas.PALLAS_TRITON and triton_backend()[0] is None:
    pytest.skip(triton_backend()[1])
  if platform == "tpu":
    _chip_info_for_tpu_lowering(monkeypatch)
  if platform == "mosaic_gpu":  # is_supported's device check: the lowering needs no device
    monkeypatch.setattr(mosaic_gpu, "hopper", lambda: (True, ""))
    platform = "cuda"
  kernel_call = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}[platform]
  if backend is pallas.PALLAS_MOSAIC_GPU:
    kernel_call = "mosaic_gpu"
  b, t, hq, hkv = 2, 300, 4, 2
  shapes = dict(q=(b, t, hq, head_dim), k=(b, t, hkv, head_dim), v=(b, t, hkv, head_dim))
  args = [jax.ShapeDtypeStruct(shapes[n], dtype) for n in ("q", "k", "v")] + [
      jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((hq,), jnp.float32),
      jax.ShapeDtypeStruct((hq, 3), jnp.float32)]

  def grads(q, k, v, seg, sinks, distance_bias):
    mask_args = masking.make_mask_args(b, t, t, is_causal=True, local_window_size=100,
                                       segment_ids=seg, prefix_lengths=jnp.array([3, 5]),
                                       kv_lengths=jnp.array([t, 250]))
    kw = dict(logits_soft_cap=30.0, sinks=sinks, distance_bias=distance_bias, return_lse=True)
    call = dataclasses.replace(api.describe_call(q, k, v, mask_args=mask_args, **kw),
                               platform="gpu" if platform == "cuda" else platform)
    ok, why = backend.is_supported(call)
    assert ok, why

    def loss(q, k, v, sinks, distance_bias):
      out, lse = backend(q, k, v, call=call, mask_args=mask_args, bias=None, scale=None,
                         block_q=None, block_k=None,
                         **dict(kw, sinks=sinks, distance_bias=distance_bias))
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, sinks, distance_bias)

  text = jax.jit(grads).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  kernels = text.count(f"stablehlo.custom_call @{kernel_call}")
  assert kernels == 3, kernels  # forward, dQ, dK/dV


# ---------------------------------------------------------------------------
# On a GPU: the compiled backends.

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("kind", ["causal", "segments_causal", "combined", "window_left_right"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_triton_compiled(kind, dtype):
  q, k, v, do = inputs(B, T, T, HQ, HKV, 64, dtype=dtype)
  mask_args = masking.make_mask_args(B, T, T, num_heads=HQ, **MASKS[kind])
  # Triton's float32 dots may run as TF32 (10-bit mantissa) on the GPU.
  compare(_fast("triton", 16, 16, on_gpu=True), q, k, v, do, mask_args=mask_args,
          tol=BF16_TOL if dtype == jnp.bfloat16 else 5e-3)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("head_dim", [64, 128, 192, 256])
def test_triton_default_tiles_compiled(head_dim):
  """The backend's own tiles and launch settings (tuned at D <= 128), odd length, GQA, grads."""
  t = 1000
  q, k, v, do = inputs(1, t, t, 4, 2, head_dim, dtype=jnp.bfloat16)
  mask_args = masking.make_mask_args(1, t, t, is_causal=True)

  def fast(q, k, v, *, mask_args, bias, **kw):
    del mask_args, bias
    return flash_attention(q, k, v, is_causal=True, implementation="pallas_triton", **kw)

  compare(fast, q, k, v, do, mask_args=mask_args, tol=BF16_TOL)


@pytest.mark.gpu
@on_gpu
def test_auto_on_gpu_runs_triton_and_cudnn_when_named():
  q, k, v, _ = inputs(2, 256, 256, 8, 2, 128, dtype=jnp.bfloat16)
  want = reference.attention(q, k, v, mask_args=masking.make_mask_args(2, 256, 256, is_causal=True))
  for impl in ("auto", "pallas_triton", "cudnn"):
    got = flash_attention(q, k, v, is_causal=True, implementation=impl)
    assert rel_err(got, want) < BF16_TOL, impl


def _needs_hopper():
  ok, why = mosaic_gpu.hopper()
  if not ok:
    pytest.skip(why)


_MOSAIC_T = 300  # three 128-row tiles, the last one ragged
_MOSAIC_MASKS = {
    "none": dict(),
    "causal": dict(is_causal=True),
    "window_left_right": dict(local_window_size=(100, 20)),
    "padding_prefix": dict(is_causal=True, kv_lengths=jnp.array([_MOSAIC_T, 0]),
                           prefix_lengths=jnp.array([3, 0])),
    "segments_causal": dict(is_causal=True, segment_ids=packed_segments(_MOSAIC_T)),
}


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("kind", sorted(_MOSAIC_MASKS))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mosaic_gpu_compiled(kind, head_dim):
  """The Mosaic GPU kernels with their own tiles: odd length, GQA 2, every mask kind, grads."""
  _needs_hopper()
  mask = _MOSAIC_MASKS[kind]
  q, k, v, do = inputs(2, _MOSAIC_T, _MOSAIC_T, 4, 2, head_dim, dtype=jnp.bfloat16)
  mask_args = masking.make_mask_args(2, _MOSAIC_T, _MOSAIC_T, **mask)

  def fast(q, k, v, *, mask_args, bias, **kw):
    del mask_args, bias
    return flash_attention(q, k, v, implementation="pallas_mosaic_gpu", **mask, **kw)

  compare(fast, q, k, v, do, mask_args=mask_args, tol=BF16_TOL)


@pytest.mark.gpu
@on_gpu
def test_mosaic_gpu_compiled_score_modifications():
  """Soft cap, sinks, a distance bias and lse at once (their gradients included), GQA 4."""
  _needs_hopper()
  t = 200
  q, k, v, do = inputs(1, t, t, 8, 2, 128, dtype=jnp.bfloat16, seed=5)
  mask_args = masking.make_mask_args(1, t, t, is_causal=True)

  def fast(q, k, v, *, mask_args, bias, **kw):
    del mask_args, bias
    return flash_attention(q, k, v, is_causal=True, implementation="pallas_mosaic_gpu", **kw)

  compare(fast, q, k, v, do, mask_args=mask_args, logits_soft_cap=20.0,
          sinks=jnp.linspace(-1.0, 1.0, 8),
          distance_bias=jnp.tile(jnp.array([[0.05, 1.0, 0.0]]), (8, 1)), return_lse=True,
          tol=BF16_TOL)


@pytest.mark.gpu
@on_gpu
def test_mosaic_gpu_block_sparse_compiled():
  """Random lists of 128 x 128 blocks (short, repeated, empty) against dense attention under them."""
  _needs_hopper()
  from pallas_kernels import block_sparse_attention
  from pallas_kernels.block_sparse import reference as sparse_reference
  t, block, n = 640, (128, 128), 3
  q, k, v, do = inputs(1, t, t, 4, 4, 128, dtype=jnp.bfloat16, seed=7)
  rng = np.random.default_rng(7)
  indices = jnp.asarray(rng.integers(0, t // 128, (1, 4, t // 128, n)), jnp.int32)
  counts = jnp.asarray(rng.integers(0, n + 1, (1, 4, t // 128)), jnp.int32)

  def run(fn):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)

  got = run(lambda q, k, v: block_sparse_attention(q, k, v, indices, counts, block_shape=block,
                                                   implementation="pallas_mosaic_gpu"))
  want = run(lambda q, k, v: sparse_reference.attention(
      q, k, v, indices, counts, block_shape=block, mask_args=masking.MaskArgs()))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(g, w) < BF16_TOL
