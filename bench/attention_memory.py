"""Peak memory and time of attention forward+backward: the XLA flash path vs the dense reference.

    python bench/attention_memory.py            # T = 1k .. 32k (several minutes on 2 CPU cores)
    python bench/attention_memory.py --quick    # T = 1k, 2k (a smoke run)

Measures jax.grad(sum(attention(q, k, v)), (q, k, v)) with B=1, H=8, D=64,
causal, float32, for `xla.attention` (FlashAttention-2 in plain XLA, O(T)
memory) and `reference.attention` (dense, O(T^2)).

Peak memory is what the compiled executable reserves,
    temp + argument + output bytes   (Compiled.memory_analysis()),
which XLA knows before running anything, so the dense form is measured even
where it could not run on this machine. A program whose estimate exceeds
--run-limit-gib (default 12) is compiled only and gets no time. Time is the
median of --repeats runs after one warm-up run.

Appends one JSON line per (implementation, T) to
bench/results/attention_memory.jsonl, with the git revision (plus "-dirty"
when tracked files have uncommitted changes), device, jax version, shapes,
dtype, peak bytes, time, and the xla/dense ratios for that T. A benchmark
never asserts anything about time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from pallas_kernels.flash import masking, reference, xla  # noqa: E402

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_LENGTHS = (1024, 2048)
B, H, D = 1, 8, 64
GIB = 1024 ** 3


def attention_fn(impl: str, t: int):
  """q, k, v -> (dq, dk, dv) of sum(attention(q, k, v)), causal."""
  mask_args = masking.make_mask_args(B, t, t, is_causal=True)
  if impl == "xla":
    attend = lambda q, k, v: xla.attention(q, k, v, mask_args=mask_args)
  else:
    attend = lambda q, k, v: reference.attention(q, k, v, mask_args=mask_args)
  return jax.grad(lambda q, k, v: attend(q, k, v).sum(), argnums=(0, 1, 2))


def measure(impl: str, t: int, repeats: int, run_limit_bytes: int) -> dict:
  shape = jax.ShapeDtypeStruct((B, t, H, D), jnp.float32)
  start = time.perf_counter()
  compiled = jax.jit(attention_fn(impl, t)).lower(shape, shape, shape).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
  record = dict(impl=impl, seq_len=t, peak_bytes=peak, temp_bytes=mem.temp_size_in_bytes,
                compile_s=round(compile_s, 2), ran=False, time_s=None, times_s=None)
  if peak > run_limit_bytes:
    record["note"] = f"compiled only: estimate {peak / GIB:.1f} GiB > {run_limit_bytes / GIB:.0f} GiB"
    return record
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((B, t, H, D), np.float32)) for _ in range(3))
  jax.block_until_ready(compiled(q, k, v))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    times.append(time.perf_counter() - start)
  del q, k, v
  gc.collect()
  record.update(ran=True, time_s=statistics.median(times), times_s=[round(x, 4) for x in times])
  return record


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="T up to 2k only (a smoke run)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--run-limit-gib", type=float, default=12.0,
                      help="compile only (do not run) a program whose estimate is above this")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "attention_memory.jsonl"))
  args = parser.parse_args(argv)

  shared = dict(common.environment(), bench="attention_memory", batch=B, heads=H, kv_heads=H, head_dim=D, dtype="float32", causal=True,
                measure="jax.grad(sum(out), (q, k, v)); peak = temp + argument + output bytes",
                mode="quick" if args.quick else "full")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  print(f"{'T':>6} {'impl':>5} {'peak GiB':>9} {'time s':>8}  note")
  for t in (QUICK_LENGTHS if args.quick else LENGTHS):
    records = {impl: measure(impl, t, args.repeats, int(args.run_limit_gib * GIB))
               for impl in ("xla", "dense")}
    x, d = records["xla"], records["dense"]
    ratios = dict(peak_bytes=x["peak_bytes"] / d["peak_bytes"],
                  time_s=(x["time_s"] / d["time_s"]) if x["ran"] and d["ran"] else None)
    with open(args.out, "a") as f:
      for rec in records.values():
        f.write(json.dumps(dict(shared, **rec, ratio_xla_to_dense=ratios)) + "\n")
        time_str = f"{rec['time_s']:8.3f}" if rec["ran"] else f"{'-':>8}"
        print(f"{t:>6} {rec['impl']:>5} {rec['peak_bytes'] / GIB:9.3f} {time_str}  {rec.get('note', '')}",
              flush=True)


if __name__ == "__main__":
  main()
