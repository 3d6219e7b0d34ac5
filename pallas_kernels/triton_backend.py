"""Whether this JAX still ships Pallas Triton (deprecated upstream from JAX 0.11 for Mosaic GPU).

Every Triton backend (flash, decode) asks here in its `is_supported`, so a JAX
release without Triton makes "auto" move on to the next backend with a reason
instead of failing at import.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import jax


def triton_backend() -> Tuple[Optional[object], str]:
  """(jax.experimental.pallas.triton, "") if this JAX still ships it, else (None, why not)."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f"this JAX ({jax.__version__}) has no Pallas Triton backend: {e}"
  if not hasattr(pltriton, "CompilerParams"):
    return None, f"this JAX ({jax.__version__}) has no Pallas Triton CompilerParams"
  return pltriton, ""
