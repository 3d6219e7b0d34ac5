"""`pydoc_text`: the CPython documentation topics as an English text corpus (see `pydoc_text.py`)."""

from zoo.data.builders.pydoc_text.pydoc_text import PydocText, is_held_out

__all__ = ["PydocText", "is_held_out"]
