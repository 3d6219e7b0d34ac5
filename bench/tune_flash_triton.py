"""Tile and launch sweep for the Triton flash kernels (the defaults in gpu_triton/pallas.py).

On the GPU machine, one invocation (about 4 minutes on an H100):

    python bench/tune_flash_triton.py --out $OUT/flash_triton_tuning.jsonl  # recorded at 2531fe4

For each tile shape (block_q, block_k) it times the forward at every
(num_warps, num_stages), then forward+backward at every backward setting with
the forward fixed at that tile's fastest setting, causal and not, at one shape
(default B=1, T=8192, H=16, D=128, bfloat16: the middle of
bench/attention_kernels.py's range). A setting Triton cannot build (too much
shared memory, too many registers) gets "error". The summary prints the best
per pass; `gpu_triton.default_launch` and `PallasFlashBackend.blocks` take
their values from it. It measures; it chooses nothing by itself.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from bench.attention_kernels import attention_flops, device_memory_limit, time_fn  # noqa: E402
from pallas_kernels.flash import masking  # noqa: E402
from pallas_kernels.flash import pallas as flash_pallas  # noqa: E402
from pallas_kernels.flash.gpu_triton import Launch  # noqa: E402

TILES = ((64, 64), (128, 64), (64, 128), (128, 128))
WARPS = (4, 8)
FWD_STAGES = (2, 3, 4)
BWD_STAGES = (1, 2, 3)


def attention_fn(causal, bq, bk, launch, d):
  def fn(q, k, v):
    b, t = q.shape[0], q.shape[1]
    m = masking.make_mask_args(b, t, t, is_causal=causal)
    return flash_pallas.attention(q, k, v, mask_args=m, block_q=bq, block_k=bk, kernel="triton",
                                  interpret=False, head_dim_multiple=d, launch=launch)
  return fn


def fwd_bwd(fn):
  def loss(q, k, v, ct):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=8192)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--out", default="flash_triton_tuning.jsonl",
                 help="file name under bench/results/, or an absolute path")
  args = p.parse_args(argv)
  if jax.devices()[0].platform != "gpu":
    raise SystemExit("tune_flash_triton.py times compiled Triton kernels: it needs a GPU")
  b, t, h, d = args.batch, args.seq, args.heads, args.head_dim
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, ct = (jax.random.normal(x, (b, t, h, d), jnp.float32).astype(jnp.bfloat16)
                 for x in keys)
  env = common.environment()
  mem = device_memory_limit()
  best = {}
  for causal in (False, True):
    for bq, bk in TILES:
      fwd_times = {}
      for warps, stages in itertools.product(WARPS, FWD_STAGES):
        launch = Launch(fwd_warps=warps, fwd_stages=stages)
        rec = time_fn(attention_fn(causal, bq, bk, launch, d), (q, k, v), args.repeats, mem)
        fwd_times[launch] = rec.get("median_ms")
        emit(args, env, rec, b, t, h, d, causal, "fwd", bq, bk, launch)
      done = {x: y for x, y in fwd_times.items() if y}
      if not done:
        continue
      fwd_best = min(done, key=done.get)
      for warps, stages in itertools.product(WARPS, BWD_STAGES):
        launch = Launch(fwd_best.fwd_warps, fwd_best.fwd_stages, warps, stages)
        rec = time_fn(fwd_bwd(attention_fn(causal, bq, bk, launch, d)), (q, k, v, ct),
                      args.repeats, mem)
        emit(args, env, rec, b, t, h, d, causal, "fwd_bwd", bq, bk, launch)
        for mode, ms in (("fwd", done[fwd_best]), ("fwd_bwd", rec.get("median_ms"))):
          key = (causal, mode)
          if ms and (key not in best or ms < best[key][0]):
            best[key] = (ms, (bq, bk), launch)
  print("\nFastest per pass (reported, not applied):")
  for (causal, mode), (ms, tiles, launch) in sorted(best.items()):
    print(f"  causal={causal!s:5} {mode:7} {ms:8.3f} ms  tiles={tiles}  {launch}")


def emit(args, env, rec, b, t, h, d, causal, mode, bq, bk, launch):
  flops = attention_flops(b, h, t, d, causal, mode)
  ms = rec.get("median_ms")
  line = dict(env, bench="flash_triton_tuning", B=b, T=t, H=h, D=d, dtype="bfloat16",
              causal=causal, mode=mode, block_q=bq, block_k=bk, fwd_warps=launch.fwd_warps,
              fwd_stages=launch.fwd_stages, bwd_warps=launch.bwd_warps,
              bwd_stages=launch.bwd_stages, median_ms=ms,
              tflops=round(flops / (ms * 1e-3) / 1e12, 1) if ms else None,
              **{key: rec[key] for key in ("compile_s", "skipped", "error") if key in rec})
  result = (f"{ms:.3f} ms {line['tflops']} TFLOP/s" if ms
            else rec.get("skipped") or rec.get("error"))
  print(f"causal={causal!s:5} {mode:7} tiles=({bq},{bk}) fwd={launch.fwd_warps}w/"
        f"{launch.fwd_stages}s bwd={launch.bwd_warps}w/{launch.bwd_stages}s: {result}", flush=True)
  common.append(args.out, line)


if __name__ == "__main__":
  main()
