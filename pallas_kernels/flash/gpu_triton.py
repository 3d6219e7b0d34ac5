"""Flash attention kernels in the GPU style (Pallas Triton; also the CPU interpret twin).

One program per (batch, query head, query block) in the forward and dQ
passes, one per (batch, kv head, key block) in the dK/dV pass. A program
holds its own block in registers and loops (`lax.fori_loop`) over the blocks
its list names (`schedule.py`), slicing K/V (or Q/dO) out of the whole
sequence with `pl.ds`: the FlashAttention-2 structure, where the loop, not the
grid, carries the online softmax. Tile math: `tile.py`.

Layout is the caller's [B, T, H, D]; a BlockSpec picks one head, and the
kv head of query head h is h // G, so K/V are never repeated. The dK/dV
program reads the G query heads of its kv head as one [T, G, D] block and
sums their contributions in registers.

Inputs arrive padded (`pallas.py`): T to whole blocks, head dims and G to
what Triton can tile, list rows to a power of two with the count in column 0.

What this backend supports (checked by `is_supported` in pallas.py): every
structured mask, soft cap, sinks, distance bias, lse, GQA with G a power of
two, head dims up to 256 (padded to a power of two), float32/bfloat16/float16.
Upstream JAX 0.11 deprecates Pallas Triton in favour of Mosaic GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash import tile
from pallas_kernels.triton_backend import triton_backend


@dataclasses.dataclass(frozen=True)
class Launch:
  """Triton launch settings per pass: warps per program, software-pipelining stages.

  The backward's two kernels (dQ, dK/dV) share `bwd_*`. Defaults come from
  `default_launch`; `bench/tune_flash_triton.py` measures the alternatives.
  """
  fwd_warps: int = 4
  fwd_stages: int = 2
  bwd_warps: int = 4
  bwd_stages: int = 2


def default_launch(head_dim: int, block_q: int, block_k: int) -> Launch:
  """Settings measured on an H100 (bench/results/flash_triton_tuning.jsonl).

  At B=1, T=8192, H=16, D=128, bf16 the forward was fastest at tiles (128, 64)
  with 4 warps and 4 stages, the backward at (64, 64) with 4 warps and 3
  stages; 128x128 tiles (block-sparse's default) need 8 warps (forward 3
  stages, backward 2): with 4 they ran 1.7-1.9x slower. Head dims above 128
  keep the untuned settings, whose shared memory fits at D=256.
  """
  if head_dim > 128:
    return Launch()
  if block_q * block_k >= 128 * 128:
    return Launch(fwd_warps=8, fwd_stages=3, bwd_warps=8, bwd_stages=2)
  return Launch(fwd_warps=4, fwd_stages=4, bwd_warps=4, bwd_stages=3)


def _compiler_params(num_warps: int, num_stages: int):
  pltriton, why = triton_backend()
  if pltriton is None:  # is_supported refuses first; reached only by direct calls
    raise NotImplementedError(why)
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _token(ref, start, size):
  return ref[pl.ds(start, size)]


def _head_params(ref):
  return tuple(ref[i] for i in range(tile.NUM_HEAD_PARAMS))


def _q_side(spec, ins, start, block):
  q_pos = _token(ins["q_pos"], start, block)[:, None] if spec.has_positions else None
  q_seg = _token(ins["q_seg"], start, block)[:, None] if spec.has_segments else None
  return q_pos, q_seg


def _k_side(spec, ins, start, block):
  k_pos = _token(ins["k_pos"], start, block)[None, :] if spec.has_positions else None
  k_seg = _token(ins["k_seg"], start, block)[None, :] if spec.has_segments else None
  return k_pos, k_seg, _token(ins["k_flags"], start, block)[None, :]


def _named(names, body):
  def kernel(*refs):
    return body(dict(zip(names, refs[:len(names)])), *refs[len(names):])
  return kernel


def _forward_body(spec, block_q, block_k, ins, o_ref, lse_ref):
  params = _head_params(ins["head_params"])
  q = ins["q"][...]
  i = pl.program_id(2)
  q_pos, q_seg = _q_side(spec, ins, i * block_q, block_q)
  row = ins["lists"]
  m, l, acc = tile.initial_state(spec, params, block_q, o_ref.shape[-1])

  def step(j, carry):
    m, l, acc = carry
    start = pl.multiple_of(row[1 + j] * block_k, block_k)
    k = ins["k"][pl.ds(start, block_k), :]
    v = ins["v"][pl.ds(start, block_k), :]
    k_pos, k_seg, k_flags = _k_side(spec, ins, start, block_k)
    raw = tile.raw_logits(spec, q, k)
    s = tile.logits(spec, raw, q_pos, k_pos, params,
                    tile.visible(spec, q_pos, q_seg, k_pos, k_seg, k_flags))
    return tile.online_softmax_step(m, l, acc, s, v)

  m, l, acc = lax.fori_loop(0, row[0], step, (m, l, acc))
  out, lse = tile.finish(m, l, acc)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _dq_body(spec, block_q, block_k, ins, dq_ref, *dparam_refs):
  params = _head_params(ins["head_params"])
  q = ins["q"][...]
  do = ins["do"][...]
  lse = ins["lse"][...][:, None]
  delta = ins["delta"][...][:, None]
  i = pl.program_id(2)
  q_pos, q_seg = _q_side(spec, ins, i * block_q, block_q)
  row = ins["lists"]
  dq = jnp.zeros(q.shape, jnp.float32)
  dparams = tuple(jnp.zeros((block_q, 1), jnp.float32) for _ in range(3))

  def step(j, carry):
    dq, dparams = carry
    start = pl.multiple_of(row[1 + j] * block_k, block_k)
    k = ins["k"][pl.ds(start, block_k), :]
    v = ins["v"][pl.ds(start, block_k), :]
    k_pos, k_seg, k_flags = _k_side(spec, ins, start, block_k)
    _, ds_raw, ds = tile.backward_tile(spec, q, k, v, do, lse, delta, q_pos, q_seg, k_pos, k_seg,
                                       k_flags, params)
    dq = dq + spec.scale * jnp.dot(ds_raw.astype(k.dtype), k, preferred_element_type=jnp.float32)
    if spec.has_distance_bias:
      dparams = tuple(a + g for a, g in zip(
          dparams, tile.distance_param_grads(ds, q_pos, k_pos, params)))
    return dq, dparams

  dq, dparams = lax.fori_loop(0, row[0], step, (dq, dparams))
  dq_ref[...] = dq.astype(dq_ref.dtype)
  # One output row per parameter: Triton concatenates only pairs of tensors.
  for ref, rows in zip(dparam_refs, dparams):
    ref[...] = rows[:, 0]


def _dkdv_body(spec, block_q, block_k, group, ins, dk_ref, dv_ref):
  k = ins["k"][...]
  v = ins["v"][...]
  kb = pl.program_id(2)
  k_pos, k_seg, k_flags = _k_side(spec, ins, kb * block_k, block_k)
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for g in range(group):  # static: the query heads sharing this kv head
    params = tuple(ins["head_params"][g, c] for c in range(tile.NUM_HEAD_PARAMS))
    row_ref = ins["t_lists"]
    head_row = g if row_ref.shape[0] > 1 else 0

    def step(j, carry, g=g, params=params, head_row=head_row):
      dk, dv = carry
      start = pl.multiple_of(row_ref[head_row, 1 + j] * block_q, block_q)
      q = ins["q"][pl.ds(start, block_q), g, :]
      do = ins["do"][pl.ds(start, block_q), g, :]
      lse = ins["lse"][g, pl.ds(start, block_q)][:, None]
      delta = ins["delta"][g, pl.ds(start, block_q)][:, None]
      q_pos, q_seg = _q_side(spec, ins, start, block_q)
      p, ds_raw, _ = tile.backward_tile(spec, q, k, v, do, lse, delta, q_pos, q_seg, k_pos, k_seg,
                                        k_flags, params)
      dv = dv + jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
      dk = dk + spec.scale * jnp.dot(ds_raw.T.astype(q.dtype), q,
                                     preferred_element_type=jnp.float32)
      return dk, dv

    dk, dv = lax.fori_loop(0, row_ref[head_row, 0], step, (dk, dv))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _token_specs(tokens):
  """Names, arrays and BlockSpecs of the token-level mask data present in this call.

  Every program reads its batch row's whole [T] of each ([B, T] arrays), whatever its grid.
  """
  names = [n for n in ("q_pos", "q_seg", "k_pos", "k_seg", "k_flags") if tokens.get(n) is not None]
  arrays = [tokens[n] for n in names]
  specs = [pl.BlockSpec((None, x.shape[1]), lambda bi, *_: (bi, 0)) for x in arrays]
  return names, arrays, specs


def forward(spec, q, k, v, head_params, tokens, lists, *, block_q, block_k, interpret,
            launch: Launch = Launch()):
  """out [B, Tq, Hq, Dv], lse [B, Hq, Tq] (float32) from padded inputs; lists [B, Hs, nq, 1+n]."""
  b, tq, hq, d = q.shape
  tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  group = hq // hkv
  nq = tq // block_q
  hs = lists.shape[1]
  names = ["q", "k", "v", "head_params", "lists"]
  arrays = [q, k, v, head_params, lists]
  specs = [
      pl.BlockSpec((None, block_q, None, d), lambda bi, h, i: (bi, i, h, 0)),
      pl.BlockSpec((None, tk, None, d), lambda bi, h, i: (bi, 0, h // group, 0)),
      pl.BlockSpec((None, tk, None, dv), lambda bi, h, i: (bi, 0, h // group, 0)),
      pl.BlockSpec((None, tile.NUM_HEAD_PARAMS), lambda bi, h, i: (h, 0)),
      pl.BlockSpec((None, None, None, lists.shape[-1]),
                   lambda bi, h, i: (bi, h if hs > 1 else 0, i, 0)),
  ]
  t_names, t_arrays, t_specs = _token_specs(tokens)
  body = functools.partial(_forward_body, spec, block_q, block_k)
  return pl.pallas_call(
      _named(names + t_names, body),
      grid=(b, hq, nq),
      in_specs=specs + t_specs,
      out_specs=[pl.BlockSpec((None, block_q, None, dv), lambda bi, h, i: (bi, i, h, 0)),
                 pl.BlockSpec((None, None, block_q), lambda bi, h, i: (bi, h, i))],
      out_shape=[jax.ShapeDtypeStruct((b, tq, hq, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, hq, tq), jnp.float32)],
      compiler_params=None if interpret else _compiler_params(launch.fwd_warps,
                                                              launch.fwd_stages),
      interpret=interpret,
      name="flash_forward",
  )(*arrays, *t_arrays)


def backward(spec, q, k, v, head_params, tokens, lists, t_lists, do, lse, delta, *, block_q,
             block_k, interpret, launch: Launch = Launch()):
  """(dq, dk, dv, dparam_rows [B, Hq, Tq, 3] or None) from padded inputs.

  lse must be +inf on empty rows; delta = rowsum(dO * O) - dlse.
  """
  b, tq, hq, d = q.shape
  tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
  group = hq // hkv
  nq, nk = tq // block_q, tk // block_k
  hs = lists.shape[1]
  cp = None if interpret else _compiler_params(launch.bwd_warps, launch.bwd_stages)

  names = ["q", "k", "v", "head_params", "lists", "do", "lse", "delta"]
  arrays = [q, k, v, head_params, lists, do, lse, delta]
  q_blk = pl.BlockSpec((None, block_q, None, d), lambda bi, h, i: (bi, i, h, 0))
  specs = [
      q_blk,
      pl.BlockSpec((None, tk, None, d), lambda bi, h, i: (bi, 0, h // group, 0)),
      pl.BlockSpec((None, tk, None, dv), lambda bi, h, i: (bi, 0, h // group, 0)),
      pl.BlockSpec((None, tile.NUM_HEAD_PARAMS), lambda bi, h, i: (h, 0)),
      pl.BlockSpec((None, None, None, lists.shape[-1]),
                   lambda bi, h, i: (bi, h if hs > 1 else 0, i, 0)),
      pl.BlockSpec((None, block_q, None, dv), lambda bi, h, i: (bi, i, h, 0)),
      pl.BlockSpec((None, None, block_q), lambda bi, h, i: (bi, h, i)),
      pl.BlockSpec((None, None, block_q), lambda bi, h, i: (bi, h, i)),
  ]
  t_names, t_arrays, t_specs = _token_specs(tokens)
  out_specs = [q_blk]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if spec.has_distance_bias:
    for _ in range(3):  # d slope, d power, d center, per query row
      out_specs.append(pl.BlockSpec((None, None, block_q), lambda bi, h, i: (bi, h, i)))
      out_shape.append(jax.ShapeDtypeStruct((b, hq, tq), jnp.float32))
  dq_out = pl.pallas_call(
      _named(names + t_names, functools.partial(_dq_body, spec, block_q, block_k)),
      grid=(b, hq, nq), in_specs=specs + t_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=cp, interpret=interpret, name="flash_backward_dq",
  )(*arrays, *t_arrays)
  dq = dq_out[0]
  dparam_rows = jnp.stack(dq_out[1:], axis=-1) if spec.has_distance_bias else None

  names = ["q", "k", "v", "head_params", "t_lists", "do", "lse", "delta"]
  arrays = [q, k, v, head_params, t_lists, do, lse, delta]
  specs = [
      pl.BlockSpec((None, tq, group, d), lambda bi, g, j: (bi, 0, g, 0)),
      pl.BlockSpec((None, block_k, None, d), lambda bi, g, j: (bi, j, g, 0)),
      pl.BlockSpec((None, block_k, None, dv), lambda bi, g, j: (bi, j, g, 0)),
      pl.BlockSpec((group, tile.NUM_HEAD_PARAMS), lambda bi, g, j: (g, 0)),
      pl.BlockSpec((None, group if hs > 1 else 1, None, t_lists.shape[-1]),
                   lambda bi, g, j: (bi, g if hs > 1 else 0, j, 0)),
      pl.BlockSpec((None, tq, group, dv), lambda bi, g, j: (bi, 0, g, 0)),
      pl.BlockSpec((None, group, tq), lambda bi, g, j: (bi, g, 0)),
      pl.BlockSpec((None, group, tq), lambda bi, g, j: (bi, g, 0)),
  ]
  t_names, t_arrays, t_specs = _token_specs(tokens)
  dk, dv_ = pl.pallas_call(
      _named(names + t_names, functools.partial(_dkdv_body, spec, block_q, block_k, group)),
      grid=(b, hkv, nk), in_specs=specs + t_specs,
      out_specs=[pl.BlockSpec((None, block_k, None, d), lambda bi, g, j: (bi, j, g, 0)),
                 pl.BlockSpec((None, block_k, None, dv), lambda bi, g, j: (bi, j, g, 0))],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=cp, interpret=interpret, name="flash_backward_dkdv",
  )(*arrays, *t_arrays)
  return dq, dk, dv_, dparam_rows
