"""What every benchmark records: git revision, device, versions; and the JSON-lines writer."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Any, Dict

import jax

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def git_revision() -> str:
  # A copy of the tree without .git (the GPU machine gets one) names its commit here.
  if os.environ.get("ZOO_GIT_REVISION"):
    return os.environ["ZOO_GIT_REVISION"]
  try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(RESULTS), check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=os.path.dirname(RESULTS)).stdout
    return rev + ("-dirty" if dirty.strip() else "")
  except (OSError, subprocess.CalledProcessError):
    return "uncommitted"


def device_description() -> str:
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    return f"{dev.platform}: {dev.device_kind}"
  model = platform.processor() or "unknown cpu"
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"cpu: {model}, {os.cpu_count()} cores"


def environment() -> Dict[str, Any]:
  dev = jax.devices()[0]
  return {
      "git": git_revision(), "jax": jax.__version__, "platform": dev.platform,
      "device": device_description(), "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(), "machine": platform.machine(),
      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }


def append(name: str, record: Dict[str, Any]) -> None:
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, name), "a") as f:
    f.write(json.dumps(record) + "\n")
  print(json.dumps(record))
