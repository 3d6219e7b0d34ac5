"""Sharing weights: Hugging Face import/export (`load_hf`, `export_hf`) and self-describing
Orbax checkpoints (`save`, `load`; `python -m zoo.hub.inspect PATH` prints one)."""

from zoo.hub.checkpoint import load, load_run, model_config, save  # noqa: F401
from zoo.hub.hf import export_hf, load_hf  # noqa: F401
