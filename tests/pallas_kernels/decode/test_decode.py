"""Decode attention: every path against causal attention over the cache, layouts, dispatch.

The oracle is independent of the decode code: for each sequence b and kv head
g with length L, the flash reference's causal attention (bottom-right aligned,
so the Tq queries sit at positions L - Tq .. L - 1) of the G query heads of g
over cache[b, :L, g], i.e. the last Tq rows of full causal attention. Every
path (the decode reference, xla, pallas_interpret, pallas_tpu_interpret) must
match it:
    max |x - oracle| / max |oracle| < tol,
tol = 1e-5 in float32, 2e-2 for bfloat16 inputs (8-bit mantissa; the oracle
runs in float32 on the same rounded inputs). The lse must match too, with -inf
exactly where the oracle has it.

The oracle keeps one shape (one compile): the L entries are right-aligned in an
S-long buffer whose front padding is another segment.

The cache past each length holds NaN (and the spare physical pages too), so a
path that reads an entry it must not read fails. Lengths include 0 and the full
capacity; per-kv-head lengths include one shorter than Tq (queries with
nothing visible). Shapes are tiny: interpret mode is slow. The hardware
kernels are also lowered for cuda / tpu without the hardware (Triton and
Mosaic lowering rules), and run for real in the GPU-marked test.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode import api, decode_attention, gpu_mosaic, gpu_triton, tpu
from pallas_kernels.flash import masking
from pallas_kernels.flash import reference as flash_reference
from tests.numerics import rel_err

F32_TOL = 1e-5
BF16_TOL = 2e-2
FAST_PATHS = ("xla", "pallas_interpret", "pallas_tpu_interpret")
PATHS = ("reference",) + FAST_PATHS

# Each case compiles its own programs; XLA's LLVM optimisation dominates that
# time and changes no numerics, so it is turned down (as in the flash tests).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

B, D, PAGE, PAGES = 3, 16, 8, 4
S = PAGE * PAGES  # capacity: 32


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
  """float32 dots in float32 everywhere (a GPU's default is TF32, ~1e-3 relative)."""
  with jax.default_matmul_precision("highest"):
    yield


def _jit(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _normal(rng, shape, dtype=jnp.float32):
  return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def _lengths(hkv, per_head):
  """Per sequence: 0, full, 13 (mid-page). Per kv head: also 1 (< Tq) and 16 (page edge)."""
  if not per_head:
    return np.array([0, S, 13], np.int32)
  per_head = np.array([[0, 5, 9, 2], [S, 1, 7, S], [13, 16, 0, 3]], np.int32)
  return per_head[:, :hkv]


def _cache(rng, hkv, lengths, dtype=jnp.float32):
  """Contiguous k, v [B, S, Hkv, D] holding NaN at every position past its length."""
  lengths2d = np.broadcast_to(lengths.reshape(B, -1), (B, hkv))
  written = np.arange(S)[None, :, None] < lengths2d[:, None, :]
  k, v = (np.where(written[..., None], rng.standard_normal((B, S, hkv, D), np.float32), np.nan)
          for _ in range(2))
  return jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _paginate(rng, k, v):
  """The same cache as shuffled physical pages (two spare NaN pages): (k_pages, v_pages, table)."""
  hkv = k.shape[2]
  num_pages = B * PAGES + 2
  table = rng.permutation(num_pages)[:B * PAGES].reshape(B, PAGES)

  def pages_of(cache):
    pages = np.full((num_pages, PAGE, hkv, D), np.nan, np.float32)
    pages[table.reshape(-1)] = np.asarray(cache, np.float32).reshape(B * PAGES, PAGE, hkv, D)
    return jnp.asarray(pages, cache.dtype)

  return pages_of(k), pages_of(v), jnp.asarray(table, jnp.int32)


def _oracle(q, k, v, lengths, *, scale=None, logits_soft_cap=None, sinks=None):
  """(out [B, Tq, Hq, D], lse [B, Hq, Tq]): the flash reference's causal attention of each
  (b, kv head g) over its first L cache entries.

  To keep one shape (one compile), the L entries are right-aligned in an S-long
  buffer whose padding in front is a different segment; the Tq queries are the
  last Tq positions (bottom-right), so they are the last Tq rows of causal
  attention over cache[b, :L, g]. The (b, g) pairs form the batch.
  """
  q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
  _, tq, hq, _ = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  lengths2d = np.broadcast_to(lengths.reshape(B, -1), (B, hkv))
  k_al, v_al = np.zeros((B, hkv, S, 1, D), np.float32), np.zeros((B, hkv, S, 1, D), np.float32)
  kv_seg = np.zeros((B, hkv, S), np.int32)
  for b in range(B):
    for h in range(hkv):
      n = int(lengths2d[b, h])
      if n:
        k_al[b, h, S - n:, 0], v_al[b, h, S - n:, 0] = k[b, :n, h], v[b, :n, h]
        kv_seg[b, h, S - n:] = 1
  q_bg = q.reshape(B, tq, hkv, g, D).transpose(0, 2, 1, 3, 4).reshape(B * hkv, tq, g, D)
  sinks_bg = None if sinks is None else jnp.asarray(sinks).reshape(hkv, g)

  def causal(q_bg, k_al, v_al, kv_seg, sinks_bg):
    out, lse = jax.vmap(  # over (b, g): each has its own sinks
        lambda q, k, v, seg, sink: flash_reference.attention(
            q[None], k[None], v[None], scale=scale, logits_soft_cap=logits_soft_cap, sinks=sink,
            return_lse=True, mask_args=masking.make_mask_args(
                1, tq, S, is_causal=True, segment_ids=(jnp.ones((1, tq), jnp.int32), seg[None]))),
    )(q_bg, k_al, v_al, kv_seg, sinks_bg)
    return out[:, 0], lse[:, 0]  # [B * Hkv, Tq, G, D], [B * Hkv, G, Tq]

  sinks_rows = None if sinks is None else jnp.tile(sinks_bg, (B, 1))
  out, lse = _jit(causal, jnp.asarray(q_bg), jnp.asarray(k_al.reshape(B * hkv, S, 1, D)),
                  jnp.asarray(v_al.reshape(B * hkv, S, 1, D)),
                  jnp.asarray(kv_seg.reshape(B * hkv, S)), sinks_rows)
  out = np.asarray(out).reshape(B, hkv, tq, g, D).transpose(0, 2, 1, 3, 4).reshape(B, tq, hq, D)
  return out, np.asarray(lse).reshape(B, hq, tq)


def _run_all(q, k, v, lengths, page_table=None, paths=PATHS, **kw):
  """{path: (out, lse)}, all paths in one compiled program."""
  def f(q, k, v, lengths, page_table):
    return {p: decode_attention(q, k, v, lengths=lengths, page_table=page_table, return_lse=True,
                                implementation=p, **kw) for p in paths}
  return _jit(f, q, k, v, jnp.asarray(lengths), page_table)


def _check(results, oracle, q, tol):
  want_out, want_lse = oracle
  for path, (out, lse) in results.items():
    assert out.shape == q.shape and out.dtype == q.dtype, path
    assert lse.shape == want_lse.shape and lse.dtype == jnp.float32, path
    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    assert np.all(np.isfinite(out)), f"{path}: non-finite output"
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse), err_msg=path)
    assert rel_err(out, want_out) < tol, (path, "out", rel_err(out, want_out))
    finite = np.isfinite(want_lse)
    assert rel_err(np.where(finite, lse, 0), np.where(finite, want_lse, 0)) < tol, (path, "lse")


