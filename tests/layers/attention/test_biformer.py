"""Bi-Level Routing Attention: gather and block-sparse paths against the dense reference
(outputs and gradients), full routing = dense attention + LCE, locality of the routed regions,
routing against numpy, region layout, and errors that name the setting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention.biformer import (BiLevelRoutingAttention, bi_level_routing_attention,
                                       bra_block_sparse, bra_gather, bra_reference,
                                       from_regions, region_ids, route, routing_mask,
                                       to_regions)
from pallas_kernels.flash import reference as flash_reference


def qkv(b=2, h=8, w=8, heads=2, d=8, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (b, h, w, heads, d), dtype) for k in keys)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


PATHS = {
    "gather": lambda q, k, v, i, s: bra_gather(q, k, v, i, num_regions=s),
    "block_sparse": lambda q, k, v, i, s: bra_block_sparse(q, k, v, i, num_regions=s,
                                                           implementation="xla"),
}


def _out_and_grads(fn, q, k, v, do):
  """fn(q, k, v) and the gradients of sum(fn * do) with respect to q, k and v, in one jit."""
  def f(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)
  return jax.jit(f)(q, k, v, do)


# (H, W, S, topk): square regions, 2x3 regions, one region, full routing, one-token regions.
CASES = [("gather", 8, 8, 4, 3), ("gather", 4, 4, 1, 1), ("gather", 8, 8, 2, 4),
         ("gather", 3, 3, 3, 4), ("gather", 6, 9, 3, 2), ("block_sparse", 6, 9, 3, 2),
         ("block_sparse", 8, 8, 4, 3), ("block_sparse", 3, 3, 3, 4)]


@pytest.mark.parametrize("path, h, w, s, topk", CASES)
def test_fast_paths_match_reference(path, h, w, s, topk):
  """Outputs and gradients with respect to q, k and v (the routed indices fixed)."""
  q, k, v = qkv(h=h, w=w, seed=h * w + s)
  idx = route(q, k, s, topk)
  do = jax.random.normal(jax.random.key(9), q.shape)
  fast = _out_and_grads(lambda q, k, v: PATHS[path](q, k, v, idx, s), q, k, v, do)
  ref = _out_and_grads(lambda q, k, v: bra_reference(q, k, v, idx, num_regions=s), q, k, v, do)
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(ref)):
    assert rel_err(a, b) < 1e-5


def test_block_sparse_pallas_interpret_matches_reference():
  """The Triton-style kernel's logic (interpret mode) with 4x4 = 16-token region tiles."""
  q, k, v = qkv(b=1, h=8, w=8, heads=2, d=16, seed=5)
  idx = route(q, k, 2, 2)
  fast = bra_block_sparse(q, k, v, idx, num_regions=2, implementation="pallas_interpret")
  assert rel_err(fast, bra_reference(q, k, v, idx, num_regions=2)) < 1e-5


def test_region_layout_roundtrip_and_ids():
  x = jnp.arange(2 * 6 * 9 * 3, dtype=jnp.float32).reshape(2, 6, 9, 3)
  r = to_regions(x, 3)  # regions of 2x3 tokens
  assert r.shape == (2, 9, 6, 3)
  np.testing.assert_array_equal(from_regions(r, 3, (6, 9)), x)
  # Region 5 = region row 1, column 2: grid rows 2..3, columns 6..8, row-major inside.
  np.testing.assert_array_equal(r[0, 5], x[0, 2:4, 6:9].reshape(6, 3))
  ids = np.asarray(region_ids((6, 9), 3)).reshape(6, 9)
  assert ids[3, 7] == 5 and ids[0, 0] == 0 and ids[5, 8] == 8


