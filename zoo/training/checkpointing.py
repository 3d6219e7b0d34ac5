"""Orbax checkpoints: async, atomic, holding everything a run needs to resume exactly.

A checkpoint at step N holds the train state (step, params, optimizer state)
as arrays, a JSON record with the config and the project version, and the
data-iterator position of every host (grain's Orbax handler writes one
`process_i-of-n.json` per host, so multi-host runs resume each shard). Restore targets carry explicit shardings (the abstract
tree's `NamedSharding`s on the current mesh), so a checkpoint can be read
back on another mesh. Before a run computes anything, `check_compatible`
compares the stored config with the new one and refuses a workdir whose
checkpoint was made by an incompatible model, touching nothing.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

import grain
import jax
import orbax.checkpoint as ocp

VERSION = "0.1.0"
# Config sections that must match for a checkpoint to be restorable into a run.
STRUCTURAL = ("model", "optimizer.name", "task")


class IncompatibleCheckpoint(ValueError):
  pass


def _get(cfg: Dict[str, Any], dotted: str):
  for part in dotted.split("."):
    if not isinstance(cfg, dict) or part not in cfg:
      return None
    cfg = cfg[part]
  return cfg


def _diff(a, b, prefix: str):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      yield from _diff(a.get(k), b.get(k), f"{prefix}.{k}")
  elif _norm(a) != _norm(b):
    yield f"{prefix}: checkpoint has {a!r}, this run has {b!r}"


def _norm(x):
  return list(x) if isinstance(x, tuple) else x


class Checkpointer:

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def read_meta(self, step: Optional[int] = None) -> Optional[Dict[str, Any]]:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]

  def check_compatible(self, config_dict: Dict[str, Any]) -> None:
    meta = self.read_meta()
    if meta is None:
      return
    stored = json.loads(meta["config"])
    problems = []
    for key in STRUCTURAL:
      problems += list(_diff(_get(stored, key), _get(config_dict, key), key))
    if problems:
      raise IncompatibleCheckpoint(
          f"workdir holds a checkpoint (step {self.latest_step()}) of an incompatible config: "
          + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else "")
          + ". Use a new --workdir; nothing was changed.")

  def save(self, step: int, state: Any, *, config_json: str, data_iterator=None) -> None:
    """Saves asynchronously; the data-iterator position is taken now, before the loop moves on."""
    meta = {"config": config_json, "version": VERSION, "step": int(step)}
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any, step: Optional[int] = None, *,
              data_iterator=None) -> Tuple[Any, Dict[str, Any]]:
    """Restores the train state (and moves `data_iterator` to its saved position).

    abstract_state: ShapeDtypeStructs with concrete NamedShardings (STACK-NOTES:
    not AbstractMesh ones), which decide where the arrays land.
    """
    step = self.latest_step() if step is None else step
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with the shardings of a live tree (restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
