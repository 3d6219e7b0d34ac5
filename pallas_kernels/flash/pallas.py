"""Flash attention on Pallas: padding, the block schedule, the custom_vjp, the backends.

The kernel styles (`tpu.py`: the grid walks the key blocks; `gpu_triton.py`:
a loop inside the program walks them; `gpu_mosaic.py`: a producer warpgroup
streams them past two compute warpgroups) compute `reference.py`'s equations over
the blocks a `schedule.BlockSchedule` lists, so causal, windowed, chunked,
packed and block-sparse attention all skip the blocks they never see. The
backward pass is FlashAttention-2's (see xla.py's docstring): a dQ kernel over
the forward lists and a dK/dV kernel over the transposed lists, recomputing
each tile from the saved log-sum-exp. Outside the kernels, in XLA:

    delta_i   = rowsum(dO_i * O_i) - dlse_i
    d sink_h  = -sum_{b,i} exp(sink_h - lse_bhi) delta_bhi
    d (slope, power, center)_h = sums of the dQ kernel's per-row partial sums

Inputs are padded here, never in the kernels: sequences to whole blocks
(padded keys are invalid by their flag, padded query rows are dropped) and,
where the hardware tiles them, head dims (zero columns change no logit).

Backends (`is_supported` says what each refuses, and why):
  pallas_tpu            Mosaic TPU, on TPU.
  pallas_triton         Triton, on NVIDIA/AMD GPUs (deprecated upstream from JAX 0.11).
  pallas_mosaic_gpu     Mosaic GPU, on Hopper (compute capability 9.x). Runs when
                        named: it is not in "auto" until an H100 has measured it.
  pallas_interpret      the Triton-style kernels in interpret mode, on CPU.
  pallas_tpu_interpret  the TPU-style kernels in interpret mode, on CPU.
The interpret twins run only when named (or via implementation="pallas" on
CPU): they exist so tests exercise each backend's logic without hardware.
Mosaic GPU has no usable interpret twin on CPU (JAX 0.10's GPU interpreter
stalls on warp-specialized kernels); its kernels are checked on CPU by
lowering them for CUDA (tests/pallas_kernels/flash/test_gpu_mosaic.py) and
numerically by the GPU-marked tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from pallas_kernels.flash import gpu_mosaic
from pallas_kernels.flash import gpu_triton
from pallas_kernels.flash import masking
from pallas_kernels.flash import reference
from pallas_kernels.flash import schedule
from pallas_kernels.flash import tile
from pallas_kernels.flash import tpu
from pallas_kernels.triton_backend import triton_backend

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Static:
  spec: tile.TileSpec
  kernel: str  # "tpu", "triton" or "mosaic_gpu"
  block_q: int
  block_k: int
  interpret: bool
  launch: Optional[gpu_triton.Launch] = None  # Triton only
  bwd_block_q: Optional[int] = None  # the backward's tiles (None: the forward's)
  bwd_block_k: Optional[int] = None

  @property
  def bwd_blocks(self) -> Tuple[int, int]:
    return self.bwd_block_q or self.block_q, self.bwd_block_k or self.block_k


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _next_pow2(x: int) -> int:
  return 1 << max(x - 1, 0).bit_length()


def token_arrays(m: masking.MaskArgs, batch: int, tq: int, tk: int, tq_pad: int, tk_pad: int,
                 need_positions: bool):
  """Per-token mask data for the kernels (tile.py): positions, segment ids, key flags."""

  def pad(x, size):
    return jnp.pad(x.astype(jnp.int32), ((0, 0), (0, size - x.shape[1])))

  q_pos, k_pos = m.q_positions, m.kv_positions
  if q_pos is None and need_positions:
    q_pos, k_pos = reference.positions(m, batch, tq, tk)
  key_idx = jnp.arange(tk_pad)[None, :]
  valid = jnp.broadcast_to(key_idx < tk, (batch, tk_pad))
  if m.kv_lengths is not None:
    valid = valid & (key_idx < m.kv_lengths[:, None])
  flags = valid.astype(jnp.int32) * tile.VALID_KEY
  if m.prefix_lengths is not None:
    flags = flags | ((pad(k_pos, tk_pad) < m.prefix_lengths[:, None]).astype(jnp.int32)
                     * tile.IN_PREFIX)
  tokens = {"k_flags": flags}
  if q_pos is not None:
    tokens.update(q_pos=pad(q_pos, tq_pad), k_pos=pad(k_pos, tk_pad))
  if m.q_segment_ids is not None:
    tokens.update(q_seg=pad(m.q_segment_ids, tq_pad), k_seg=pad(m.kv_segment_ids, tk_pad))
  return tokens


def head_params(num_heads: int, distance_bias: Optional[jax.Array], sinks: Optional[jax.Array]):
  """[Hq, 4] float32 rows (slope, power, center, sink); differentiable in both inputs."""
  if distance_bias is None:
    dist = jnp.broadcast_to(jnp.array([0.0, 1.0, 0.0], _F32), (num_heads, 3))
  else:
    dist = distance_bias.astype(_F32)
  sink = jnp.zeros((num_heads, 1), _F32) if sinks is None else sinks.astype(_F32)[:, None]
  return jnp.concatenate([dist, sink], axis=1)


def attention(q, k, v, *, mask_args: masking.MaskArgs, scale: Optional[float] = None,
              logits_soft_cap: Optional[float] = None, sinks=None, distance_bias=None,
              return_lse: bool = False, block_q: int, block_k: int, kernel: str,
              interpret: bool, head_dim_multiple: int = 1,
              launch: Optional[gpu_triton.Launch] = None,
              bwd_blocks: Optional[Tuple[int, int]] = None):
  """Flash attention through the Pallas kernels; the contract of `reference.attention`.

  `block_q`/`block_k` are final tile sizes (the backend chose them); a block
  mask in `mask_args` must use the same. `head_dim_multiple` pads D and Dv.
  `launch`: Triton warps/stages (None: `gpu_triton.default_launch`).
  `bwd_blocks`: the backward kernels' tiles when they differ from the
  forward's (the fastest tiles differ per pass on GPUs); a second block
  schedule is built for them. Not with a block mask, whose blocks are fixed.
  """
  b, tq, hq, d = q.shape
  tk, dv = k.shape[1], v.shape[3]
  m = mask_args
  if bwd_blocks is not None and m.block_mask is not None and bwd_blocks != (block_q, block_k):
    raise ValueError(f"bwd_blocks {bwd_blocks} differ from the block mask's tiles"
                     f" {(block_q, block_k)}")
  bwd_q, bwd_k = bwd_blocks or (block_q, block_k)
  tq_pad = _round_up(tq, math.lcm(block_q, bwd_q))
  tk_pad = _round_up(tk, math.lcm(block_k, bwd_k))
  spec = tile.TileSpec(
      scale=float(d ** -0.5 if scale is None else scale),
      soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
      is_causal=m.is_causal, window=m.window, chunk_size=m.chunk_size,
      has_prefix=m.prefix_lengths is not None and (m.is_causal or m.window is not None
                                                    or m.chunk_size is not None),
      has_positions=m.q_positions is not None or distance_bias is not None,
      has_segments=m.q_segment_ids is not None,
      has_distance_bias=distance_bias is not None, has_sinks=sinks is not None)
  tokens = token_arrays(m, b, tq, tk, tq_pad, tk_pad, need_positions=spec.has_positions)
  sched = _schedule(m, tq, tk, tq_pad, tk_pad, block_q, block_k, b)
  bwd_sched = sched
  if (bwd_q, bwd_k) != (block_q, block_k):
    bwd_sched = _schedule(m, tq, tk, tq_pad, tk_pad, bwd_q, bwd_k, b)
  params = head_params(hq, distance_bias, sinks)
  d_pad = _round_up(d, head_dim_multiple)
  dv_pad = _round_up(dv, head_dim_multiple)
  pad4 = lambda x, t, dd: jnp.pad(  # noqa: E731
      x, ((0, 0), (0, t - x.shape[1]), (0, 0), (0, dd - x.shape[3])))
  if kernel == "triton" and launch is None:
    launch = gpu_triton.default_launch(d_pad, block_q, block_k)
  static = _Static(spec, kernel, block_q, block_k, interpret,
                   launch if kernel == "triton" else None,
                   *((bwd_q, bwd_k) if bwd_sched is not sched else (None, None)))
  out, lse = _flash(static, pad4(q, tq_pad, d_pad), pad4(k, tk_pad, d_pad),
                    pad4(v, tk_pad, dv_pad), params, tokens, sched, bwd_sched)
  out = out[:, :tq, :, :dv]
  if return_lse:
    return out, lse[:, :, :tq]
  return out


def _schedule(m, tq, tk, tq_pad, tk_pad, block_q, block_k, batch) -> schedule.BlockSchedule:
  """The block schedule at these tiles; blocks of padding past whole tiles are empty."""
  block_mask = schedule.block_mask_from_mask(m, tq, tk, block_q, block_k, batch)
  if m.block_mask is not None:
    block_mask = block_mask & m.block_mask
  nq, nk = block_mask.shape[2:]
  block_mask = jnp.pad(block_mask, ((0, 0), (0, 0), (0, tq_pad // block_q - nq),
                                    (0, tk_pad // block_k - nk)))
  return schedule.from_block_mask(block_mask)


def _counted_lists(indices, counts):
  """[B, H, rows, n] + [B, H, rows] -> [B, H, rows, pow2 >= 1 + n] with the count in column 0.

  The GPU kernels read both from one row; the power-of-two width is Triton's.
  """
  rows = jnp.concatenate([counts[..., None], indices], axis=-1)
  width = _next_pow2(rows.shape[-1])
  return jnp.pad(rows, ((0, 0), (0, 0), (0, 0), (0, width - rows.shape[-1])))


def _bhtd(x):
  return jnp.swapaxes(x, 1, 2)


def _run_forward(st: _Static, q, k, v, params, tokens, sched):
  if st.kernel == "mosaic_gpu":
    return gpu_mosaic.forward(st.spec, q, k, v, params, tokens,
                              _counted_lists(sched.indices, sched.counts),
                              block_q=st.block_q, block_k=st.block_k)
  if st.kernel == "triton":
    return gpu_triton.forward(st.spec, q, k, v, params, tokens,
                              _counted_lists(sched.indices, sched.counts),
                              block_q=st.block_q, block_k=st.block_k, interpret=st.interpret,
                              launch=st.launch)
  out, lse = tpu.forward(st.spec, _bhtd(q), _bhtd(k), _bhtd(v), params, tokens, sched.counts,
                         sched.indices, block_q=st.block_q, block_k=st.block_k,
                         interpret=st.interpret)
  return _bhtd(out), lse[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, params, tokens, sched, bwd_sched):
  del bwd_sched
  return _run_forward(st, q, k, v, params, tokens, sched)


def _flash_fwd(st, q, k, v, params, tokens, sched, bwd_sched):
  out, lse = _run_forward(st, q, k, v, params, tokens, sched)
  return (out, lse), (q, k, v, params, tokens, bwd_sched, out, lse)


def _flash_bwd(st, res, cotangents):
  q, k, v, params, tokens, sched, out, lse = res  # sched: the backward's
  block_q, block_k = st.bwd_blocks
  do, dlse = cotangents
  delta = jnp.sum(do.astype(_F32) * out.astype(_F32), axis=-1)  # [B, Tq, Hq]
  delta = jnp.swapaxes(delta, 1, 2) - dlse.astype(_F32)  # [B, Hq, Tq]
  lse_b = jnp.where(lse == -jnp.inf, jnp.inf, lse)
  if st.kernel == "mosaic_gpu":
    dq, dk, dv, dparam_rows = gpu_mosaic.backward(
        st.spec, q, k, v, params, tokens, _counted_lists(sched.indices, sched.counts),
        _counted_lists(sched.t_indices, sched.t_counts), do.astype(q.dtype), lse_b, delta,
        block_q=block_q, block_k=block_k)
  elif st.kernel == "triton":
    dq, dk, dv, dparam_rows = gpu_triton.backward(
        st.spec, q, k, v, params, tokens, _counted_lists(sched.indices, sched.counts),
        _counted_lists(sched.t_indices, sched.t_counts), do, lse_b, delta,
        block_q=block_q, block_k=block_k, interpret=st.interpret, launch=st.launch)
  else:
    dq, dk, dv, dparam_rows = tpu.backward(
        st.spec, _bhtd(q), _bhtd(k), _bhtd(v), params, tokens, sched.counts, sched.indices,
        sched.t_counts, sched.t_indices, _bhtd(do), lse_b[..., None], delta[..., None],
        block_q=block_q, block_k=block_k, interpret=st.interpret)
    dq, dk, dv = _bhtd(dq), _bhtd(dk), _bhtd(dv)
  dparams = jnp.zeros_like(params)
  if dparam_rows is not None:
    dparams = dparams.at[:, :3].set(jnp.sum(dparam_rows[..., :3], axis=(0, 2)))
  if st.spec.has_sinks:
    sink = params[:, tile.SINK][None, :, None]
    dparams = dparams.at[:, tile.SINK].set(-jnp.sum(jnp.exp(sink - lse) * delta, axis=(0, 2)))
  return dq, dk, dv, dparams, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------
# Backends.

_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _common_refusal(call) -> Optional[str]:
  if "dense" in call.mask_kinds:
    return "a dense boolean mask has no block schedule (pass the structured mask, or use xla)"
  if call.bias_shape is not None:
    return ("a dense additive bias is not read by the kernels (pass distance_bias for an in-kernel"
            " f(i - j), or use xla)")
  if call.q_len == 0 or call.kv_len == 0:
    return "empty sequences"
  if call.q_dtype != call.kv_dtype:
    return f"q dtype {call.q_dtype} differs from k/v dtype {call.kv_dtype}"
  if max(call.head_dim, call.v_head_dim) > 256:
    return f"head dims above 256 (got {call.head_dim}, {call.v_head_dim})"
  return None


class PallasFlashBackend:
  """One Pallas backend: a kernel style, a platform, interpret or compiled."""

  def __init__(self, name: str, kernel: str, *, interpret: bool):
    self.name = name
    self.kernel = kernel
    self.interpret = interpret

  def blocks(self, call) -> Tuple[int, int]:
    """The tile sizes for `call`: the caller's, the block mask's, or the backend default.

    Defaults are capped by the sequence: Triton tiles are powers of two >= 16;
    TPU query tiles multiples of 8 and key tiles of 128; the interpret twins
    use multiples of 8 so tests can cut short sequences into several tiles.
    """
    if call.block_shape is not None and call.block_q is None and call.block_k is None:
      return call.block_shape
    if self.kernel == "mosaic_gpu":
      default_q, default_k = gpu_mosaic.default_blocks(max(call.head_dim, call.v_head_dim))
      return call.block_q or default_q, call.block_k or default_k
    if self.interpret:
      fit_q = fit_k = lambda t: _round_up(t, 8)  # noqa: E731
    elif self.kernel == "triton":
      fit_q = fit_k = lambda t: _next_pow2(max(t, 16))  # noqa: E731
    else:
      fit_q, fit_k = (lambda t: _round_up(t, 8)), (lambda t: _round_up(t, 128))
    default_q, default_k = (128, 128) if self.kernel == "tpu" else (64, 64)
    if self._triton_tuned(call):
      default_q = 128  # measured on an H100: bench/results/flash_triton_tuning.jsonl
    bq = call.block_q or min(default_q, fit_q(call.q_len))
    bk = call.block_k or min(default_k, fit_k(call.kv_len))
    return bq, bk

  def _triton_tuned(self, call) -> bool:
    """Compiled Triton with default tiles at head dims <= 128: forward and backward tiles differ."""
    return (self.kernel == "triton" and not self.interpret and call.block_q is None
            and call.block_k is None and call.block_shape is None
            and max(call.head_dim, call.v_head_dim) <= 128)

  def bwd_blocks(self, call) -> Optional[Tuple[int, int]]:
    """The backward kernels' tiles where they differ from the forward's, else None."""
    if not self._triton_tuned(call):
      return None
    return min(64, _next_pow2(max(call.q_len, 16))), min(64, _next_pow2(max(call.kv_len, 16)))

  def is_supported(self, call) -> Tuple[bool, str]:
    reason = _common_refusal(call)
    if reason:
      return False, reason
    if call.q_dtype not in _FLOATS:
      return False, f"dtype {call.q_dtype}"
    if self.kernel == "tpu" and call.q_dtype == jnp.dtype(jnp.float16):
      return False, "float16 on TPU"
    bq, bk = self.blocks(call)
    if call.block_shape is not None and call.block_shape != (bq, bk):
      return False, (f"the block mask's block shape {call.block_shape} differs from the tiles"
                     f" {(bq, bk)}")
    if self.interpret:
      return True, ""
    if self.kernel == "mosaic_gpu":
      return gpu_mosaic.is_supported(call, bq, bk)
    if self.kernel == "triton":
      pltriton, why = triton_backend()
      if pltriton is None:
        return False, why
      if call.group_size & (call.group_size - 1):
        return False, f"query heads per kv head ({call.group_size}) is not a power of two"
      for name, blk in (("block_q", bq), ("block_k", bk)):
        if blk & (blk - 1) or blk < 16:
          return False, f"{name}={blk} is not a power of two >= 16"
    elif bq % 8 or bk % 128:
      return False, f"TPU tiles need block_q % 8 == 0 and block_k % 128 == 0 (got {bq}, {bk})"
    return True, ""

  def __call__(self, q, k, v, *, call, mask_args, bias, scale, logits_soft_cap, sinks,
               distance_bias, return_lse, block_q, block_k):
    del bias, block_q, block_k  # refused / decided by `blocks`
    bq, bk = self.blocks(call)
    if self.interpret:
      multiple = 1
    elif self.kernel == "mosaic_gpu":
      multiple = gpu_mosaic.HEAD_DIM_MULTIPLE
    elif self.kernel == "triton":
      multiple = _next_pow2(max(call.head_dim, call.v_head_dim, 16))
    else:
      multiple = 128
    return attention(q, k, v, mask_args=mask_args, scale=scale, logits_soft_cap=logits_soft_cap,
                     sinks=sinks, distance_bias=distance_bias, return_lse=return_lse,
                     block_q=bq, block_k=bk, kernel=self.kernel, interpret=self.interpret,
                     head_dim_multiple=multiple, bwd_blocks=self.bwd_blocks(call))


PALLAS_TPU = PallasFlashBackend("pallas_tpu", "tpu", interpret=False)
PALLAS_TRITON = PallasFlashBackend("pallas_triton", "triton", interpret=False)
PALLAS_MOSAIC_GPU = PallasFlashBackend("pallas_mosaic_gpu", "mosaic_gpu", interpret=False)
PALLAS_INTERPRET = PallasFlashBackend("pallas_interpret", "triton", interpret=True)
PALLAS_TPU_INTERPRET = PallasFlashBackend("pallas_tpu_interpret", "tpu", interpret=True)