# ---------------------------------------------------------------------------
# Every path against causal attention.


def _case(seed, hq, hkv, tq, per_head, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  lengths = _lengths(hkv, per_head)
  q = _normal(rng, (B, tq, hq, D), dtype)
  k, v = _cache(rng, hkv, lengths, dtype)
  return rng, q, k, v, lengths


@pytest.mark.parametrize("hq,hkv,tq,per_head,layout", [
    (2, 2, 1, False, "contiguous"),  # MHA, one decode step
    (4, 2, 3, True, "paged"),  # GQA 2, verifying 3 speculated tokens, per-kv-head lengths
    (8, 2, 1, True, "contiguous"),  # GQA 4
    (8, 2, 3, False, "paged"),
    (4, 1, 3, True, "paged"),  # MQA
])
def test_matches_causal_attention(hq, hkv, tq, per_head, layout):
  rng, q, k, v, lengths = _case(hq * 100 + hkv * 10 + tq, hq, hkv, tq, per_head)
  oracle = _oracle(q, k, v, lengths)
  if layout == "paged":
    k, v, page_table = _paginate(rng, k, v)
    _check(_run_all(q, k, v, lengths, page_table), oracle, q, F32_TOL)
  else:
    _check(_run_all(q, k, v, lengths), oracle, q, F32_TOL)


def test_paged_and_contiguous_layouts_agree():
  rng, q, k, v, lengths = _case(1, 4, 2, 3, per_head=True)
  contiguous = _run_all(q, k, v, lengths, paths=FAST_PATHS)
  k_pages, v_pages, page_table = _paginate(rng, k, v)
  paged = _run_all(q, k_pages, v_pages, lengths, page_table, paths=FAST_PATHS)
  for path in FAST_PATHS:
    for c, p in zip(contiguous[path], paged[path]):
      np.testing.assert_allclose(np.asarray(p), np.asarray(c), rtol=1e-6, atol=1e-6, err_msg=path)


def test_soft_cap_sinks_and_scale():
  rng, q, k, v, lengths = _case(2, 4, 2, 3, per_head=False)
  sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
  # Scaled-up queries put many logits in tanh's curved range.
  kw = dict(logits_soft_cap=3.0, sinks=sinks, scale=0.7)
  oracle = _oracle(4 * q, k, v, lengths, **kw)
  k_pages, v_pages, page_table = _paginate(rng, k, v)
  results = _run_all(4 * q, k_pages, v_pages, lengths, page_table, **kw)
  _check(results, oracle, q, F32_TOL)
  for out, lse in results.values():  # sequence 0 has length 0: all weight on the sinks
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_allclose(lse[0], np.broadcast_to(np.asarray(sinks)[:, None], (4, 3)))


def test_bfloat16():
  rng, q, k, v, lengths = _case(3, 8, 2, 3, per_head=True, dtype=jnp.bfloat16)
  oracle = _oracle(q, k, v, lengths)  # float32 on the same rounded inputs
  k_pages, v_pages, page_table = _paginate(rng, k, v)
  _check(_run_all(q, k_pages, v_pages, lengths, page_table, paths=FAST_PATHS), oracle, q,
         BF16_TOL)


def test_kernels_with_several_blocks_and_splits_per_program():
  """Contiguous caches cut into blocks of 8 (4 per sequence); Triton with 2 splits of 2 pages."""
  _, q, k, v, lengths = _case(4, 4, 2, 3, per_head=True)
  oracle = _oracle(q, k, v, lengths)
  backends = [gpu_triton.TritonBackend(interpret=True, block_kv=8, num_splits=2),
              gpu_triton.TritonBackend(interpret=True, block_kv=16, num_splits=1),
              tpu.TpuBackend(interpret=True, block_kv=8)]
  call = api.describe_call(q, k, lengths=jnp.asarray(lengths), return_lse=True)

  def f(q, k, v, lengths):
    return [backend(q, k, v, call=call, lengths=lengths, page_table=None, scale=None,
                    logits_soft_cap=None, sinks=None, return_lse=True) for backend in backends]

  results = _jit(f, q, k, v, jnp.asarray(lengths))
  _check({f"{b.name}/{i}": r for i, (b, r) in enumerate(zip(backends, results))}, oracle, q,
         F32_TOL)


def test_stale_entries_past_the_length_are_never_read():
  """Here every entry past the length is +-1e30 or NaN; the outputs match a zeroed cache."""
  rng, q, k, v, lengths = _case(5, 4, 2, 1, per_head=True)
  written = np.isfinite(np.asarray(k))
  junk = np.where(rng.random(k.shape) < 0.5, np.nan, 1e30).astype(np.float32)
  clean = {p: r[0] for p, r in _run_all(q, jnp.where(written, k, 0), jnp.where(written, v, 0),
                                         lengths, paths=FAST_PATHS).items()}
  dirty = _run_all(q, jnp.where(written, k, junk), jnp.where(written, v, -junk), lengths,
                   paths=FAST_PATHS)
  for path in FAST_PATHS:
    np.testing.assert_array_equal(np.asarray(dirty[path][0]), np.asarray(clean[path]),
                                  err_msg=path)


# ---------------------------------------------------------------------------
# Dispatch.


def _call(platform, *, hq=4, hkv=2, d=128, dtype=jnp.float32, kv_dtype=None, page_size=16,
          capacity=64, paged=True, tq=1):
  q = jax.ShapeDtypeStruct((2, tq, hq, d), dtype)
  if paged:
    k = jax.ShapeDtypeStruct((9, page_size, hkv, d), kv_dtype or dtype)
    table = jax.ShapeDtypeStruct((2, capacity // page_size), jnp.int32)
  else:
    k, table = jax.ShapeDtypeStruct((2, capacity, hkv, d), kv_dtype or dtype), None
  return api.describe_call(q, k, lengths=jax.ShapeDtypeStruct((2,), jnp.int32),
                           page_table=table, platform=platform)


def test_describe_call():
  call = _call("cpu", page_size=16, capacity=64)
  assert (call.paged, call.page_size, call.pages_per_seq, call.num_pages, call.capacity) == (
      True, 16, 4, 9, 64)
  assert call.group_size == 2 and not call.per_head_lengths
  contiguous = _call("cpu", paged=False, capacity=40)
  assert (contiguous.paged, contiguous.capacity, contiguous.page_size) == (False, 40, None)


def test_auto_picks_xla_on_cpu_and_pallas_picks_the_interpret_kernel():
  call = _call("cpu")
  assert api.select_backend(call, "auto") is api.XLA_BACKEND
  assert api.select_backend(call, "pallas") is api.TRITON_INTERPRET_BACKEND
  assert api.select_backend(call, "pallas_tpu_interpret") is api.TPU_INTERPRET_BACKEND
  assert api.select_backend(call, "reference") is api.REFERENCE_BACKEND
  assert [b.name for b in api.BACKENDS["cpu"]] == ["xla"]
  assert [b.name for b in api.BACKENDS["gpu"]] == ["pallas_triton", "xla"]
  assert [b.name for b in api.BACKENDS["tpu"]] == ["pallas_tpu", "xla"]
  with pytest.raises(ValueError, match="registered for platform 'gpu'"):
    api.select_backend(call, "pallas_triton")


def test_auto_on_accelerators_picks_the_kernel_or_logs_why_not(caplog):
  assert api.select_backend(_call("gpu", d=128)) is api.TRITON_BACKEND or (
      gpu_triton.triton_backend()[0] is None)
  assert api.select_backend(_call("tpu", d=128)) is api.TPU_BACKEND
  with caplog.at_level(logging.WARNING, logger="pallas_kernels.dispatch"):
    assert api.select_backend(_call("tpu", d=96)) is api.XLA_BACKEND
  assert any("pallas_tpu" in r.getMessage() and "head_dim 96" in r.getMessage()
             for r in caplog.records)


@pytest.mark.parametrize("backend,call,reason", [
    (api.TRITON_BACKEND, dict(platform="cpu"), "runs on a GPU"),
    (api.TRITON_BACKEND, dict(platform="gpu", d=96), "head_dim 96 is not a power of two"),
    (api.TRITON_BACKEND, dict(platform="gpu", d=8), "head_dim 8 is not a power of two >= 16"),
    (api.TRITON_BACKEND, dict(platform="gpu", page_size=8), "page_size 8"),
    (api.TRITON_BACKEND, dict(platform="gpu", paged=False, capacity=40), "no power-of-two block"),
    (api.TRITON_BACKEND, dict(platform="gpu", dtype=jnp.bfloat16, kv_dtype=jnp.float32),
     "differs from the cache dtype"),
    (api.TPU_BACKEND, dict(platform="gpu"), "runs on a TPU"),
    (api.TPU_BACKEND, dict(platform="tpu", d=64), "head_dim 64 is not a multiple of 128"),
    (api.TPU_BACKEND, dict(platform="tpu", page_size=12), "page_size 12 is not a multiple of 8"),
    (api.TPU_BACKEND, dict(platform="tpu", page_size=8, dtype=jnp.bfloat16),
     "page_size 8 is not a multiple of 16"),
    (api.TPU_BACKEND, dict(platform="tpu", paged=False, capacity=36), "no block"),
    (api.TPU_BACKEND, dict(platform="tpu", dtype=jnp.float16), "float16 is not one of"),
    (api.TPU_INTERPRET_BACKEND, dict(platform="cpu", dtype=jnp.float16, kv_dtype=jnp.bfloat16),
     "differs from the cache dtype"),
    (tpu.TpuBackend(interpret=True, block_kv=24), dict(platform="cpu", paged=False, capacity=64),
     "block_kv=24 does not divide"),
    (api.MOSAIC_GPU_BACKEND, dict(platform="gpu", dtype=jnp.float32), "float32 is not one of"),
    (api.MOSAIC_GPU_BACKEND, dict(platform="gpu", dtype=jnp.bfloat16, d=96),
     "head_dim 96 is not a multiple of 64"),
    (api.MOSAIC_GPU_BACKEND, dict(platform="gpu", dtype=jnp.bfloat16, d=64, page_size=16),
     "page_size 16: pages must be a multiple of 64"),
    (api.MOSAIC_GPU_BACKEND, dict(platform="gpu", dtype=jnp.bfloat16, d=64, paged=False,
                                  capacity=96), "cache length 96"),
    (api.MOSAIC_GPU_BACKEND, dict(platform="gpu", dtype=jnp.bfloat16, d=64, page_size=64,
                                  tq=33), "exceed the 64 rows"),
    (api.MOSAIC_GPU_BACKEND, dict(platform="gpu", dtype=jnp.bfloat16, page_size=256,
                                  capacity=256), "exceed shared memory"),
    (api.MOSAIC_GPU_BACKEND, dict(platform="cpu", dtype=jnp.bfloat16, d=64, page_size=64),
     "runs on a GPU"),
])
def test_backends_refuse_what_they_cannot_do(backend, call, reason):
  ok, why = backend.is_supported(_call(**call))
  assert not ok and reason in why, why


def test_backends_accept_what_they_can_do():
  if gpu_triton.triton_backend()[0] is not None:
    assert api.TRITON_BACKEND.is_supported(_call("gpu", d=64, page_size=16)) == (True, "")
    assert api.TRITON_BACKEND.is_supported(_call("gpu", paged=False, capacity=48)) == (True, "")
  assert api.TPU_BACKEND.is_supported(_call("tpu", dtype=jnp.bfloat16, page_size=16)) == (True, "")
  assert api.TPU_BACKEND.is_supported(_call("tpu", paged=False, capacity=72)) == (True, "")
  # Interpret twins take any shape.
  assert api.TRITON_INTERPRET_BACKEND.is_supported(_call("cpu", d=12, page_size=3)) == (True, "")
  assert api.TPU_INTERPRET_BACKEND.is_supported(_call("cpu", d=12, page_size=3)) == (True, "")


def test_triton_is_refused_when_this_jax_has_no_triton_backend(monkeypatch):
  monkeypatch.setattr(gpu_triton, "triton_backend", lambda: (None, "no Pallas Triton here"))
  assert api.TRITON_BACKEND.is_supported(_call("gpu")) == (False, "no Pallas Triton here")
  assert api.select_backend(_call("gpu")) is api.XLA_BACKEND


@pytest.mark.parametrize("change,match", [
    (dict(q=jnp.zeros((2, 4, 8))), "q must be"),
    (dict(q=jnp.zeros((2, 0, 4, 8))), "q_len"),
    (dict(q=jnp.zeros((2, 1, 4, 8), jnp.int32)), "q must be a floating"),
    (dict(k_cache=jnp.zeros((2, 16, 8))), "k_cache must be"),
    (dict(v_cache=jnp.zeros((2, 16, 2, 4))), "v_cache must have"),
    (dict(v_cache=jnp.zeros((2, 16, 2, 8), jnp.bfloat16)), "v_cache dtype"),
    (dict(k_cache=jnp.zeros((2, 16, 2, 4)), v_cache=jnp.zeros((2, 16, 2, 4))), "head_dim"),
    (dict(k_cache=jnp.zeros((2, 16, 3, 8)), v_cache=jnp.zeros((2, 16, 3, 8))), "multiple of"),
    (dict(k_cache=jnp.zeros((3, 16, 2, 8)), v_cache=jnp.zeros((3, 16, 2, 8))), "k_cache batch"),
    (dict(page_table=jnp.zeros((3, 2), jnp.int32)), "page_table must be"),
    (dict(page_table=jnp.zeros((2, 2), jnp.float32)), "page_table must be an integer"),
    (dict(lengths=jnp.zeros((2, 3), jnp.int32)), "lengths must be"),
    (dict(lengths=jnp.zeros((2,), jnp.float32)), "lengths must be an integer"),
    (dict(sinks=jnp.zeros((2,))), "sinks"),
    (dict(logits_soft_cap=0.0), "logits_soft_cap"),
    (dict(implementation="nope"), "implementation"),
])
def test_bad_arguments_are_named(change, match):
  args = dict(q=jnp.zeros((2, 1, 4, 8)), k_cache=jnp.zeros((2, 16, 2, 8)),
              v_cache=jnp.zeros((2, 16, 2, 8)), lengths=jnp.zeros((2,), jnp.int32))
  args.update(change)
  q, k, v = args.pop("q"), args.pop("k_cache"), args.pop("v_cache")
  with pytest.raises(ValueError, match=match):
    decode_attention(q, k, v, **args)


# ---------------------------------------------------------------------------
# Hardware kernels: lowering without the hardware, and a real GPU run.


def _lower(fn, platform, dtype, page=16):
  """Lowers `fn` (paged and contiguous, per-head lengths, cap, sinks, lse) for `platform`."""
  b, tq, hq, hkv, d, pages = 2, 3, 8, 2, 128, 4
  q = jax.ShapeDtypeStruct((b, tq, hq, d), dtype)
  lengths = jax.ShapeDtypeStruct((b, hkv), jnp.int32)
  sinks = jax.ShapeDtypeStruct((hq,), jnp.float32)
  for k, table in [(jax.ShapeDtypeStruct((10, page, hkv, d), dtype),
                    jax.ShapeDtypeStruct((b, pages), jnp.int32)),
                   (jax.ShapeDtypeStruct((b, page * pages, hkv, d), dtype), None)]:
    f = lambda q, k, v, lengths, table, sinks: fn(
        q, k, v, lengths=lengths, page_table=table, sinks=sinks, logits_soft_cap=5.0,
        return_lse=True)
    jax.jit(f).trace(q, k, k, lengths, table, sinks).lower(lowering_platforms=(platform,))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_triton_kernel_lowers_for_cuda(dtype):
  """The Pallas Triton lowering (power-of-two shapes, supported primitives) runs without a GPU."""
  if gpu_triton.triton_backend()[0] is None:
    pytest.skip(gpu_triton.triton_backend()[1])
  _lower(gpu_triton.decode_attention, "cuda", dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_kernel_lowers_for_tpu(monkeypatch, dtype):
  """The Mosaic lowering (block tiling, scalar prefetch) runs without a TPU, given a chip (v5e)."""
  try:
    from jax._src.pallas.mosaic import tpu_info  # pylint: disable=g-import-not-at-top
    info = tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
  except (ImportError, AttributeError) as e:
    pytest.skip(f"this JAX's Mosaic has no chip info to lower against: {e}")
  monkeypatch.setattr(tpu_info, "get_tpu_info", lambda: info)
  _lower(tpu.decode_attention, "tpu", dtype)


@pytest.mark.parametrize("page", [64, 128])
def test_mosaic_gpu_kernel_lowers_for_cuda(page):
  """The Mosaic GPU lowering (layouts, wgmma, TMA, barriers, shared memory) runs without a GPU."""
  _lower(gpu_mosaic.decode_attention, "cuda", jnp.bfloat16, page=page)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_triton_kernel_on_a_gpu(monkeypatch, dtype, tol):
  """Compiles and runs `pallas_triton` (page_size 16, head_dim 64, GQA 4, Tq 3) on the GPU."""
  for name, value in (("D", 64), ("PAGE", 16), ("S", 16 * PAGES)):
    monkeypatch.setitem(globals(), name, value)
  rng, q, k, v, lengths = _case(6, 8, 2, 3, per_head=True, dtype=dtype)
  kw = dict(sinks=jnp.linspace(-1.0, 1.0, 8), logits_soft_cap=20.0)
  oracle = _oracle(q, k, v, lengths, **kw)
  assert api.select_backend(api.describe_call(q, k, lengths=jnp.asarray(lengths))) is (
      api.TRITON_BACKEND)
  k_pages, v_pages, page_table = _paginate(rng, k, v)
  results = {
      "contiguous": _run_all(q, k, v, lengths, paths=("pallas_triton",), **kw)["pallas_triton"],
      "paged": _run_all(q, k_pages, v_pages, lengths, page_table, paths=("pallas_triton",),
                        **kw)["pallas_triton"]}
  _check(results, oracle, q, tol)


@pytest.mark.gpu
def test_mosaic_gpu_kernel_on_a_gpu(monkeypatch):
  """Compiles and runs `pallas_mosaic_gpu` (page_size 64, head_dim 128, GQA 4, Tq 3) on Hopper."""
  ok, why = gpu_mosaic.mosaic_gpu.hopper()
  if not ok:
    pytest.skip(why)
  for name, value in (("D", 128), ("PAGE", 64), ("S", 64 * PAGES)):
    monkeypatch.setitem(globals(), name, value)
  rng, q, k, v, lengths = _case(7, 8, 2, 3, per_head=True, dtype=jnp.bfloat16)
  kw = dict(sinks=jnp.linspace(-1.0, 1.0, 8), logits_soft_cap=20.0)
  oracle = _oracle(q, k, v, lengths, **kw)
  k_pages, v_pages, page_table = _paginate(rng, k, v)
  results = {
      "contiguous": _run_all(q, k, v, lengths, paths=("pallas_mosaic_gpu",),
                             **kw)["pallas_mosaic_gpu"],
      "paged": _run_all(q, k_pages, v_pages, lengths, page_table, paths=("pallas_mosaic_gpu",),
                        **kw)["pallas_mosaic_gpu"]}
  _check(results, oracle, q, BF16_TOL)