def test_routing_matches_numpy_topk():
  q, k, v = qkv(b=3, h=8, w=8, heads=2, d=4, seed=11)
  s, topk = 4, 5
  idx = np.asarray(route(q, k, s, topk))
  _, same = bi_level_routing_attention(q, k, v, num_regions=s, topk=topk, return_indices=True)
  np.testing.assert_array_equal(same, idx)
  assert idx.shape == (3, 16, 5) and idx.dtype == np.int32
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  for b in range(3):
    # Independent: region means by explicit slicing, over all heads' channels.
    qr = np.stack([qn[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(4, -1).mean(0)
                   for i in range(4) for j in range(4)])
    kr = np.stack([kn[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(4, -1).mean(0)
                   for i in range(4) for j in range(4)])
    a = qr @ kr.T
    for r in range(16):
      order = np.argsort(-a[r])
      assert a[r, order[topk - 1]] - a[r, order[topk]] > 1e-4  # no near-tie in this draw
      assert idx[b, r].tolist() == order[:topk].tolist()  # the k best, best first


def test_output_depends_only_on_routed_regions():
  """Perturbing the keys/values of a region that region i does not route to leaves the outputs
  of region i's queries unchanged (every path), and changes them when it is routed."""
  s, topk = 4, 3
  q, k, v = qkv(b=1, h=8, w=8, seed=21)
  idx = route(q, k, s, topk)
  mask = np.asarray(routing_mask(idx, s))[0]  # [16, 16]
  ids = np.asarray(region_ids((8, 8), s)).reshape(8, 8)
  paths = dict(PATHS, reference=lambda q, k, v, i, s: bra_reference(q, k, v, i, num_regions=s))
  for name, fn in paths.items():
    fn = jax.jit(fn, static_argnums=4)
    base = np.asarray(fn(q, k, v, idx, s))[0]
    for region in (0, 7, 13):
      sel = jnp.asarray(ids == region)[None, :, :, None, None]
      k2, v2 = jnp.where(sel, k + 3.0, k), jnp.where(sel, v - 2.0, v)
      out = np.asarray(fn(q, k2, v2, idx, s))[0]
      diff = np.abs(out - base).max(axis=(2, 3))  # [8, 8], per query token
      for qr in range(16):
        changed = diff[ids == qr].max()
        if mask[qr, region]:
          assert changed > 1e-3, (name, qr, region)
        else:
          assert changed == 0.0, (name, qr, region)


def _depthwise_numpy(x, kernel, bias):
  """'same' depthwise conv by explicit loops: x [B, H, W, C], kernel [k, k, C]."""
  b, h, w, c = x.shape
  kk = kernel.shape[0]
  p = kk // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out = np.zeros_like(x)
  for i in range(kk):
    for j in range(kk):
      out += xp[:, i:i + h, j:j + w] * kernel[i, j]
  return out + bias


def test_full_routing_is_dense_attention_plus_lce():
  """topk = S^2: every token reads every token: plain multi-head attention, plus LCE(V), then
  the output projection."""
  d, heads = 16, 2
  x = jax.random.normal(jax.random.key(4), (2, 4, 6, d))
  layer = BiLevelRoutingAttention(d, num_heads=heads, num_regions=2, topk=4, rngs=nnx.Rngs(0))
  layer.lce.bias[...] = 0.1 * jax.random.normal(jax.random.key(5), (d,))
  layer.o.bias[...] = 0.1 * jax.random.normal(jax.random.key(6), (d,))
  y, idx = layer(x, return_indices=True)
  assert y.shape == x.shape
  assert sorted(np.asarray(idx)[1, 3].tolist()) == [0, 1, 2, 3]
  q, k, v = layer.q(x), layer.k(x), layer.v(x)
  flat = lambda t: t.reshape(2, 24, heads, d // heads)  # noqa: E731
  attn = flash_reference.attention(flat(q), flat(k), flat(v), mask_args=None).reshape(q.shape)
  lce = _depthwise_numpy(np.asarray(v).reshape(2, 4, 6, d), np.asarray(layer.lce.kernel[...]),
                         np.asarray(layer.lce.bias[...]))
  want = layer.o(jnp.asarray(np.asarray(attn) + lce.reshape(q.shape)))
  assert rel_err(y, want) < 1e-5
  # Without LCE it is exactly the dense attention.
  plain = BiLevelRoutingAttention(d, num_heads=heads, num_regions=2, topk=4, lce_kernel=0,
                                  rngs=nnx.Rngs(0))
  assert plain.lce is None
  want = plain.o(flash_reference.attention(flat(plain.q(x)), flat(plain.k(x)), flat(plain.v(x)),
                                           mask_args=None).reshape(q.shape))
  assert rel_err(plain(x), want) < 1e-5


def test_module_implementations_agree():
  """The layer with each implementation (same parameters, routing inside): outputs and
  parameter gradients."""
  x = jax.random.normal(jax.random.key(8), (2, 8, 8, 16))
  layers = [BiLevelRoutingAttention(16, num_heads=2, num_regions=4, topk=3, implementation=impl,
                                    kernel_implementation="xla", rngs=nnx.Rngs(1))
            for impl in ("reference", "gather", "block_sparse")]

  @nnx.jit
  def run(layers):
    return [nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(m) for m in layers]

  (ref_loss, ref_grads), *fast = run(layers)
  ref_leaves = jax.tree.leaves(ref_grads)
  scale = max(float(jnp.abs(g).max()) for g in ref_leaves)  # some leaves are ~0 (the k bias)
  for loss, grads in fast:
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * float(ref_loss)
    for a, b in zip(jax.tree.leaves(grads), ref_leaves):
      assert float(jnp.abs(a - b).max()) < 1e-5 * scale


def test_bfloat16_gather_close_to_float32_reference():
  q, k, v = qkv(h=8, w=8, seed=2)
  idx = route(q, k, 4, 2)
  lo = bra_gather(*(t.astype(jnp.bfloat16) for t in (q, k, v)), idx, num_regions=4)
  assert lo.dtype == jnp.bfloat16
  assert rel_err(lo.astype(jnp.float32), bra_reference(q, k, v, idx, num_regions=4)) < 3e-2


def test_errors_name_the_setting():
  mk = lambda **kw: BiLevelRoutingAttention(  # noqa: E731
      16, **{**dict(num_heads=2, num_regions=2, topk=2, rngs=nnx.Rngs(0)), **kw})
  with pytest.raises(ValueError, match=r"topk=5 .*num_regions\^2 = 4"):
    mk(topk=5)
  with pytest.raises(ValueError, match="topk=0"):
    mk(topk=0)
  with pytest.raises(ValueError, match="num_regions"):
    mk(num_regions=0)
  with pytest.raises(ValueError, match="implementation='dense'"):
    mk(implementation="dense")
  with pytest.raises(ValueError, match="kernel_implementation='triton'"):
    mk(kernel_implementation="triton")
  with pytest.raises(ValueError, match="num_heads=3"):
    mk(num_heads=3)
  with pytest.raises(ValueError, match="lce_kernel"):
    mk(lce_kernel=-1)
  layer = mk(num_regions=3, topk=2)
  with pytest.raises(ValueError, match=r"num_regions=3 \(S\) must divide .* 8x9 grid"):
    layer(jnp.zeros((1, 8, 9, 16)))
  with pytest.raises(ValueError, match=r"x \[B, H, W, 16\]"):
    layer(jnp.zeros((1, 9, 9, 8)))
  # A Pallas kernel tiles by the region: 2x2 = 4 tokens is too small for the GPU kernels.
  q, k, v = qkv(h=4, w=4)
  idx = route(q, k, 2, 1)
  with pytest.raises(ValueError, match=r"num_regions=2 gives 2x2 = 4 tokens .*power of two >= 16"):
    bra_block_sparse(q, k, v, idx, num_regions=2, implementation="pallas_triton")
  with pytest.raises(ValueError, match="multiple of 128"):
    bra_block_sparse(q, k, v, idx, num_regions=2, implementation="pallas_tpu")
  with pytest.raises(ValueError, match=r"indices must be \[B, S\^2, k\]"):
    bra_gather(q, k, v, idx[:, :2], num_regions=2)
