"""Flash attention kernels on Mosaic GPU (Hopper: TMA, wgmma, warp specialization).

FlashAttention-3's structure ("FlashAttention-3: Fast and Accurate Attention
with Asynchrony and Low-precision", Shah et al., 2024) on Pallas Mosaic GPU:
a CTA holds one query tile of `block_q` rows for one (batch, query head) and
runs three warpgroups. Two compute warpgroups own `block_q / 2` rows each and
issue the matmuls on the tensor cores (wgmma); the third is a producer that
only moves memory: it streams the key/value blocks the tile's list names
(`schedule.py`) into a ring of `stages` shared-memory slots with TMA copies,
and refills a slot once both compute warpgroups have released it. The
tile math is `tile.py`'s (visibility, soft cap, distance bias), applied to
full [rows, block_k] arrays so every operand has the wgmma register layout;
the online softmax keeps its row statistics m, l as vectors in the layout of
a row reduction.

The backward pass follows FlashAttention-2 (see xla.py's docstring) with the
same warp-specialized shape: a dQ kernel streams key/value blocks past a
query tile, a dK/dV kernel streams query/dO blocks (the transposed lists) past
a key tile; each tile is recomputed from the saved log-sum-exp.

Inputs arrive padded (`pallas.py`): sequences to whole tiles, head dims to a
multiple of 64 (one 128-byte swizzle row of 16-bit elements), lists with the
count in column 0. Token-level mask data (positions, segment ids, key flags)
of the resident tile is loaded once from global memory into the layout it is
used in; the streamed blocks' token vectors (and, in dK/dV, their rows of lse
and delta) travel with the blocks through TMA rings of their own, so no
compute warpgroup waits on a global load inside the loop.

What this backend supports (`is_supported`): every structured mask, soft
cap, sinks, distance bias, lse, any GQA ratio, head dims up to 128 (the
backward's shared memory: two 64-row tiles and two stages of streamed blocks),
bfloat16 and float16 (wgmma's 16-bit inputs), 128 x 128 tiles (block-sparse
block shapes included), on compute capability 9.x.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import mosaic_gpu
from pallas_kernels.flash import tile

_F32 = mosaic_gpu.F32
_COMPUTE_WGS = 2
_WG_ROWS = 64  # query (dQ, forward) or key (dK/dV) rows per compute warpgroup: one wgmma tile
HEAD_DIM_MULTIPLE = 64
MAX_HEAD_DIM = 128
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_supported(call, block_q: int, block_k: int):
  """(ok, reason): the dtypes, head dims and tiles of the module docstring, then the device."""
  if call.q_dtype not in _DTYPES:
    return False, f"dtype {call.q_dtype} (wgmma takes bfloat16 or float16)"
  dims = max(call.head_dim, call.v_head_dim)
  if dims > MAX_HEAD_DIM:
    return False, f"head dims above {MAX_HEAD_DIM} (got {call.head_dim}, {call.v_head_dim})"
  if block_q != _COMPUTE_WGS * _WG_ROWS:
    return False, (f"block_q={block_q} is not {_COMPUTE_WGS * _WG_ROWS} ({_WG_ROWS} rows per"
                   " compute warpgroup)")
  if block_k != _COMPUTE_WGS * _WG_ROWS:  # the dK/dV kernel splits the key tile the same way
    return False, (f"block_k={block_k} is not {_COMPUTE_WGS * _WG_ROWS} ({_WG_ROWS} key rows per"
                   " compute warpgroup in the dK/dV kernel)")
  return mosaic_gpu.hopper()


@dataclasses.dataclass(frozen=True)
class Launch:
  """Pipeline depth: how many key/value (or query/dO) blocks are in flight per CTA."""
  stages: int = 2


def default_blocks(head_dim: int):
  """(block_q, block_k) = (128, 128): 64 query rows per compute warpgroup.

  Shared memory at D = 128 with two stages: forward 192 KiB (query and output
  tiles, K and V rings), each backward kernel 192 KiB, of the H100's 227 KiB.
  """
  del head_dim  # every supported head dim takes the same tiles
  return 128, 128


def _tokens_at(spec, tokens, b, start, size, layout, side):
  """The resident tile's token vectors: `size` tokens from `start`, loaded once into `layout`."""
  return _side_tuple(spec, {
      n: mosaic_gpu.load(tokens[n].at[b, pl.ds(start, size)], layout, optimized=False)
      for n in _side_names(spec, side)}, side)


