"""Telemetry: metrics.jsonl and TensorBoard events in the workdir, and the progress line.

On resume, `MetricsWriter` drops jsonl records past the restored step, so the
file reads as one clean curve whatever was logged before a kill.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict, Optional

import jax


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_line(step: int, total: int, m: Dict[str, float], eta_s: Optional[float]) -> str:
  parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}"]
  if "learning_rate" in m:
    parts.append(f"lr {m['learning_rate']:.2e}")
  if "tokens_per_s" in m:
    parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
  if "examples_per_s" in m:
    parts.append(f"{m['examples_per_s']:,.1f} ex/s")
  if "mfu" in m:
    parts.append(f"mfu {100 * m['mfu']:.1f}%")
  if eta_s is not None:
    parts.append(f"eta {format_duration(eta_s)}")
  return " | ".join(parts)


class MetricsWriter:

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.primary = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.primary:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= resume_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # TensorBoard events are optional; jsonl is the record
      self._tb = None

  def write(self, step: int, split: str, metrics: Dict[str, float]) -> None:
    if not self.primary:
      return
    rec = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

  def print(self, line: str) -> None:
    if self.primary:
      print(line, flush=True)
      sys.stdout.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
