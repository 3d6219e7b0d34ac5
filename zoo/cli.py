"""What train.py and eval.py share: every bad setting becomes one line on stderr and exit code 2."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from typing import List, Optional

from absl import flags

from zoo.training.checkpointing import IncompatibleCheckpoint


def _fail(msg: str) -> None:
  msg = str(msg).strip().splitlines()[0] if str(msg).strip() else "invalid input"
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(2)


def _unknown_override(argv: List[str]) -> Optional[str]:
  """The first --config.a.b=... flag whose field the recipe does not have, if any."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None:
    return None
  try:
    spec = importlib.util.spec_from_file_location("_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception:  # the flag parser reports unreadable recipes itself
    return None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    node = config
    for part in arg[len("--config."):].split("=", 1)[0].split("."):
      if not hasattr(node, "keys") or part not in node.keys():
        return arg.split("=", 1)[0]
      node = node[part]
  return None


def parse_flags(argv: List[str]) -> List[str]:
  """absl flag parsing with one-line errors (passed to app.run as flags_parser)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    unknown = _unknown_override(argv)
    if unknown:
      _fail(f"unknown config field {unknown} (no such field in the recipe)")
    _fail(e)


@contextlib.contextmanager
def one_line_errors():
  """ValueError/KeyError/FileNotFoundError from validation -> 'error: ...' and exit code 2."""
  try:
    yield
  except (ValueError, KeyError, FileNotFoundError, IncompatibleCheckpoint) as e:
    _fail(e if str(e).strip() else type(e).__name__)
