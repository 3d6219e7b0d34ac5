"""`passkey`: a pass key hidden in filler text (needle in a haystack), in the byte vocabulary (see `passkey.py`)."""

from zoo.data.builders.passkey.passkey import TASK, Passkey

__all__ = ["TASK", "Passkey"]