def _side_names(spec, side):
  """The token vectors of one side (`tile.visible`'s order) that this call reads."""
  if side == "q":
    return tuple(n for n, used in (("q_pos", spec.has_positions), ("q_seg", spec.has_segments))
                 if used)
  return tuple(n for n, used in (("k_pos", spec.has_positions), ("k_seg", spec.has_segments),
                                 ("k_flags", True)) if used)


def _side_tuple(spec, vectors, side):
  """{name: vector} -> (q_pos, q_seg) or (k_pos, k_seg, k_flags), None where unused."""
  names = ("q_pos", "q_seg") if side == "q" else ("k_pos", "k_seg", "k_flags")
  return tuple(vectors.get(n) for n in names)


def _ring_scratch(names, stages, block, dtype_of):
  """Shared-memory rings, then their (ready, free) barriers, for vectors streamed per block."""
  plgpu = mosaic_gpu.plgpu_module()
  return ([plgpu.SMEM((stages, block), dtype_of(n)) for n in names]
          + [mosaic_gpu.barriers(stages, _COMPUTE_WGS) for _ in names])


def _take(rings, slot, layout):
  """{name: (ring, (ready, free))} -> {name: the vector in `slot`}, each slot released at once."""
  plgpu = mosaic_gpu.plgpu_module()
  out = {}
  for name, (ring, (ready, free)) in rings.items():
    plgpu.barrier_wait(ready.at[slot])
    out[name] = mosaic_gpu.load(ring.at[slot], layout)
    plgpu.barrier_arrive(free.at[slot])
  return out


def _tile_logits(spec, raw, q_side, k_side, params, *, keys_on_rows=False):
  """tile.py's logits on a [rows, cols] tile, token vectors broadcast to the tile.

  Queries run along the rows (keys along the columns) unless `keys_on_rows`:
  the dK/dV kernel computes the transposed tile K Q^T. Returns the logits and
  the broadcast positions (for the distance bias's gradients).
  """
  shape = raw.shape
  q_dim, k_dim = ([1], [0]) if keys_on_rows else ([0], [1])
  spread = lambda x, dims: None if x is None else lax.broadcast_in_dim(x, shape, dims)  # noqa: E731
  q_pos, q_seg = (spread(x, q_dim) for x in q_side)
  k_pos, k_seg, k_flags = (spread(x, k_dim) for x in k_side)
  vis = tile.visible(spec, q_pos, q_seg, k_pos, k_seg, k_flags)
  return tile.logits(spec, raw, q_pos, k_pos, params, vis), (q_pos, k_pos)


def _head_params(ref, h):
  return tuple(ref[h, i] for i in range(tile.NUM_HEAD_PARAMS))


def _query_tile(lists_ref, block_k):
  """This CTA's (batch, query head, query tile, warpgroup) and its key-block list.

  Returns (b, h, qi, wg, count_of, start_of): count_of(_) is the list's length,
  start_of(j) the first key of its j-th block. lists_ref [B, 1 or Hq, nq, 1 + n].
  """
  b, h, qi = (lax.axis_index(a) for a in ("batch", "heads", "q_seq"))
  row = (b, h if lists_ref.shape[1] > 1 else 0, qi)
  return (b, h, qi, lax.axis_index("wg"), lambda _: lists_ref[(*row, 0)],
          lambda j: lists_ref[(*row, 1 + j)] * block_k)


