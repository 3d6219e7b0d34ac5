"""Block-sparse attention: random block lists against the dense kernel under the matching mask.

For seeded random lists (with duplicates, entries past the count and empty
lists), every backend's output and gradients equal the reference, which is
dense attention under `block_mask[b, h, i // bq, j // bk] AND token mask`;
a full list equals plain dense attention. Tolerances as in `parity.compare`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_sparse_attention, flash_attention, lists_from_block_mask
from pallas_kernels.block_sparse import reference
from pallas_kernels.block_sparse import xla as gather
from pallas_kernels.flash import masking
from pallas_kernels.flash import schedule
from tests.numerics import rel_err
from tests.pallas_kernels.flash.parity import (BF16_TOL, F32_TOL, compare, inputs, jit, normal,
                                               packed_segments)

B, T, HQ, HKV, D = 2, 40, 4, 2, 8
BLOCK = (8, 16)
NQ, NK = 5, 3


def _random_lists(seed, heads=HQ, n=3, low=0, high=NK):
  rng = np.random.default_rng(seed)
  indices = rng.integers(low, high, (B, heads, NQ, n)).astype(np.int32)
  counts = rng.integers(0, n + 1, (B, heads, NQ)).astype(np.int32)
  return jnp.asarray(indices), jnp.asarray(counts)


def _loss_and_grads(fn, q, k, v, do):
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v) * do)
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("implementation", ["xla", "pallas_interpret", "pallas_tpu_interpret"])
@pytest.mark.parametrize("seed,mask,heads", [
    (0, dict(), HQ),
    (1, dict(is_causal=True), HQ),
    (2, dict(is_causal=True, local_window_size=12), 1),  # one list shared by all heads
    (3, dict(kv_lengths=jnp.array([40, 21])), HQ),
])
def test_random_lists_equal_the_dense_mask(implementation, seed, mask, heads):
  q, k, v, do = inputs(B, T, T, HQ, HKV, D, seed=seed)
  indices, counts = _random_lists(seed, heads)
  mask_args = masking.make_mask_args(B, T, T, **mask)

  def fast(q, k, v):
    return block_sparse_attention(q, k, v, indices, counts, block_shape=BLOCK,
                                  implementation=implementation, **mask)

  def ref(q, k, v):
    return reference.attention(q, k, v, indices, counts, block_shape=BLOCK, mask_args=mask_args)

  (out, grads), (ref_out, ref_grads) = jit(
      lambda q, k, v: (_loss_and_grads(fast, q, k, v, do), _loss_and_grads(ref, q, k, v, do)),
      q, k, v)
  assert abs(float(out) - float(ref_out)) <= F32_TOL * max(abs(float(ref_out)), 1.0)
  for g, rg in zip(grads, ref_grads):
    assert np.all(np.isfinite(g)) and rel_err(g, rg) < F32_TOL
  got = jit(fast, q, k, v)
  want = jit(ref, q, k, v)
  assert rel_err(got, want) < F32_TOL
  # Query blocks with an empty list output zeros.
  for b, h, i in zip(*np.nonzero(np.asarray(counts) == 0)):
    heads_of_list = range(HQ) if heads == 1 else [h]
    for hh in heads_of_list:
      np.testing.assert_array_equal(got[b, i * BLOCK[0]:(i + 1) * BLOCK[0], hh], 0.0)


@pytest.mark.parametrize("implementation", ["pallas_interpret", "pallas_tpu_interpret"])
def test_full_lists_equal_dense_attention(implementation):
  q, k, v, _ = inputs(B, T, T, HQ, HKV, D, seed=9)
  indices, counts = lists_from_block_mask(jnp.ones((B, 1, NQ, NK), bool))
  got, dense = jit(lambda q, k, v: (
      block_sparse_attention(q, k, v, indices, counts, block_shape=BLOCK, is_causal=True,
                             implementation=implementation),
      flash_attention(q, k, v, is_causal=True, implementation="reference")), q, k, v)
  assert rel_err(got, dense) < F32_TOL


# Lists narrower than the key blocks (n = 2 < NK = 3) take the XLA gather
# path; entries include repeats and out-of-range indices (-1, NK).
@pytest.mark.parametrize("seed,mask,heads,extras,dtype", [
    (10, dict(), HQ, dict(sinks=True, soft_cap=True), jnp.float32),
    (11, dict(is_causal=True), 1, dict(distance_bias=True, lse=True), jnp.float32),
    (12, dict(is_causal=True, local_window_size=(12, 4)), HQ, dict(lse=True, sinks=True),
     jnp.float32),
    (13, dict(is_causal=True, prefix_lengths=jnp.array([9, 20])), HQ, dict(distance_bias=True),
     jnp.float32),
    (14, dict(segment_ids="packed", kv_lengths=jnp.array([40, 33])), 1, dict(soft_cap=True),
     jnp.float32),
    (15, dict(is_causal=True), HQ, dict(sinks=True, lse=True), jnp.bfloat16),
])
def test_gather_path_equals_the_dense_mask(seed, mask, heads, extras, dtype, monkeypatch):
  if mask.get("segment_ids") == "packed":
    mask = dict(mask, segment_ids=packed_segments(T))
  q, k, v, do = inputs(B, T, T, HQ, HKV, D, dtype=dtype, seed=seed)
  indices, counts = _random_lists(seed, heads, n=2, low=-1, high=NK + 1)
  block_mask = schedule.block_mask_from_lists(indices, counts, NK)
  mask_args = dataclasses.replace(masking.make_mask_args(B, T, T, **mask), block_mask=block_mask,
                                  block_shape=BLOCK)
  sinks = normal(seed, (HQ,)) if extras.get("sinks") else None
  distance_bias = (jnp.abs(normal(seed, (HQ, 3))) + jnp.array([0.0, 0.5, 0.0])
                   if extras.get("distance_bias") else None)
  soft_cap = 4.0 if extras.get("soft_cap") else None

  def fast(q, k, v, *, mask_args, bias, sinks, distance_bias, logits_soft_cap, return_lse):
    del mask_args, bias
    return block_sparse_attention(
        q, k, v, indices, counts, block_shape=BLOCK, sinks=sinks, distance_bias=distance_bias,
        logits_soft_cap=logits_soft_cap, return_lse=return_lse, implementation="xla", **mask)

  original, seen = gather.attention, []
  monkeypatch.setattr(gather, "attention", lambda *a, **kw: seen.append(1) or original(*a, **kw))
  compare(fast, q, k, v, do, mask_args=mask_args, sinks=sinks, distance_bias=distance_bias,
          logits_soft_cap=soft_cap, return_lse=extras.get("lse", False),
          tol=BF16_TOL if dtype == jnp.bfloat16 else F32_TOL)
  assert seen, "the XLA backend with n < nk must take the gather path"


@pytest.mark.parametrize("blocks_per_chunk", [1, 2, NQ])  # 2: NQ = 5 leaves a remainder
def test_gather_path_chunks_agree(blocks_per_chunk):
  q, k, v, do = inputs(B, T, T, HQ, HKV, D, seed=21)
  indices, counts = _random_lists(21, HQ, n=2)
  mask_args = masking.make_mask_args(B, T, T, is_causal=True)
  per_block = B * HQ * BLOCK[0] * 2 * BLOCK[1]

  def run(budget):
    def loss(q, k, v):
      out = gather.attention(q, k, v, indices, counts, block_shape=BLOCK, mask_args=mask_args,
                             score_budget=budget)
      return jnp.sum(out * do)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  (got, got_grads), (want, want_grads) = run(blocks_per_chunk * per_block), run(None)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_gather_path_cost_follows_the_list_width():
  """Compiled FLOPs (forward + backward) grow with the list width n: n / nk of dense attention."""
  t, blk = 512, (32, 32)
  q, k, v, do = inputs(1, t, t, HQ, HKV, D, seed=20)
  nk = t // blk[1]

  def flops(n):
    idx = jnp.zeros((1, HQ, t // blk[0], n), jnp.int32)
    cnt = jnp.full((1, HQ, t // blk[0]), n, jnp.int32)
    def loss(q, k, v):
      out = block_sparse_attention(q, k, v, idx, cnt, block_shape=blk, implementation="xla")
      return jnp.sum(out * do)
    cost = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]

  # Dense attention forward + backward: 7 matmuls of 2 * T * T * D FLOPs per head
  # (QK^T and PV; then S, dP, dV, dQ, dK recomputed or computed).
  dense = 7 * 2 * HQ * t * t * D
  f1, f2, f4 = flops(1), flops(2), flops(4)
  assert 1.6 < f2 / f1 < 2.4 and 1.6 < f4 / f2 < 2.4, (f1, f2, f4)
  assert f4 < 1.5 * (4 / nk) * dense, (f4, dense, nk)


def test_lists_from_block_mask_round_trip():
  block_mask = jnp.asarray(np.random.default_rng(4).random((B, HQ, NQ, NK)) < 0.5)
  indices, counts = lists_from_block_mask(block_mask)
  assert indices.shape == (B, HQ, NQ, NK) and counts.shape == (B, HQ, NQ)
  for b, h, i in np.ndindex(B, HQ, NQ):
    assert set(np.asarray(indices[b, h, i, :counts[b, h, i]])) == set(
        np.flatnonzero(block_mask[b, h, i]))


@pytest.mark.parametrize("change,match", [
    (dict(block_shape=(8,)), "block_shape"),
    (dict(indices=jnp.zeros((B, HQ, 4, 3), jnp.int32)), "block_indices"),
    (dict(counts=jnp.zeros((B, HQ, 4), jnp.int32)), "block_counts"),
    (dict(indices=jnp.zeros((B, HQ, NQ, 3), jnp.float32)), "integer"),
    (dict(indices=jnp.zeros((B, 3, NQ, 3), jnp.int32), counts=jnp.zeros((B, 3, NQ), jnp.int32)),
     "block_mask"),
])
def test_bad_arguments_are_named(change, match):
  q, k, v, _ = inputs(B, T, T, HQ, HKV, D)
  indices, counts = _random_lists(0)
  args = dict(indices=indices, counts=counts, block_shape=BLOCK)
  args.update(change)
  with pytest.raises(ValueError, match=match):
    block_sparse_attention(q, k, v, args["indices"], args["counts"], block_shape=args["block_shape"])


def test_per_head_lists_lower_on_mosaic_gpu():
  """Per-head block lists through the Mosaic GPU kernels (each head's own list in the forward and
  dQ kernels, each query head's transposed list in dK/dV), forward and backward, lowered for
  CUDA: the compiled run is the GPU-marked test in tests/pallas_kernels/flash."""
  from pallas_kernels.flash import pallas
  b, t, hq, hkv, d = 1, 384, 4, 2, 128
  rng = np.random.default_rng(0)
  block_mask = jnp.asarray(rng.random((b, hq, t // 128, t // 128)) < 0.5)
  mask_args = masking.MaskArgs(block_mask=block_mask, block_shape=(128, 128))
  shapes = [(b, t, hq, d), (b, t, hkv, d), (b, t, hkv, d)]

  def grads(q, k, v):
    def loss(q, k, v):
      out = pallas.attention(q, k, v, mask_args=mask_args, block_q=128, block_k=128,
                             kernel="mosaic_gpu", interpret=False, head_dim_multiple=64)
      return jnp.sum(out.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
  text = jax.jit(grads).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 3  # forward, dQ, dK/dV
