"""The comparison run: the tiny LM trained with each attention family, on MQAR and on text.

    python bench/families.py                          # every registered family and positional id
    python bench/families.py --families mha,gated,mha@alibi --steps 100

An entry is a family id, or FAMILY@POSITIONAL to vary the positional encoding
(`model.positional`) under that family.

For each family id (`model.attention=ID`) and each dataset (`DATASETS`: the
embedded pydoc_text corpus with task `lm`; MQAR, passkey and selective copy
with task `recall`), trains the same small LM (4 layers, width 128, 4 heads,
2 KV heads, seq 256) through the one train loop for a fixed number of steps
on this machine and records the final held-out loss, accuracy (recall tasks:
exact match too), the median step time and the parameter count; on text also
the trained model's sink mass (mean attention weight on the first token,
`layers.attention.probes`; families whose core is not `mha`'s have none).
Same seed, data and steps for every family, so the differences are the
families'. Appends JSON lines to bench/results/families.jsonl. It measures;
it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from configs import lm_tiny  # noqa: E402
from layers.attention import probes  # noqa: E402
from layers.attention import registry  # noqa: E402
from layers.attention.positional import POSITIONAL  # noqa: E402
import zoo.data  # noqa: E402
from zoo import hub  # noqa: E402
from zoo.training.loop import train  # noqa: E402

SEQ_LEN = 256
# id -> (data.name, task, settings of the synthetic task). Every synthetic task
# is trained on directly (its answers are the only weighted tokens).
DATASETS = {
    "text": ("pydoc_text", "lm", {}),
    # 16 pairs of 2-letter keys and 2-digit values (the loader's default).
    "mqar": ("mqar", "recall", {}),
    # passkey at the training length, the key at a random depth per example
    # (FAMILIES.md: "NoPE passes passkey in-length").
    "passkey": ("passkey", "recall", {"length": SEQ_LEN, "depth": -1.0}),
    # 16 letters scattered in 237 noise bytes, copied in order (the CoPE
    # paper's selective copy; counting is what it needs).
    "selective_copy": ("selective_copy", "recall", {"length": SEQ_LEN, "num_tokens": 16}),
}


def make_config(entry: str, dataset: str, steps: int, options: dict, seed: int = 0):
  family, _, positional = entry.partition("@")
  c = lm_tiny.get_config()
  c.seed = seed
  c.model.update(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=352,
                 attention=family, positional=positional or "rope")
  c.model.attention_options = ",".join(f"{k}={v!r}" for k, v in options.items())
  name, task, settings = DATASETS[dataset]
  c.data = zoo.data.default_data_config(name)
  if settings:
    c.data[name].update(settings)
  c.task = task
  c.total_steps, c.batch_size, c.seq_len = steps, 16, SEQ_LEN
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 0
  c.eval_batches = 8
  c.optimizer.warmup_steps = max(steps // 10, 1)
  return c


def run_one(family: str, dataset: str, steps: int, options: dict, seed: int = 0):
  config = make_config(family, dataset, steps, options, seed)
  with tempfile.TemporaryDirectory() as workdir:
    final = train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      recs = [json.loads(l) for l in f]
    sink = measure_sink_mass(workdir, config) if dataset == "text" else None
  train_recs = [r for r in recs if r["split"] == "train"]
  step_s = statistics.median(r["step_time_s"] for r in train_recs[len(train_recs) // 2:])
  return final, step_s, train_recs[-1]["loss"], sink


def measure_sink_mass(workdir: str, config, batches: int = 2):
  """Mean attention weight on the first token (`layers.attention.probes.sink_mass`) of the
  trained model on held-out text; None for a family whose core is not `mha`'s."""
  model, _ = hub.load_run(workdir)
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.packing = False  # one document per row, starting at its bos
  data = zoo.data.build_iterator(data_cfg, split=data_cfg.eval_split, seq_len=config.seq_len,
                                 batch_size=4, seed=0, train=False)
  masses = []
  for _, batch in zip(range(batches), data):
    with probes.record_probs() as recorded:
      model(jnp.asarray(batch["inputs"]))
    if not recorded:
      return None
    masses.append(probes.sink_mass(recorded, query_mask=jnp.asarray(batch["weights"]) > 0))
  return statistics.mean(masses)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--families", default="", help="comma-separated ids; default: all registered")
  p.add_argument("--datasets", default="text,mqar", help=f"comma-separated, of {sorted(DATASETS)}")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--options", default="{}", help="JSON of model.attention_options per family id")
  p.add_argument("--seeds", default="0", help="comma-separated; one run per seed (init and data order)")
  args = p.parse_args()
  families = [f for f in args.families.split(",") if f] or (
      registry.names() + [f"mha@{p}" for p in sorted(POSITIONAL) if p != "rope"])
  options = json.loads(args.options)
  env = common.environment()
  seeds = [int(x) for x in args.seeds.split(",")]
  runs = [(f, d, s) for f in families for d in args.datasets.split(",") for s in seeds]
  for family, dataset, seed in runs:
    final, step_s, last_train, sink = run_one(family, dataset, args.steps,
                                              options.get(family, {}), seed)
    params = _param_count(family, options.get(family, {}))
    common.append("families.jsonl", {
        **env, "bench": "families", "family": family, "dataset": dataset, "steps": args.steps,
        "seed": seed, "options": options.get(family, {}), "params": params, "step_s": step_s,
        "final_train_loss": last_train, **{f"eval_{k}": v for k, v in final.items()},
        **({"sink_mass": sink} if sink is not None else {})})


def _param_count(family, options):
  from flax import nnx
  from zoo import registry as models
  c = make_config(family, "text", 1, options)
  c.model.vocab_size = zoo.data.vocab_size(c.data)
  model = nnx.eval_shape(lambda: models.build_model(c.model))
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


if __name__ == "__main__":
  main()
