"""Flash attention kernels in the TPU style (Mosaic TPU; also its CPU interpret twin).

The grid carries the loop. Forward and dQ: grid (B, Hq, nq, n), the last
axis walking the key-block list of query block i (`schedule.py`); dK/dV:
grid (B, Hkv, nk, G * m), the last axis walking, for each of the G query
heads of kv head g, the query blocks that read key block j. The lists are
scalar-prefetched into SMEM and the BlockSpec index maps read them, so the
pipeline DMAs exactly the listed blocks; a step past a list's count maps to
the block already resident (lists are padded with their last entry) and
skips its compute with `pl.when`. Accumulators live in VMEM scratch across
the "arbitrary" last axis, as in the splash-attention kernels. Tile math:
`tile.py`.

Layout is [B, H, T, D] (the wrapper in pallas.py transposes), so a block's
two minor dims are (rows, head_dim) as Mosaic wants. Query-side token data
is [B, Tq, 1] and key-side [B, 1, Tk] for the same reason. Per-head scalars
(slope, power, center, sink) are scalar-prefetched as one flat float32 array.

What this backend supports (checked by `is_supported` in pallas.py): every
structured mask, soft cap, sinks, distance bias, lse, any GQA ratio, float32
and bfloat16; on a real TPU block_q a multiple of 8, block_k a multiple of
128 and head dims multiples of 128 (the wrapper pads them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash import tile


def _compiler_params(semantics):
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=semantics)


def _head_params(hp_ref, h):
  return tuple(hp_ref[h * tile.NUM_HEAD_PARAMS + c] for c in range(tile.NUM_HEAD_PARAMS))


def _flat(*idx_and_sizes):
  """Row-major flat index of (i0, ..., ik) in an array of sizes (n0, ..., nk)."""
  flat = 0
  for i, n in idx_and_sizes:
    flat = flat * n + i
  return flat


class _Lists:
  """Index arithmetic over flattened [B, Hs, rows, n] lists and [B, Hs, rows] counts."""

  def __init__(self, shape):
    self.b, self.hs, self.rows, self.n = shape

  def head(self, h):
    return h if self.hs > 1 else 0

  def count(self, cnt_ref, bi, h, r):
    return cnt_ref[_flat((bi, self.b), (self.head(h), self.hs), (r, self.rows))]

  def entry(self, idx_ref, bi, h, r, j):
    return idx_ref[_flat((bi, self.b), (self.head(h), self.hs), (r, self.rows), (j, self.n))]


def _token_inputs(tokens, q_map, k_map, block_q, block_k):
  names, arrays, specs = [], [], []
  for name, side in (("q_pos", "q"), ("q_seg", "q"), ("k_pos", "k"), ("k_seg", "k"),
                     ("k_flags", "k")):
    x = tokens.get(name)
    if x is None:
      continue
    names.append(name)
    if side == "q":
      arrays.append(x[:, :, None])
      specs.append(pl.BlockSpec((None, block_q, 1), q_map))
    else:
      arrays.append(x[:, None, :])
      specs.append(pl.BlockSpec((None, 1, block_k), k_map))
  return names, arrays, specs


def _tokens(refs):
  get = lambda name: refs[name][...] if name in refs else None  # noqa: E731
  return get("q_pos"), get("q_seg"), get("k_pos"), get("k_seg"), get("k_flags")


def _named(n_prefetch, names, n_out, body):
  def kernel(*refs):
    prefetch = refs[:n_prefetch]
    ins = dict(zip(names, refs[n_prefetch:n_prefetch + len(names)]))
    rest = refs[n_prefetch + len(names):]
    return body(*prefetch, ins, *rest[:n_out], *rest[n_out:])
  return kernel


def _forward_body(spec, lists, cnt_ref, idx_ref, hp_ref, ins, o_ref, lse_ref, m_sc, l_sc, acc_sc):
  bi, h, i, j = (pl.program_id(a) for a in range(4))
  params = _head_params(hp_ref, h)

  @pl.when(j == 0)
  def _init():
    m, l, acc = tile.initial_state(spec, params, m_sc.shape[0], acc_sc.shape[1])
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  @pl.when(j < lists.count(cnt_ref, bi, h, i))
  def _step():
    q_pos, q_seg, k_pos, k_seg, k_flags = _tokens(ins)
    raw = tile.raw_logits(spec, ins["q"][...], ins["k"][...])
    s = tile.logits(spec, raw, q_pos, k_pos, params,
                    tile.visible(spec, q_pos, q_seg, k_pos, k_seg, k_flags))
    m, l, acc = tile.online_softmax_step(m_sc[...], l_sc[...], acc_sc[...], s, ins["v"][...])
    m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    out, lse = tile.finish(m_sc[...], l_sc[...], acc_sc[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def forward(spec, q, k, v, head_params, tokens, counts, indices, *, block_q, block_k, interpret):
  """out [B, Hq, Tq, Dv], lse [B, Hq, Tq, 1] from padded [B, H, T, D] inputs and block lists."""
  b, hq, tq, d = q.shape
  hkv, dv = k.shape[1], v.shape[3]
  group = hq // hkv
  lists = _Lists(indices.shape)
  n = lists.n

  def kv_map(bi, h, i, j, cnt, idx, hp):
    return (bi, h // group, lists.entry(idx, bi, h, i, j), 0)

  def k_tok_map(bi, h, i, j, cnt, idx, hp):
    return (bi, 0, lists.entry(idx, bi, h, i, j))

  names = ["q", "k", "v"]
  specs = [pl.BlockSpec((None, None, block_q, d), lambda bi, h, i, j, *_: (bi, h, i, 0)),
           pl.BlockSpec((None, None, block_k, d), kv_map),
           pl.BlockSpec((None, None, block_k, dv), kv_map)]
  t_names, t_arrays, t_specs = _token_inputs(
      tokens, lambda bi, h, i, j, *_: (bi, i, 0), k_tok_map, block_q, block_k)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(b, hq, tq // block_q, n),
      in_specs=specs + t_specs,
      out_specs=[pl.BlockSpec((None, None, block_q, dv), lambda bi, h, i, j, *_: (bi, h, i, 0)),
                 pl.BlockSpec((None, None, block_q, 1), lambda bi, h, i, j, *_: (bi, h, i, 0))],
      scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32), pltpu.VMEM((block_q, 1), jnp.float32),
                      pltpu.VMEM((block_q, dv), jnp.float32)])
  return pl.pallas_call(
      _named(3, names + t_names, 2, functools.partial(_forward_body, spec, lists)),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, hq, tq, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, tq, 1), jnp.float32)],
      compiler_params=None if interpret else _compiler_params(
          ("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret, name="flash_forward_tpu",
  )(counts.reshape(-1), indices.reshape(-1), head_params.reshape(-1), q, k, v, *t_arrays)


def _dq_body(spec, lists, cnt_ref, idx_ref, hp_ref, ins, *refs):
  if spec.has_distance_bias:
    dq_ref, dp_ref, dq_sc, dp_sc = refs
  else:
    (dq_ref, dq_sc), dp_ref, dp_sc = refs, None, None
  bi, h, i, j = (pl.program_id(a) for a in range(4))
  params = _head_params(hp_ref, h)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
    if dp_sc is not None:
      dp_sc[...] = jnp.zeros(dp_sc.shape, jnp.float32)

  @pl.when(j < lists.count(cnt_ref, bi, h, i))
  def _step():
    q_pos, q_seg, k_pos, k_seg, k_flags = _tokens(ins)
    k = ins["k"][...]
    _, ds_raw, ds = tile.backward_tile(
        spec, ins["q"][...], k, ins["v"][...], ins["do"][...], ins["lse"][...], ins["delta"][...],
        q_pos, q_seg, k_pos, k_seg, k_flags, params)
    dq_sc[...] += spec.scale * jnp.dot(ds_raw.astype(k.dtype), k,
                                       preferred_element_type=jnp.float32)
    if dp_sc is not None:
      grads = tile.distance_param_grads(ds, q_pos, k_pos, params)
      dp_sc[...] += jnp.concatenate(grads + (jnp.zeros_like(grads[0]),), axis=1)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)
    if dp_ref is not None:
      dp_ref[...] = dp_sc[...]


def _dkdv_body(spec, t_lists, group, cnt_ref, idx_ref, hp_ref, ins, dk_ref, dv_ref, dk_sc, dv_sc):
  bi, g, kb, t = (pl.program_id(a) for a in range(4))
  m = t_lists.n
  h = g * group + t // m
  params = _head_params(hp_ref, h)

  @pl.when(t == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(t % m < t_lists.count(cnt_ref, bi, h, kb))
  def _step():
    q_pos, q_seg, k_pos, k_seg, k_flags = _tokens(ins)
    q, do = ins["q"][...], ins["do"][...]
    p, ds_raw, _ = tile.backward_tile(
        spec, q, ins["k"][...], ins["v"][...], do, ins["lse"][...], ins["delta"][...],
        q_pos, q_seg, k_pos, k_seg, k_flags, params)
    dv_sc[...] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dk_sc[...] += spec.scale * jnp.dot(ds_raw.T.astype(q.dtype), q,
                                       preferred_element_type=jnp.float32)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(spec, q, k, v, head_params, tokens, counts, indices, t_counts, t_indices, do, lse,
             delta, *, block_q, block_k, interpret):
  """(dq, dk, dv, dparam_rows [B, Hq, Tq, 4] or None) from padded [B, H, T, D] inputs.

  lse, delta: [B, Hq, Tq, 1]; lse is +inf on empty rows; delta = rowsum(dO * O) - dlse.
  """
  b, hq, tq, d = q.shape
  hkv, tk, dv = k.shape[1], k.shape[2], v.shape[3]
  group = hq // hkv
  lists, t_lists = _Lists(indices.shape), _Lists(t_indices.shape)
  prefetch = (counts.reshape(-1), indices.reshape(-1), head_params.reshape(-1))

  def kv_map(bi, h, i, j, cnt, idx, hp):
    return (bi, h // group, lists.entry(idx, bi, h, i, j), 0)

  def k_tok_map(bi, h, i, j, cnt, idx, hp):
    return (bi, 0, lists.entry(idx, bi, h, i, j))

  def q_map(bi, h, i, j, *_):
    return (bi, h, i, 0)

  names = ["q", "k", "v", "do", "lse", "delta"]
  specs = [pl.BlockSpec((None, None, block_q, d), q_map),
           pl.BlockSpec((None, None, block_k, d), kv_map),
           pl.BlockSpec((None, None, block_k, dv), kv_map),
           pl.BlockSpec((None, None, block_q, dv), q_map),
           pl.BlockSpec((None, None, block_q, 1), q_map),
           pl.BlockSpec((None, None, block_q, 1), q_map)]
  t_names, t_arrays, t_specs = _token_inputs(
      tokens, lambda bi, h, i, j, *_: (bi, i, 0), k_tok_map, block_q, block_k)
  out_specs = [pl.BlockSpec((None, None, block_q, d), q_map)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  scratch = [pltpu.VMEM((block_q, d), jnp.float32)]
  if spec.has_distance_bias:
    out_specs.append(pl.BlockSpec((None, None, block_q, tile.NUM_HEAD_PARAMS), q_map))
    out_shape.append(jax.ShapeDtypeStruct((b, hq, tq, tile.NUM_HEAD_PARAMS), jnp.float32))
    scratch.append(pltpu.VMEM((block_q, tile.NUM_HEAD_PARAMS), jnp.float32))
  dq_out = pl.pallas_call(
      _named(3, names + t_names, len(out_specs), functools.partial(_dq_body, spec, lists)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, hq, tq // block_q, lists.n),
          in_specs=specs + t_specs, out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=None if interpret else _compiler_params(
          ("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret, name="flash_backward_dq_tpu",
  )(*prefetch, q, k, v, do, lse, delta, *t_arrays)
  dq = dq_out[0]
  dparam_rows = dq_out[1] if spec.has_distance_bias else None

  m = t_lists.n

  def q_of(bi, g, kb, t, cnt, idx):
    h = g * group + t // m
    return h, t_lists.entry(idx, bi, h, kb, t % m)

  def qt_map(bi, g, kb, t, cnt, idx, hp):
    h, qb = q_of(bi, g, kb, t, cnt, idx)
    return (bi, h, qb, 0)

  def q_tok_map(bi, g, kb, t, cnt, idx, hp):
    _, qb = q_of(bi, g, kb, t, cnt, idx)
    return (bi, qb, 0)

  def k_map(bi, g, kb, t, *_):
    return (bi, g, kb, 0)

  specs = [pl.BlockSpec((None, None, block_q, d), qt_map),
           pl.BlockSpec((None, None, block_k, d), k_map),
           pl.BlockSpec((None, None, block_k, dv), k_map),
           pl.BlockSpec((None, None, block_q, dv), qt_map),
           pl.BlockSpec((None, None, block_q, 1), qt_map),
           pl.BlockSpec((None, None, block_q, 1), qt_map)]
  t_names, t_arrays, t_specs = _token_inputs(
      tokens, q_tok_map, lambda bi, g, kb, t, *_: (bi, 0, kb), block_q, block_k)
  dk, dv_ = pl.pallas_call(
      _named(3, names + t_names, 2, functools.partial(_dkdv_body, spec, t_lists, group)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, hkv, tk // block_k, group * m),
          in_specs=specs + t_specs,
          out_specs=[pl.BlockSpec((None, None, block_k, d), k_map),
                     pl.BlockSpec((None, None, block_k, dv), k_map)],
          scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32),
                          pltpu.VMEM((block_k, dv), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=None if interpret else _compiler_params(
          ("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret, name="flash_backward_dkdv_tpu",
  )(t_counts.reshape(-1), t_indices.reshape(-1), head_params.reshape(-1), q, k, v, do, lse, delta,
    *t_arrays)
  return dq, dk, dv_, dparam_rows