def _raw_logits(spec, tile_ref, ring, bars, slot, rows, cols):
  """scale * A B^T: the resident tile A [rows, D] against the streamed block B in ring slot
  `slot`, once its copy has landed (Q K^T in the forward and dQ kernels, K Q^T in dK/dV)."""
  plgpu = mosaic_gpu.plgpu_module()
  plgpu.barrier_wait(bars[0].at[slot])
  block_t = mosaic_gpu.transposed(ring.at[slot])
  return mosaic_gpu.matmul(tile_ref, block_t, (rows, cols)) * spec.scale


def _stream_kv(k_ref, v_ref, tok, b, kv_head, count_of, start_of, block_k, stages, k_ring,
               v_ring, side_rings):
  """The producer of the forward and dQ kernels: each listed K and V block into its ring, and
  the keys' token vectors (`side_rings`: {name: (ring, barriers)}) into theirs."""
  def sources(g, j):
    del g
    keys = pl.ds(start_of(j), block_k)
    return ([k_ref.at[b, keys, kv_head], v_ref.at[b, keys, kv_head]]
            + [tok[n].at[b, keys] for n in side_rings])

  mosaic_gpu.producer(1, count_of, stages,
                      [k_ring, v_ring] + [(ring, *bars) for ring, bars in side_rings.values()],
                      sources)


def _named_rings(names, bufs):
  """Scratch refs laid out by `_ring_scratch` -> {name: (ring, (ready, free))}."""
  n = len(names)
  return {name: (bufs[i], bufs[n + i]) for i, name in enumerate(names)}


def _rings(stages):
  """Barriers of the two streamed operands' rings (K and V, or Q and dO)."""
  return (mosaic_gpu.barriers(stages, _COMPUTE_WGS), mosaic_gpu.barriers(stages, _COMPUTE_WGS))


def _token_names(tokens):
  return sorted(n for n, x in tokens.items() if x is not None)


