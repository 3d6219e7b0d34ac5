"""`mqar`: multi-query associative recall in the byte vocabulary (see `mqar.py`)."""

from zoo.data.builders.mqar.mqar import TASK, Mqar

__all__ = ["TASK", "Mqar"]
