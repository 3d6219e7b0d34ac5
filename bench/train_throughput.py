"""Tokens/s and model FLOPs utilisation of a full LM train step on this machine.

    python bench/train_throughput.py                 # 6 layers, width 512, T=512, batch 8
    python bench/train_throughput.py --seq 2048 --batch 2 --kv-heads 2
    python bench/train_throughput.py --torch         # + the PyTorch peer in the same run

The step is the loop's own (zoo/training/loop.py: forward, backward, AdamW
update), jitted, on random byte tokens; time is the median of --steps steps
after warm-up. MFU = model FLOPs per token (6N + 12 L H Dh T, the PaLM
convention) x tokens/s / the machine's matmul peak, which this script
measures in the same run (best of a few jitted 4096^3 float32 matmuls).

Baselines in the same process: the same model with the dense reference
attention (`implementation=reference`), and with --torch a PyTorch
Llama-style model of the same shapes (bench/torch_peer.py: eager, SDPA,
AdamW), the peer users compare us with (STACK-NOTES.md). Appends JSON lines to
bench/results/train_throughput.jsonl. Never asserts a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from configs import lm_small  # noqa: E402
from zoo.training import sharding as shd  # noqa: E402
from zoo.training.flops import measured_peak_flops  # noqa: E402
from zoo.training.loop import make_train_step  # noqa: E402
from zoo.training.optimizer import make_schedule  # noqa: E402
from zoo.training.state import init_train_state, make_model_setup  # noqa: E402
from zoo.training.tasks import get_task  # noqa: E402


def make_config(args, implementation: str):
  c = lm_small.get_config()
  c.seq_len, c.batch_size = args.seq, args.batch
  c.model.vocab_size = 259
  c.model.num_kv_heads = args.kv_heads
  c.model.implementation = implementation
  c.model.max_seq_len = max(c.model.max_seq_len, args.seq)
  return c


def random_batch(config, rng):
  toks = rng.integers(3, 259, size=(config.batch_size, config.seq_len + 1), dtype=np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "weights": np.ones((config.batch_size, config.seq_len), np.float32)}


def time_jax_step(config, steps: int, warmup: int):
  mesh = shd.make_mesh(config.mesh)
  setup = make_model_setup(config, mesh)
  state = init_train_state(setup, mesh)
  step = jax.jit(make_train_step(setup, get_task("lm"), config,
                                 make_schedule(config.optimizer, config.total_steps)),
                 donate_argnums=0)
  rng = np.random.default_rng(0)
  batch = shd.host_to_global(random_batch(config, rng), shd.batch_sharding(mesh))
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  return statistics.median(times), setup.abstract_model.train_flops_per_token(config.seq_len), n_params


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--implementations", default="auto,reference")
  p.add_argument("--torch", action="store_true", help="also time the PyTorch peer")
  args = p.parse_args()

  peak = measured_peak_flops("float32", n=4096)
  env = common.environment()
  results = {}
  for impl in args.implementations.split(","):
    config = make_config(args, impl)
    dt, flops_tok, n_params = time_jax_step(config, args.steps, args.warmup)
    tok_s = config.batch_size * config.seq_len / dt
    results[impl] = tok_s
    common.append("train_throughput.jsonl", {
        **env, "bench": "train_throughput", "impl": f"jax:{impl}", "layers": 6, "d_model": 512,
        "mlp_dim": 1376, "heads": 8, "kv_heads": args.kv_heads, "seq_len": args.seq,
        "batch": args.batch, "dtype": "float32", "params": n_params, "step_s": dt,
        "tokens_per_s": tok_s, "flops_per_token": flops_tok, "peak_flops": peak,
        "mfu": flops_tok * tok_s / peak})
  if args.torch:
    from bench import torch_peer
    dt = torch_peer.time_step(layers=6, d_model=512, mlp_dim=1376, heads=8,
                              kv_heads=args.kv_heads, vocab=259, seq=args.seq, batch=args.batch,
                              steps=args.steps, warmup=args.warmup)
    results["torch"] = args.batch * args.seq / dt
    common.append("train_throughput.jsonl", {
        **env, "bench": "train_throughput", "impl": "torch:eager_sdpa", "seq_len": args.seq,
        "batch": args.batch, "kv_heads": args.kv_heads, "step_s": dt,
        "tokens_per_s": results["torch"]})
  if "auto" in results:
    common.append("train_throughput.jsonl", {
        **env, "bench": "train_throughput_ratio", "seq_len": args.seq, "batch": args.batch,
        "kv_heads": args.kv_heads,
        "auto_speed_over": {k: round(results["auto"] / v, 3) for k, v in results.items()
                            if k != "auto"},
        "mfu_auto": flops_tok * results["auto"] / peak})


if __name__ == "__main__":
  main()