def forward(spec, q, k, v, head_params, tokens, lists, *, block_q, block_k,
            launch: Launch = Launch()):
  """out [B, Tq, Hq, Dv], lse [B, Hq, Tq] (float32) from padded inputs; lists [B, Hs, nq, 1+n]."""
  plgpu = mosaic_gpu.plgpu_module()
  nb, tq, hq, d = q.shape
  hkv, dv = k.shape[2], v.shape[3]
  group = hq // hkv
  rows = block_q // _COMPUTE_WGS
  stages = launch.stages
  dtype = q.dtype
  names = _token_names(tokens)
  layout = plgpu.Layout.WGMMA
  row_layout, col_layout = layout.reduce(1), layout.reduce(0)
  tr = mosaic_gpu.smem_transforms(dtype)

  k_names = _side_names(spec, "k")

  def body(q_ref, k_ref, v_ref, params_ref, lists_ref, *rest):
    tok = dict(zip(names, rest))
    rest = rest[len(names):]
    o_ref, lse_ref, q_smem, o_smem, lse_smem, k_ring, v_ring, q_bar, k_bars, v_bars = rest[:10]
    k_rings = _named_rings(k_names, rest[10:])
    b, h, qi, wg, count_of, start_of = _query_tile(lists_ref, block_k)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q_base = qi * block_q + wg * rows
      my_q = q_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, rows), h], my_q, q_bar.at[wg])
      params = _head_params(params_ref, h)
      q_side = _tokens_at(spec, tok, b, q_base, rows, row_layout, "q")
      first_m, first_l = ((params[tile.SINK], 1.0) if spec.has_sinks else (-jnp.inf, 0.0))
      m0 = mosaic_gpu.rows_full(first_m, rows, row_layout)
      l0 = mosaic_gpu.rows_full(first_l, rows, row_layout)
      plgpu.barrier_wait(q_bar.at[wg])

      def step(t, g, j, carry):
        m, l, acc = carry
        slot = lax.rem(t, stages)
        raw = _raw_logits(spec, my_q, k_ring, k_bars, slot, rows, block_k)
        plgpu.barrier_arrive(k_bars[1].at[slot])
        k_side = _side_tuple(spec, _take(k_rings, slot, col_layout), "k")
        s, _ = _tile_logits(spec, raw, q_side, k_side, params)
        m_new, l, acc, p = mosaic_gpu.softmax_step(m, l, acc, s)
        plgpu.barrier_wait(v_bars[0].at[slot])
        acc = mosaic_gpu.matmul(p.astype(dtype), v_ring.at[slot], acc.shape, acc)
        plgpu.barrier_arrive(v_bars[1].at[slot])
        return m_new, l, acc

      m, l, acc = mosaic_gpu.walk(1, count_of, step, (m0, l0, mosaic_gpu.zeros((rows, dv), layout)))
      out = acc / lax.broadcast_in_dim(jnp.where(l == 0.0, 1.0, l), acc.shape, [0])
      lse = jnp.where(l > 0.0, m + jnp.log(jnp.where(l > 0.0, l, 1.0)), -jnp.inf)
      o_smem.at[wg][...] = out.astype(dtype)
      lse_smem.at[wg][...] = lse
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[b, pl.ds(q_base, rows), h])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q_base, rows)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _produce():
      _stream_kv(k_ref, v_ref, tok, b, lax.div(h, group), count_of, start_of, block_k, stages,
                 (k_ring, *k_bars), (v_ring, *v_bars), k_rings)

  scratch = [plgpu.SMEM((_COMPUTE_WGS, rows, d), dtype, transforms=tr),
             plgpu.SMEM((_COMPUTE_WGS, rows, dv), dtype, transforms=tr),
             plgpu.SMEM((_COMPUTE_WGS, rows), _F32),
             plgpu.SMEM((stages, block_k, d), dtype, transforms=tr),
             plgpu.SMEM((stages, block_k, dv), dtype, transforms=tr),
             plgpu.Barrier(num_barriers=_COMPUTE_WGS), *_rings(stages),
             *_ring_scratch(k_names, stages, block_k, lambda n: jnp.int32)]
  out_type = [jax.ShapeDtypeStruct((nb, tq, hq, dv), dtype),
              jax.ShapeDtypeStruct((nb, hq, tq), _F32)]
  return mosaic_gpu.launch(body, scratch, out_type, (hq, tq // block_q, nb),
                           ("heads", "q_seq", "batch"), _COMPUTE_WGS,
                           )(q, k, v, head_params, lists, *(tokens[n] for n in names))


def backward(spec, q, k, v, head_params, tokens, lists, t_lists, do, lse, delta, *, block_q,
             block_k, launch: Launch = Launch()):
  """(dq, dk, dv, dparam_rows [B, Hq, Tq, 3] or None) from padded inputs.

  lse must be +inf on empty rows; delta = rowsum(dO * O) - dlse. The dQ kernel's
  query tile and the dK/dV kernel's key tile are split between the two compute
  warpgroups, so both `block_q` and `block_k` hold 2 x 64 rows.
  """
  dq, dparam_rows = _backward_dq(spec, q, k, v, head_params, tokens, lists, do, lse, delta,
                                 block_q=block_q, block_k=block_k, stages=launch.stages)
  dk, dv = _backward_dkdv(spec, q, k, v, head_params, tokens, t_lists, do, lse, delta,
                          block_q=block_q, block_k=block_k, stages=launch.stages)
  return dq, dk, dv, dparam_rows


def _backward_dq(spec, q, k, v, head_params, tokens, lists, do, lse, delta, *, block_q,
                 block_k, stages):
  plgpu = mosaic_gpu.plgpu_module()
  nb, tq, hq, d = q.shape
  hkv, dv = k.shape[2], v.shape[3]
  group = hq // hkv
  rows = block_q // _COMPUTE_WGS
  dtype = q.dtype
  names = _token_names(tokens)
  layout = plgpu.Layout.WGMMA
  row_layout, col_layout = layout.reduce(1), layout.reduce(0)
  tr = mosaic_gpu.smem_transforms(dtype)
  n_dparams = 3 if spec.has_distance_bias else 0
  k_names = _side_names(spec, "k")

  def body(q_ref, k_ref, v_ref, params_ref, lists_ref, do_ref, lse_ref, delta_ref, *rest):
    tok = dict(zip(names, rest))
    rest = rest[len(names):]
    dq_ref, dparam_refs = rest[0], rest[1:1 + n_dparams]
    rest = rest[1 + n_dparams:]
    q_smem, do_smem, dp_smem, k_ring, v_ring, in_bar, k_bars, v_bars = rest[:8]
    k_rings = _named_rings(k_names, rest[8:])
    b, h, qi, wg, count_of, start_of = _query_tile(lists_ref, block_k)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      q_base = qi * block_q + wg * rows
      rows_at = (b, pl.ds(q_base, rows), h)
      my_q, my_do = q_smem.at[wg], do_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[rows_at], my_q, in_bar.at[2 * wg])
      plgpu.copy_gmem_to_smem(do_ref.at[rows_at], my_do, in_bar.at[2 * wg + 1])
      params = _head_params(params_ref, h)
      q_side = _tokens_at(spec, tok, b, q_base, rows, row_layout, "q")
      lse_rows = mosaic_gpu.load(lse_ref.at[b, h, pl.ds(q_base, rows)], row_layout,
                                 optimized=False)
      delta_rows = mosaic_gpu.load(delta_ref.at[b, h, pl.ds(q_base, rows)], row_layout,
                                   optimized=False)
      plgpu.barrier_wait(in_bar.at[2 * wg])
      plgpu.barrier_wait(in_bar.at[2 * wg + 1])
      dparams0 = tuple(mosaic_gpu.rows_full(0.0, rows, row_layout) for _ in range(n_dparams))

      def step(t, g, j, carry):
        dq, dparams = carry
        slot = lax.rem(t, stages)
        raw = _raw_logits(spec, my_q, k_ring, k_bars, slot, rows, block_k)
        k_side = _side_tuple(spec, _take(k_rings, slot, col_layout), "k")
        s, (q_pos, k_pos) = _tile_logits(spec, raw, q_side, k_side, params)
        p = jnp.exp(s - lax.broadcast_in_dim(lse_rows, s.shape, [0]))
        plgpu.barrier_wait(v_bars[0].at[slot])
        dp = mosaic_gpu.matmul(my_do, mosaic_gpu.transposed(v_ring.at[slot]), (rows, block_k))
        plgpu.barrier_arrive(v_bars[1].at[slot])
        ds = p * (dp - lax.broadcast_in_dim(delta_rows, dp.shape, [0]))
        ds_raw = tile.dlogits_to_draw(spec, ds, raw)
        dq = mosaic_gpu.matmul(ds_raw.astype(dtype), k_ring.at[slot], dq.shape, dq)
        plgpu.barrier_arrive(k_bars[1].at[slot])
        if n_dparams:
          terms = tile.distance_param_terms(q_pos, k_pos, params)
          dparams = tuple(a + (ds * g_).sum(axis=1) for a, g_ in zip(dparams, terms))
        return dq, dparams

      dq0 = mosaic_gpu.zeros((rows, d), layout)
      dq, dparams = mosaic_gpu.walk(1, count_of, step, (dq0, dparams0))
      my_q[...] = (dq * spec.scale).astype(dtype)  # the query tile's buffer carries dQ out
      for i, rows_i in enumerate(dparams):
        dp_smem.at[i, wg][...] = rows_i
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my_q, dq_ref.at[rows_at])
      for i, ref in enumerate(dparam_refs):
        plgpu.copy_smem_to_gmem(dp_smem.at[i, wg], ref.at[b, h, pl.ds(q_base, rows)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _produce():
      _stream_kv(k_ref, v_ref, tok, b, lax.div(h, group), count_of, start_of, block_k, stages,
                 (k_ring, *k_bars), (v_ring, *v_bars), k_rings)

  scratch = [plgpu.SMEM((_COMPUTE_WGS, rows, d), dtype, transforms=tr),
             plgpu.SMEM((_COMPUTE_WGS, rows, dv), dtype, transforms=tr),
             plgpu.SMEM((max(n_dparams, 1), _COMPUTE_WGS, rows), _F32),
             plgpu.SMEM((stages, block_k, d), dtype, transforms=tr),
             plgpu.SMEM((stages, block_k, dv), dtype, transforms=tr),
             plgpu.Barrier(num_barriers=2 * _COMPUTE_WGS), *_rings(stages),
             *_ring_scratch(k_names, stages, block_k, lambda n: jnp.int32)]
  out_type = [jax.ShapeDtypeStruct(q.shape, dtype)]
  out_type += [jax.ShapeDtypeStruct((nb, hq, tq), _F32)] * n_dparams
  outs = mosaic_gpu.launch(body, scratch, out_type, (hq, tq // block_q, nb),
                           ("heads", "q_seq", "batch"), _COMPUTE_WGS,
                           )(q, k, v, head_params, lists, do, lse, delta,
                             *(tokens[n] for n in names))
  dparam_rows = jnp.stack(outs[1:], axis=-1) if n_dparams else None
  return outs[0], dparam_rows


def _backward_dkdv(spec, q, k, v, head_params, tokens, t_lists, do, lse, delta, *, block_q,
                   block_k, stages):
  """dK, dV: a CTA per (batch, kv head, key tile) walks the G query heads' transposed lists."""
  plgpu = mosaic_gpu.plgpu_module()
  nb, tq, hq, d = q.shape
  tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  group = hq // hkv
  hs = t_lists.shape[1]
  rows = block_k // _COMPUTE_WGS
  dtype = q.dtype
  names = _token_names(tokens)
  layout = plgpu.Layout.WGMMA
  row_layout, col_layout = layout.reduce(1), layout.reduce(0)
  tr = mosaic_gpu.smem_transforms(dtype)
  # Streamed with each query block: its token vectors and its rows of lse and delta.
  q_names = _side_names(spec, "q") + ("lse", "delta")

  def body(q_ref, k_ref, v_ref, params_ref, lists_ref, do_ref, lse_ref, delta_ref, *rest):
    tok = dict(zip(names, rest))
    rest = rest[len(names):]
    dk_ref, dv_ref, k_smem, v_smem, q_ring, do_ring, in_bar, q_bars, do_bars = rest[:9]
    q_rings = _named_rings(q_names, rest[9:])
    b, kv_head, ki = (lax.axis_index(a) for a in ("batch", "heads", "k_seq"))
    wg = lax.axis_index("wg")
    head_of = lambda g: kv_head * group + g  # noqa: E731
    row_of = lambda g: head_of(g) if hs > 1 else 0  # noqa: E731
    count_of = lambda g: lists_ref[b, row_of(g), ki, 0]  # noqa: E731
    start_of = lambda g, j: lists_ref[b, row_of(g), ki, 1 + j] * block_q  # noqa: E731

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      k_base = ki * block_k + wg * rows
      rows_at = (b, pl.ds(k_base, rows), kv_head)
      my_k, my_v = k_smem.at[wg], v_smem.at[wg]
      plgpu.copy_gmem_to_smem(k_ref.at[rows_at], my_k, in_bar.at[2 * wg])
      plgpu.copy_gmem_to_smem(v_ref.at[rows_at], my_v, in_bar.at[2 * wg + 1])
      k_side = _tokens_at(spec, tok, b, k_base, rows, row_layout, "k")
      plgpu.barrier_wait(in_bar.at[2 * wg])
      plgpu.barrier_wait(in_bar.at[2 * wg + 1])

      def step(t, g, j, carry):
        dk, dv_acc = carry
        h = head_of(g)
        params = _head_params(params_ref, h)
        slot = lax.rem(t, stages)
        cols = _take(q_rings, slot, col_layout)
        lse_cols, delta_cols = cols["lse"], cols["delta"]
        q_side = _side_tuple(spec, cols, "q")
        raw_t = _raw_logits(spec, my_k, q_ring, q_bars, slot, rows, block_q)  # K Q^T
        s_t, _ = _tile_logits(spec, raw_t, q_side, k_side, params, keys_on_rows=True)
        p_t = jnp.exp(s_t - lax.broadcast_in_dim(lse_cols, s_t.shape, [1]))
        plgpu.barrier_wait(do_bars[0].at[slot])
        dv_acc = mosaic_gpu.matmul(p_t.astype(dtype), do_ring.at[slot], dv_acc.shape, dv_acc)
        dp_t = mosaic_gpu.matmul(my_v, mosaic_gpu.transposed(do_ring.at[slot]), (rows, block_q))
        plgpu.barrier_arrive(do_bars[1].at[slot])
        ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta_cols, dp_t.shape, [1]))
        ds_raw_t = tile.dlogits_to_draw(spec, ds_t, raw_t)
        dk = mosaic_gpu.matmul(ds_raw_t.astype(dtype), q_ring.at[slot], dk.shape, dk)
        plgpu.barrier_arrive(q_bars[1].at[slot])
        return dk, dv_acc

      zeros = (mosaic_gpu.zeros((rows, d), layout), mosaic_gpu.zeros((rows, dv), layout))
      dk, dv_acc = mosaic_gpu.walk(group, count_of, step, zeros)
      my_k[...] = (dk * spec.scale).astype(dtype)  # the key/value tiles carry dK/dV out
      my_v[...] = dv_acc.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my_k, dk_ref.at[rows_at])
      plgpu.copy_smem_to_gmem(my_v, dv_ref.at[rows_at])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _produce():
      def sources(g, j):
        h, queries = head_of(g), pl.ds(start_of(g, j), block_q)
        side = {"lse": lse_ref.at[b, h, queries], "delta": delta_ref.at[b, h, queries],
                **{n: tok[n].at[b, queries] for n in q_names if n in tok}}
        return ([q_ref.at[b, queries, h], do_ref.at[b, queries, h]]
                + [side[n] for n in q_rings])

      mosaic_gpu.producer(group, count_of, stages,
                          [(q_ring, *q_bars), (do_ring, *do_bars)]
                          + [(ring, *bars) for ring, bars in q_rings.values()], sources)

  scratch = [plgpu.SMEM((_COMPUTE_WGS, rows, d), dtype, transforms=tr),
             plgpu.SMEM((_COMPUTE_WGS, rows, dv), dtype, transforms=tr),
             plgpu.SMEM((stages, block_q, d), dtype, transforms=tr),
             plgpu.SMEM((stages, block_q, dv), dtype, transforms=tr),
             plgpu.Barrier(num_barriers=2 * _COMPUTE_WGS), *_rings(stages),
             *_ring_scratch(q_names, stages, block_q,
                            lambda n: _F32 if n in ("lse", "delta") else jnp.int32)]
  out_type = [jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)]
  return mosaic_gpu.launch(body, scratch, out_type, (hkv, tk // block_k, nb),
                           ("heads", "k_seq", "batch"), _COMPUTE_WGS,
                           )(q, k, v, head_params, t_lists, do, lse, delta,
                             *(tokens[n] for n in names))
