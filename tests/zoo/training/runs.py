"""Running train.py / eval.py as a user does, in a subprocess, for the loop tests."""

import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# A small model on the real embedded corpus, so end-to-end runs take seconds.
SMALL = [
    "--config=configs/lm_tiny.py",
    "--config.model.d_model=64", "--config.model.num_layers=2", "--config.model.num_heads=4",
    "--config.model.num_kv_heads=2", "--config.model.mlp_dim=128",
    "--config.seq_len=64", "--config.batch_size=8", "--config.log_every=1",
    "--config.eval_every=0", "--config.eval_batches=1",
    "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=5",
]


def env(devices: int = 1) -> Dict[str, str]:
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["PYTHONPATH"] = ROOT
  e.pop("CUDA_VISIBLE_DEVICES", None)
  return e


def command(script: str, workdir: str, extra: List[str]) -> List[str]:
  return [sys.executable, os.path.join(ROOT, script), f"--workdir={workdir}", *extra]


def run(script: str, workdir: str, extra: List[str], devices: int = 1,
        timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(command(script, workdir, extra), cwd=ROOT, env=env(devices),
                        capture_output=True, text=True, timeout=timeout)


def train_losses(workdir: str) -> Dict[int, float]:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if rec["split"] == "train":
        out[rec["step"]] = rec["loss"]
  return out


def errors_of(proc: subprocess.CompletedProcess) -> List[str]:
  return [l for l in proc.stderr.splitlines() if l.startswith("error:")]


def snapshot(path: str) -> Optional[Dict[str, bytes]]:
  """Every file under path with its bytes (to prove a failed run touched nothing)."""
  if not os.path.exists(path):
    return None
  files = {}
  for d, _, names in os.walk(path):
    for n in names:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        files[os.path.relpath(p, path)] = f.read()
  return files
