"""Error measures for tests: tolerances are stated on the data's own scale."""

import numpy as np


def rel_err(x, ref) -> float:
  """max |x - ref| / max |ref|."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))
