"""Speed of the project's attention kernels against cuDNN and XLA, measured in the same run.

On the GPU machine (H100), in three invocations that each fit the 10-minute
per-command limit (the run tool only brings back what is under $OUT, so write
there and append the file to bench/results/attention_kernels.jsonl afterwards):

    python bench/attention_kernels.py --kernel flash --batch 1 --out $OUT/attention_kernels.jsonl
    python bench/attention_kernels.py --kernel flash --batch 4 --out $OUT/attention_kernels.jsonl
    python bench/attention_kernels.py --kernel block_sparse --out $OUT/attention_kernels.jsonl

If one runs long, split further with --mode fwd / --mode fwd_bwd, --causal
true / false, --seqs 16384,32768 or --max-seq 8192 (every group of lines is
appended as soon as it is measured, so a cut-off run keeps what it finished).
On a Hopper GPU the Mosaic GPU kernels ("pallas_mosaic_gpu") are measured
first. Until their GPU-marked tests have passed once, run those first, under
a timeout (a wrong barrier hangs a warp-specialized kernel rather than
failing it), and measure them alone with --filter:

    timeout 300 python -m pytest -m gpu -x -q tests/pallas_kernels -k mosaic
    python bench/attention_kernels.py --kernel flash --batch 1 --filter mosaic,jax_cudnn \
        --out $OUT/attention_kernels.jsonl
Here on CPU (automatic smoke mode; prints the lines, records nothing):

    python bench/attention_kernels.py                  # == --smoke
    python bench/attention_kernels.py --smoke --record # -> results/attention_kernels_smoke.jsonl

What it measures (full mode, the default on GPU and TPU):

  * flash: `flash_attention(q, k, v, is_causal=c, implementation=NAME)` for
    NAME = "pallas_mosaic_gpu" and "pallas_triton" (GPU) / "pallas_tpu" (TPU) and "xla" (our
    memory-efficient XLA path), against `jax.nn.dot_product_attention` with
    implementation="cudnn" (GPU only) and implementation="xla" (jax's own,
    which materialises the T x T scores). B in {1, 4}, T in {1k .. 32k},
    H = 16, D = 128, bfloat16, causal and non-causal, layout [B, T, H, D].
  * block_sparse: `block_sparse_attention` with block_shape (128, 128) and
    seeded random lists at 10% and 25% density (per query block and head,
    round(density * nk) distinct key blocks, the diagonal block always among
    them), B = 1, H = 16, D = 128, bfloat16, T in {8k, 16k, 32k}, against
    dense non-causal `flash_attention` with the same implementation and its
    default tiles at the same T. Block-sparse "xla" is the gather path
    (pallas_kernels/block_sparse/xla.py), whose work is the listed fraction
    of dense; on CPU, where only it runs at these sizes, e.g.

      python bench/attention_kernels.py --full --kernel block_sparse --seqs 4096,8192 \
          --heads 4 --dtype float32 --filter block_sparse/xla --repeats 3

Each is timed forward ("fwd": the output) and forward+backward ("fwd_bwd":
jax.grad of sum(out * ct) w.r.t. (q, k, v), ct a fixed random array passed
as an argument). A function is jitted and compiled ahead of time (compile_s),
run once to warm up, then timed --repeats times (default 10) with
block_until_ready; median_ms is the median. tflops uses 4 B H T^2 D FLOPs
for a non-causal forward, half that when causal, x2.5 for fwd_bwd, and x the
fraction of blocks listed for block-sparse.

A combination that a backend refuses (ValueError / NotImplementedError from
the dispatch or from jax.nn), or that does not fit in memory (the compiled
program's own estimate above the device's limit, or an out-of-memory error
from XLA -- jax's "xla" implementation at long T), gets a line with
"skipped": reason and no time. Any other exception gets "error": message.

Ratios, per shape in the same run (null where a baseline was skipped or
filtered out):
  speed_vs_cudnn   = cudnn time / this time   (> 1: faster than cuDNN)
  speed_vs_jax_xla = jax xla time / this time
  speedup_vs_dense = dense flash time / block-sparse time (same implementation)

Targets it reports against (the issue): Pallas flash fwd_bwd speed_vs_cudnn
>= 0.9 at T >= 4k on H100; block-sparse at 10% density speedup_vs_dense
>= 5 at T = 32k. The summary at the end prints these; nothing is asserted.

Every line carries bench/common.py's environment() (git revision with
"-dirty", jax version, device) and is appended with common.append.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from pallas_kernels import block_sparse_attention, flash_attention  # noqa: E402

FULL = dict(batches=(1, 4), seqs=(1024, 2048, 4096, 8192, 16384, 32768), heads=16, head_dim=128,
            dtype="bfloat16", sparse_seqs=(8192, 16384, 32768), sparse_block=(128, 128),
            repeats=10)
SMOKE = dict(batches=(1,), seqs=(128, 256), heads=2, head_dim=64, dtype="float32",
             sparse_seqs=(256,), sparse_block=(64, 64), repeats=2)
DENSITIES = (0.10, 0.25)
GIB = 1024 ** 3
TARGETS = {"flash_fwd_bwd_speed_vs_cudnn_min": 0.9, "flash_target_min_seq": 4096,
           "block_sparse_10pct_speedup_vs_dense_min": 5.0, "block_sparse_target_seq": 32768}


# ---------------------------------------------------------------------------
# Implementations.

def pallas_names(platform: str, smoke: bool) -> List[str]:
  """Our Pallas backends on this platform (on Hopper the Mosaic GPU kernels come first)."""
  if smoke or platform == "cpu":
    return ["pallas_interpret"]
  return {"gpu": ["pallas_mosaic_gpu", "pallas_triton"],
          "tpu": ["pallas_tpu"]}.get(platform, ["pallas_interpret"])


def flash_implementations(platform: str, smoke: bool) -> List[str]:
  """Ours first, then jax.nn's baselines ("jax_cudnn" only on GPU)."""
  names = [*pallas_names(platform, smoke), "xla"]
  if platform == "gpu" and not smoke:
    names.append("jax_cudnn")
  names.append("jax_xla")
  return names


