"""`selective_copy`: copy the letters scattered among noise, in order (see `selective_copy.py`)."""

from zoo.data.builders.selective_copy.selective_copy import TASK, SelectiveCopy

__all__ = ["TASK", "SelectiveCopy"]
