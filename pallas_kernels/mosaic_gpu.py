"""Pallas Mosaic GPU pieces shared by the Hopper kernels (flash/ and decode/gpu_mosaic.py).

The kernels are warp-specialized: one producer warpgroup streams blocks from
global into shared memory with TMA, through a ring of `stages` slots, while
the compute warpgroups run wgmma on them. Step t of a walk always uses slot
t % stages; a slot's "ready" barrier completes when its copy lands, its
"free" barrier when every compute warpgroup has arrived after its last read,
and the producer waits on "free" before it refills the slot. The walk is the
same sequence on both sides (`walk`), so the two never disagree on a slot.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32


def plgpu_module():
  """jax.experimental.pallas.mosaic_gpu, imported when a Mosaic GPU kernel is built."""
  from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: PLC0415
  return plgpu


def hopper() -> tuple:
  """(True, "") on a compute capability 9.x GPU with Pallas Mosaic GPU, else (False, why)."""
  try:
    plgpu_module()
  except ImportError as e:  # pragma: no cover - every supported JAX ships it
    return False, f"this JAX has no Pallas Mosaic GPU ({e})"
  if jax.default_backend() != "gpu":
    return False, f"needs a GPU (the default backend is {jax.default_backend()!r})"
  capability = getattr(jax.devices()[0], "compute_capability", "")
  if not str(capability).startswith("9"):
    return False, f"needs compute capability 9.x (Hopper wgmma), got {capability!r}"
  return True, ""


def load(ref, layout, *, optimized=True):
  """All of `ref` (index it first: ref.at[...]) into registers in `layout`.

  JAX 0.10's plgpu.load takes the index as a second argument; 0.11 deprecates it.
  """
  plgpu = plgpu_module()
  if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
    return plgpu.load(ref, (), layout=layout, optimized=optimized)
  return plgpu.load(ref, layout=layout, optimized=optimized)


def smem_transforms(dtype):
  """Shared-memory tiles for wgmma operands: rows of one 128-byte swizzle."""
  plgpu = plgpu_module()
  swizzle = 128
  cols = swizzle // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(swizzle))


def matmul(a, b, shape, acc=None):
  """a @ b on the tensor cores into a float32 accumulator (fresh, or `acc` added to)."""
  plgpu = plgpu_module()

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)

  if acc is not None:
    return pl.run_state(body)(plgpu.ACC.init(acc))

  def fresh(acc_ref):
    body(acc_ref)
    return acc_ref[...]

  return pl.run_scoped(fresh, plgpu.ACC(shape, F32))


def transposed(ref):
  """A [m, n] shared-memory ref read as [n, m] by wgmma (K^T without a copy)."""
  return plgpu_module().transpose_ref(ref, (1, 0))


def zeros(shape, layout):
  """float32 zeros in a register layout (an accumulator's start)."""
  return plgpu_module().layout_cast(jnp.full(shape, 0.0, F32), layout)


def rows_full(value, rows, layout):
  """A float32 vector [rows] of `value` in a row-reduction layout (m, l, per-row sums)."""
  return plgpu_module().layout_cast(jnp.full((rows,), value, F32), layout)


def softmax_step(m, l, acc, s):
  """The online-softmax update of one tile before P V, on wgmma-layout registers.

  m, l [rows] (row-reduction layout), acc [rows, Dv], s [rows, cols] masked
  logits -> (m', l', alpha * acc, P): the flash tile step of
  `pallas_kernels/flash/tile.py` with row statistics as vectors (Mosaic GPU
  layouts have no [rows, 1] shape); the caller adds P V to the rescaled acc.
  """
  m_new = jnp.maximum(m, s.max(axis=1))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp(m - m_safe)
  p = jnp.exp(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
  l = alpha * l + p.sum(axis=1)
  return m_new, l, acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), p


def walk(num_heads, count_of, body, carry):
  """Runs `carry = body(t, g, j, carry)` for g < num_heads (static), j < count_of(g).

  `t` counts every step: the producer and the compute warpgroups walk the same
  sequence, so step t always uses ring slot t % stages.
  """
  t = jnp.int32(0)
  for g in range(num_heads):
    def step(j, c, g=g):
      t, carry = c
      return t + 1, body(t, g, j, carry)
    t, carry = lax.fori_loop(0, count_of(g), step, (t, carry))
  return carry


def producer(num_heads, count_of, stages, rings, sources):
  """The memory warpgroup: streams each step's blocks into ring slot t % stages.

  `rings` are (smem ring, ready barriers, free barriers); `sources(g, j)` the
  step's global-memory blocks, one per ring. A slot is refilled once every
  compute warpgroup has arrived on its free barrier. At the end the producer
  also waits for the releases of the last `stages` steps, so that every
  barrier phase is observed before the barriers go out of scope (GPU interpret
  mode checks this; on the device it costs nothing, the CTA ends with its
  compute warpgroups). The producer gives its registers to them.
  """
  plgpu = plgpu_module()
  plgpu.set_max_registers(40, action="decrease")

  def step(t, g, j, carry):
    slot = lax.rem(t, stages)
    for src, (ring, ready, free) in zip(sources(g, j), rings, strict=True):
      @pl.when(t >= stages)
      def _wait_for_release():
        plgpu.barrier_wait(free.at[slot])
        # Compute warpgroups read some slots with plain loads (token vectors,
        # lse, delta) or rewrite them (decode's stale V rows): the generic
        # proxy. TMA writes through the async proxy; fence.proxy.async orders
        # the two (the GPU interpreter's race detector flags the refill without it).
        plgpu.commit_smem()

      plgpu.copy_gmem_to_smem(src, ring.at[slot], ready.at[slot])
    return carry

  walk(num_heads, count_of, step, None)
  steps = sum(count_of(g) for g in range(num_heads))
  for back in range(stages, 0, -1):
    t = steps - back

    @pl.when(t >= 0)
    def _drain():
      for _, _, free in rings:
        plgpu.barrier_wait(free.at[lax.rem(t, stages)])


def barriers(stages, compute_wgs):
  """(ready, free) barriers per ring slot: ready takes one TMA, free every compute warpgroup."""
  plgpu = plgpu_module()
  return (plgpu.Barrier(num_barriers=stages),
          plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=stages))


def launch(body, scratch, out_type, grid, grid_names, compute_wgs):
  """plgpu.kernel over `grid` with compute_wgs + 1 warpgroups (axis "wg"; the last produces).

  `body(*in_refs, *out_refs, *scratch_refs)`; `scratch` are shared-memory
  buffers and barriers, allocated once per CTA for all its warpgroups.
  """
  plgpu = plgpu_module()

  def entry(*refs):
    pl.run_scoped(lambda *bufs: body(*refs, *bufs), *scratch, collective_axes="wg")

  return plgpu.kernel(entry, out_type=out_type, grid=grid, grid_names=grid_names,
                      num_threads=compute_wgs + 1, thread_name="wg",
                      compiler_params=plgpu.CompilerParams(approx_math=True))