def flash_fn(impl: str, causal: bool) -> Callable:
  if impl.startswith("jax_"):
    jax_impl = impl[len("jax_"):]
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                        implementation=jax_impl)
  return lambda q, k, v: flash_attention(q, k, v, is_causal=causal, implementation=impl)


def sparse_fn(impl: str, block_shape: Tuple[int, int]) -> Callable:
  return lambda q, k, v, idx, cnt: block_sparse_attention(
      q, k, v, idx, cnt, block_shape=block_shape, implementation=impl)


def with_mode(fn: Callable, mode: str, n_extra: int = 0) -> Callable:
  """fwd: fn itself. fwd_bwd: (q, k, v, *extra, ct) -> grads of sum(out * ct) w.r.t. q, k, v."""
  if mode == "fwd":
    return fn

  def loss(q, k, v, *rest):
    extra, ct = rest[:n_extra], rest[n_extra]
    out = fn(q, k, v, *extra)
    return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32))

  return jax.grad(loss, argnums=(0, 1, 2))


def random_lists(key, b: int, h: int, t: int, block_shape: Tuple[int, int], density: float):
  """Seeded lists: per (b, h, query block) round(density * nk) distinct key blocks, diagonal included."""
  bq, bk = block_shape
  nq, nk = -(-t // bq), -(-t // bk)
  n_sel = int(min(nk, max(1, round(density * nk))))
  keys = np.array(jax.random.uniform(key, (b, h, nq, nk)))
  rows = np.arange(nq)
  keys[:, :, rows, np.minimum(rows * bq // bk, nk - 1)] = -1.0  # the diagonal block sorts first
  idx = np.sort(np.argsort(keys, axis=-1)[..., :n_sel], axis=-1).astype(np.int32)
  cnt = np.full((b, h, nq), n_sel, np.int32)
  return jnp.asarray(idx), jnp.asarray(cnt), n_sel / nk


# ---------------------------------------------------------------------------
# Timing.

def _is_oom(e: BaseException) -> bool:
  s = str(e)
  return ("RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower()
          or "Out of memory" in s or "OOM" in s)


def _short(e: BaseException, n: int = 400) -> str:
  s = " ".join(str(e).split())
  return f"{type(e).__name__}: {s[:n]}{'...' if len(s) > n else ''}"


def device_memory_limit() -> Optional[int]:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 -- not every backend has it
    return None
  return (stats or {}).get("bytes_limit")


def time_fn(fn: Callable, args: Sequence[Any], repeats: int,
            mem_limit: Optional[int]) -> Dict[str, Any]:
  """Compile (timed), warm up once, time `repeats` runs. Never raises: returns skipped/error."""
  try:
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
  except (ValueError, NotImplementedError) as e:
    return {"skipped": "unsupported: " + _short(e)}
  except Exception as e:  # noqa: BLE001
    if _is_oom(e):
      return {"skipped": "out of memory at compile: " + _short(e)}
    return {"error": "compile: " + _short(e)}
  rec: Dict[str, Any] = {"compile_s": round(compile_s, 3)}
  try:
    mem = compiled.memory_analysis()
    est = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    rec["est_bytes"] = int(est)
  except Exception:  # noqa: BLE001 -- not available everywhere
    est = None
  if est is not None and mem_limit and est > mem_limit:
    rec["skipped"] = (f"exceeds memory: compiled estimate {est / GIB:.1f} GiB > device limit"
                      f" {mem_limit / GIB:.1f} GiB")
    return rec
  try:
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - start)
  except Exception as e:  # noqa: BLE001
    if _is_oom(e):
      rec["skipped"] = "out of memory at run: " + _short(e)
    else:
      rec["error"] = "run: " + _short(e)
    return rec
  finally:
    del compiled
  rec.update(median_ms=statistics.median(times) * 1e3,
             times_ms=[round(x * 1e3, 4) for x in times])
  return rec


def attention_flops(b: int, h: int, t: int, d: int, causal: bool, mode: str,
                    fraction: float = 1.0) -> float:
  flops = 4.0 * b * h * t * t * d * fraction
  if causal:
    flops *= 0.5
  if mode == "fwd_bwd":
    flops *= 2.5
  return flops


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
  return round(num / den, 4) if num and den else None


# ---------------------------------------------------------------------------
# Runner.

class Runner:

  def __init__(self, args, cfg, env, platform):
    self.args, self.cfg, self.env, self.platform = args, cfg, env, platform
    self.dtype = jnp.dtype(cfg["dtype"])
    self.mem_limit = device_memory_limit()
    self.filters = [f for f in (args.filter or "").split(",") if f]
    self.count = 0
    self.summary: List[Dict[str, Any]] = []

  def wanted(self, kernel: str, impl: str) -> bool:
    label = f"{kernel}/{impl}"
    return not self.filters or any(f in label for f in self.filters)

  def emit(self, record: Dict[str, Any]) -> None:
    self.summary.append(record)
    if self.args.record:
      common.append(self.args.out, record)
    else:
      import json
      print(json.dumps(record), flush=True)

  def measure(self, fn, args, *, label: str, flops: float) -> Dict[str, Any]:
    self.count += 1
    print(f"[{self.count:3d}] {label} ...", end=" ", flush=True)
    rec = time_fn(fn, args, self.cfg["repeats"], self.mem_limit)
    if "median_ms" in rec:
      rec["tflops"] = float(f"{flops / (rec['median_ms'] * 1e-3) / 1e12:.4g}")
      print(f"{rec['median_ms']:.3f} ms, {rec['tflops']:.4g} TFLOP/s, compile {rec['compile_s']:.1f} s",
            flush=True)
    else:
      print(rec.get("skipped") or rec.get("error"), flush=True)
    gc.collect()
    return rec

  def inputs(self, key, b, t, h, d):
    kq, kk, kv, kc = jax.random.split(key, 4)
    shape = (b, t, h, d)
    return tuple(jax.random.normal(x, shape, jnp.float32).astype(self.dtype)
                 for x in (kq, kk, kv, kc))

  def base(self, **kw) -> Dict[str, Any]:
    return dict(self.env, bench="attention_kernels", run_mode="smoke" if self.args.smoke else "full",
                dtype=self.cfg["dtype"], H=self.cfg["heads"], D=self.cfg["head_dim"],
                repeats=self.cfg["repeats"], **kw)

  # -- flash ---------------------------------------------------------------

  def run_flash(self, batches, seqs, causals, modes) -> None:
    h, d = self.cfg["heads"], self.cfg["head_dim"]
    impls = [i for i in flash_implementations(self.platform, self.args.smoke)
             if self.wanted("flash", i)]
    if not impls:
      return
    for b in batches:
      for t in seqs:
        q, k, v, ct = self.inputs(jax.random.PRNGKey(t * 10 + b), b, t, h, d)
        for causal in causals:
          for mode in modes:
            flops = attention_flops(b, h, t, d, causal, mode)
            recs = {}
            for impl in impls:
              fn = with_mode(flash_fn(impl, causal), mode)
              args = (q, k, v) if mode == "fwd" else (q, k, v, ct)
              recs[impl] = self.measure(
                  fn, args, flops=flops,
                  label=f"flash/{impl} B={b} T={t} causal={causal} {mode}")
            cudnn = recs.get("jax_cudnn", {}).get("median_ms")
            jxla = recs.get("jax_xla", {}).get("median_ms")
            for impl, rec in recs.items():
              ms = rec.get("median_ms")
              self.emit(self.base(
                  section="flash", kernel="flash", implementation=impl,
                  source="jax.nn" if impl.startswith("jax_") else "pallas_kernels",
                  B=b, T=t, causal=causal, mode=mode, density=1.0, flops=flops,
                  median_ms=ms, compile_s=rec.get("compile_s"), tflops=rec.get("tflops"),
                  speed_vs_cudnn=None if impl == "jax_cudnn" else _ratio(cudnn, ms),
                  speed_vs_jax_xla=None if impl == "jax_xla" else _ratio(jxla, ms),
                  **{key: rec[key] for key in ("times_ms", "est_bytes", "skipped", "error")
                     if key in rec}))
        del q, k, v, ct
        gc.collect()

  # -- block-sparse --------------------------------------------------------

  def run_block_sparse(self, seqs, modes) -> None:
    h, d, b = self.cfg["heads"], self.cfg["head_dim"], 1
    block = tuple(self.cfg["sparse_block"])
    impls = [i for i in (*pallas_names(self.platform, self.args.smoke), "xla")
             if self.wanted("block_sparse", i)]
    for t in seqs:
      q, k, v, ct = self.inputs(jax.random.PRNGKey(t * 10 + 7), b, t, h, d)
      lists = {dens: random_lists(jax.random.PRNGKey(int(dens * 1000) + t), b, h, t, block, dens)
               for dens in DENSITIES}
      for mode in modes:
        for impl in impls:
          dense_flops = attention_flops(b, h, t, d, False, mode)
          dense_fn = with_mode(flash_fn(impl, False), mode)
          dense = self.measure(dense_fn, (q, k, v) if mode == "fwd" else (q, k, v, ct),
                               flops=dense_flops,
                               label=f"block_sparse/{impl} dense flash B={b} T={t} {mode}")
          dense_ms = dense.get("median_ms")
          rows = [("flash", 1.0, 1.0, None, dense, dense_flops)]
          for dens, (idx, cnt, frac) in lists.items():
            flops = attention_flops(b, h, t, d, False, mode, frac)
            fn = with_mode(sparse_fn(impl, block), mode, n_extra=2)
            args = (q, k, v, idx, cnt) if mode == "fwd" else (q, k, v, idx, cnt, ct)
            rec = self.measure(fn, args, flops=flops,
                               label=f"block_sparse/{impl} density={dens} B={b} T={t} {mode}")
            rows.append(("block_sparse", dens, frac, block, rec, flops))
          for kernel, dens, frac, blk, rec, flops in rows:
            ms = rec.get("median_ms")
            self.emit(self.base(
                section="block_sparse", kernel=kernel, implementation=impl,
                source="pallas_kernels", B=b, T=t, causal=False, mode=mode, density=dens,
                block_fraction=round(frac, 5),
                block_shape=list(blk) if blk else "default tiles (dense baseline)",
                flops=flops, median_ms=ms, compile_s=rec.get("compile_s"),
                tflops=rec.get("tflops"),
                speedup_vs_dense=_ratio(dense_ms, ms) if kernel == "block_sparse" else None,
                **{key: rec[key] for key in ("times_ms", "est_bytes", "skipped", "error")
                   if key in rec}))
      del q, k, v, ct, lists
      gc.collect()

  # -- summary -------------------------------------------------------------

  def _print_flash_rows(self, pallas: str) -> None:
    rows = [r for r in self.summary if r["section"] == "flash" and r["implementation"] == pallas]
    if not rows:
      return
    print(f"  flash {pallas}: speed_vs_cudnn = cudnn time / ours (target >= "
          f"{TARGETS['flash_fwd_bwd_speed_vs_cudnn_min']} for fwd_bwd at T >= "
          f"{TARGETS['flash_target_min_seq']}); speed_vs_jax_xla = jax xla time / ours")
    for r in rows:
      target = ""
      if (r["mode"] == "fwd_bwd" and r["T"] >= TARGETS["flash_target_min_seq"]
          and r.get("speed_vs_cudnn") is not None):
        ok = r["speed_vs_cudnn"] >= TARGETS["flash_fwd_bwd_speed_vs_cudnn_min"]
        target = "  [target met]" if ok else "  [below target]"
      ms = f"{r['median_ms']:9.3f} ms" if r.get("median_ms") else f"{'-':>12}"
      print(f"    B={r['B']} T={r['T']:>6} causal={str(r['causal']):5} {r['mode']:7} {ms}"
            f"  vs_cudnn={r.get('speed_vs_cudnn')}  vs_jax_xla={r.get('speed_vs_jax_xla')}"
            f"{target}{'  ' + (r.get('skipped') or r.get('error') or '') if not r.get('median_ms') else ''}",
            flush=True)

  def print_summary(self) -> None:
    print("\nSummary (reported, not asserted):", flush=True)
    for pallas in pallas_names(self.platform, self.args.smoke):
      self._print_flash_rows(pallas)
    rows = [r for r in self.summary if r["section"] == "block_sparse" and r["kernel"] == "block_sparse"]
    if rows:
      print(f"  block_sparse: speedup_vs_dense = dense flash time / sparse time (target >= "
            f"{TARGETS['block_sparse_10pct_speedup_vs_dense_min']} at density 0.1, T ="
            f" {TARGETS['block_sparse_target_seq']})")
      for r in rows:
        target = ""
        if (r["density"] == 0.1 and r["T"] == TARGETS["block_sparse_target_seq"]
            and r.get("speedup_vs_dense") is not None):
          ok = r["speedup_vs_dense"] >= TARGETS["block_sparse_10pct_speedup_vs_dense_min"]
          target = "  [target met]" if ok else "  [below target]"
        ms = f"{r['median_ms']:9.3f} ms" if r.get("median_ms") else f"{'-':>12}"
        print(f"    {r['implementation']:16} T={r['T']:>6} density={r['density']:.2f}"
              f" (blocks {r['block_fraction']:.3f}) {r['mode']:7} {ms}"
              f"  speedup_vs_dense={r.get('speedup_vs_dense')}{target}", flush=True)


def _ints(s: str) -> Tuple[int, ...]:
  return tuple(int(x) for x in s.split(",") if x)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny float32 shapes, interpret-mode Pallas (automatic on CPU)")
  parser.add_argument("--full", action="store_true", help="full shapes even on CPU (very slow)")
  parser.add_argument("--kernel", choices=("all", "flash", "block_sparse"), default="all")
  parser.add_argument("--batch", type=_ints, default=None, help="flash batch sizes, e.g. 1 or 1,4")
  parser.add_argument("--seqs", type=_ints, default=None, help="sequence lengths, e.g. 4096,8192")
  parser.add_argument("--max-seq", type=int, default=None, help="drop lengths above this")
  parser.add_argument("--causal", choices=("both", "true", "false"), default="both",
                      help="flash masks to run (block-sparse is always non-causal)")
  parser.add_argument("--mode", choices=("both", "fwd", "fwd_bwd"), default="both")
  parser.add_argument("--filter", default=None,
                      help="comma-separated substrings of 'kernel/implementation', e.g."
                           " 'pallas,jax_cudnn' or 'block_sparse/pallas_triton'")
  parser.add_argument("--heads", type=int, default=None, help="H (default 16; 2 in smoke mode)")
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                      help="default bfloat16 (float32 in smoke mode)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed runs after warm-up (default 10; 2 in smoke mode)")
  parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=None,
                      help="append JSON lines to --out (default: yes in full mode, no in smoke"
                           " mode, where lines are only printed)")
  parser.add_argument("--out", default=None,
                      help="JSON-lines file (default bench/results/attention_kernels.jsonl, or"
                           " attention_kernels_smoke.jsonl in smoke mode)")
  args = parser.parse_args(argv)

  platform = jax.devices()[0].platform
  args.smoke = args.smoke or (platform == "cpu" and not args.full)
  cfg = dict(SMOKE if args.smoke else FULL)
  if args.repeats:
    cfg["repeats"] = args.repeats
  if args.heads:
    cfg["heads"] = args.heads
  if args.dtype:
    cfg["dtype"] = args.dtype
  if args.record is None:
    args.record = not args.smoke
  if args.out is None:
    args.out = os.path.join(common.RESULTS, "attention_kernels_smoke.jsonl" if args.smoke
                            else "attention_kernels.jsonl")
  args.out = os.path.abspath(args.out)  # common.append joins it onto bench/results otherwise
  if args.record:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)

  def lengths(default):
    seqs = args.seqs or default
    return tuple(t for t in seqs if args.max_seq is None or t <= args.max_seq)

  causals = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
  modes = ("fwd", "fwd_bwd") if args.mode == "both" else (args.mode,)
  env = common.environment()
  runner = Runner(args, cfg, env, platform)
  print(f"attention_kernels: {env['device']}, jax {env['jax']}, git {env['git']},"
        f" {'smoke' if args.smoke else 'full'} mode, {cfg['dtype']}, H={cfg['heads']}"
        f" D={cfg['head_dim']}, repeats={cfg['repeats']}, memory limit"
        f" {f'{runner.mem_limit / GIB:.1f} GiB' if runner.mem_limit else 'unknown'},"
        f" {'appending to ' + args.out if args.record else 'printing only (no --record)'}",
        flush=True)
  start = time.perf_counter()
  if args.kernel in ("all", "flash"):
    runner.run_flash(args.batch or cfg["batches"], lengths(cfg["seqs"]), causals, modes)
  if args.kernel in ("all", "block_sparse"):
    runner.run_block_sparse(lengths(cfg["sparse_seqs"]), modes)
  runner.print_summary()
  print(f"done: {runner.count} measurements in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
  main()
