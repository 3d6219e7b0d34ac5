"""What train.py and eval.py share: bad settings become one line on stderr and exit 2."""

from __future__ import annotations

import contextlib
import sys

from zoo.training.checkpointing import IncompatibleCheckpoint


@contextlib.contextmanager
def one_line_errors():
  """ValueError/KeyError/FileNotFoundError from validation -> 'error: ...' and exit code 2."""
  try:
    yield
  except (ValueError, KeyError, FileNotFoundError, IncompatibleCheckpoint) as e:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)
