"""Ordered backends with `is_supported`, shared by every kernel shape's `api.py`.

ARCHITECTURE.md, "The attention contract", point 5: kernels dispatch, never
silently. A kernel shape (flash, block_sparse, decode) owns one `Dispatcher`:

  * `implementation="auto"` walks the platform's ordered list
    (`jax.default_backend()`) and runs the first backend whose
    `is_supported(call)` returns `(True, "")`. A skipped backend is logged once
    per reason. Every list ends at an XLA backend that supports every call.
  * `implementation="pallas"` walks only the Pallas backends of the platform
    (names starting with "pallas"): first those in the "auto" list, then those
    registered with `auto=False` (on CPU the interpret-mode twins, which are
    too slow for "auto" but are what "pallas" means there).
    No Pallas backend supporting the call is an error with each one's reason.
  * Any other registered name runs that backend or raises ValueError with its
    reason (also when it is registered only for another platform); anything
    else raises ValueError listing the choices.

A backend is any object with `name`, `is_supported(call) -> (bool, reason)`
and `__call__`; what `call` and `__call__` take is the kernel shape's business.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

_log = logging.getLogger(__name__)

PALLAS_ALIAS = "pallas"


class Backend(Protocol):
  name: str

  def is_supported(self, call: Any) -> Tuple[bool, str]:
    ...


class Dispatcher:
  """The ordered backends of one kernel shape, per platform."""

  def __init__(self, kernel: str, fallback: Backend, *, extra: Sequence[Backend] = ()):
    """`fallback` (XLA) closes every platform's list; `extra` are by-name-only backends."""
    self.kernel = kernel
    self.fallback = fallback
    self.extra = list(extra)
    self.backends: Dict[str, List[Backend]] = {p: [fallback] for p in ("cpu", "gpu", "tpu")}
    self.by_name_only: Dict[str, List[Backend]] = {}
    self._logged = set()

  def register(self, backend: Backend, platforms: Iterable[str], *,
               before: Optional[str] = None, auto: bool = True) -> None:
    """Puts `backend` into the "auto" list of each platform, ahead of `before` (default: the fallback).

    With `auto=False` the backend runs only when named (or via "pallas").
    """
    before = before or self.fallback.name
    for platform in platforms:
      if not auto:
        named = self.by_name_only.setdefault(platform, [])
        named[:] = [b for b in named if b.name != backend.name] + [backend]
        continue
      order = self.backends.setdefault(platform, [self.fallback])
      order[:] = [b for b in order if b.name != backend.name]
      names = [b.name for b in order]
      order.insert(names.index(before) if before in names else len(order), backend)

  def names(self) -> Tuple[str, ...]:
    names = {"auto", PALLAS_ALIAS} | {b.name for b in self.extra}
    names |= {b.name for order in self.backends.values() for b in order}
    names |= {b.name for order in self.by_name_only.values() for b in order}
    return tuple(sorted(names))

  def check_name(self, implementation: str) -> None:
    if implementation not in self.names():
      raise ValueError(f"implementation must be one of {list(self.names())}, got"
                       f" implementation={implementation!r}")

  def select(self, call: Any, implementation: str = "auto", *, platform: str) -> Backend:
    self.check_name(implementation)
    order = self.backends.get(platform, [self.fallback])
    if implementation == "auto":
      return self._first_supported(order, call, platform, log=True)
    if implementation == PALLAS_ALIAS:
      pallas = [b for b in order + self.by_name_only.get(platform, [])
                if b.name.startswith(PALLAS_ALIAS)]
      if not pallas:
        raise ValueError(f"implementation='pallas': no Pallas {self.kernel} backend on platform"
                         f" {platform!r}")
      reasons = []
      for backend in pallas:
        ok, reason = backend.is_supported(call)
        if ok:
          return backend
        reasons.append(f"{backend.name}: {reason}")
      raise ValueError(f"implementation='pallas' does not support this {self.kernel} call: "
                       + "; ".join(reasons))
    backend = self._find(implementation, platform)
    ok, reason = backend.is_supported(call)
    if not ok:
      raise ValueError(f"implementation={implementation!r} does not support this {self.kernel}"
                       f" call: {reason}")
    return backend

  def _first_supported(self, order, call, platform, log):
    for backend in order:
      ok, reason = backend.is_supported(call)
      if ok:
        return backend
      if log:
        self._log_skip_once(platform, backend.name, reason)
    raise AssertionError(f"no backend in {[b.name for b in order]} supports {call}")

  def _find(self, name: str, platform: str) -> Backend:
    for backend in (self.extra + self.backends.get(platform, [])
                    + self.by_name_only.get(platform, [])):
      if backend.name == name:
        return backend
    for other, order in list(self.backends.items()) + list(self.by_name_only.items()):
      for backend in order:
        if backend.name == name:
          raise ValueError(f"implementation={name!r} is registered for platform {other!r}, not"
                           f" for the current platform {platform!r}")
    raise AssertionError(f"{name!r} passed check_name but is registered nowhere")

  def _log_skip_once(self, platform, name, reason):
    if (platform, name, reason) not in self._logged:
      self._logged.add((platform, name, reason))
      _log.warning("%s: skipping backend %r on %s: %s", self.kernel, name, platform, reason)
