"""Block-sparse attention: random block lists against the dense kernel under the matching mask.

For seeded random lists (with duplicates, entries past the count and empty
lists), every backend's output and gradients equal the reference, which is
dense attention under `block_mask[b, h, i // bq, j // bk] AND token mask`;
a full list equals plain dense attention. Tolerances as in `parity.compare`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_sparse_attention, flash_attention, lists_from_block_mask
from pallas_kernels.block_sparse import reference
from pallas_kernels.flash import masking
from tests.numerics import rel_err
from tests.pallas_kernels.flash.parity import F32_TOL, inputs, jit

B, T, HQ, HKV, D = 2, 40, 4, 2, 8
BLOCK = (8, 16)
NQ, NK = 5, 3


def _random_lists(seed, heads=HQ, n=3):
  rng = np.random.default_rng(seed)
  indices = rng.integers(0, NK, (B, heads, NQ, n)).astype(np.int32)
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
