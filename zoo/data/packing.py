"""Greedy packing of token sequences into fixed-length rows with segment ids, and exact resumable state.

Input elements: `{'tokens': int32 [n], 'weights': float32 [n] (optional)}`,
where `weights[i]` is the loss weight of *predicting* token i (1 for text,
1 on answer tokens for synthetic tasks). Output rows, each `[seq_len]`:

    inputs       int32    the tokens, pad_id where nothing is packed
    targets      int32    the next token of the same segment, pad_id elsewhere
    segment_ids  int32    1, 2, ... per piece placed in the row, 0 on padding
    positions    int32    0, 1, ... within each segment
    weights      float32  weights[i+1] of the segment's next token, 0 on the
                          last token of each segment and on padding

Elements are placed in arrival order; a row is emitted when the next element
does not fit. With `split_long=True` (text) an element that does not fit is
cut: the row is filled with its head and the rest continues in the next row,
starting again from the last token placed, so the target of every token pair
of a document is trained exactly once even across the cut. Its positions
restart at 0 in the continuation (positions never exceed seq_len, which
matters for learned or table-based position embeddings). With
`split_long=False` (synthetic tasks: an answer must stay with its question)
an element never spans rows, and one longer than seq_len is an error.
`max_segments=1` gives unpacked rows: one document (or one piece of it) per
row, padded.

Why not grain's packers (grain 0.2.18, `grain.experimental`):
`FirstFitPackIterDataset` / `BestFitPackIterDataset` never split an element
and fail on one longer than the row, which long documents always are; and
`ConcatThenSplitIterDataset` keeps tuples in its state, which come back as
lists from JSON and then no longer compare equal to its `(-1, -1)` sentinel,
so a state restored from a JSON checkpoint is misread and a document is
skipped (seen in 0.2.18). The packer here is a few dozen lines whose state is
one offset plus the parent's state.

State: the parent iterator's state *before* the element that is partly
consumed (or the parent's current state if none is) and how many of that
element's tokens are already used. Restoring re-reads that one element, so
a resumed iterator continues with exactly the row it would have produced.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
  """Packs `{'tokens', 'weights'}` elements into `[seq_len]` rows (see module docstring)."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, split_long: bool,
               max_segments: int | None = None, pad_id: int = 0, what: str = "example"):
    super().__init__(parent)
    if seq_len < 2:
      raise ValueError(f"seq_len={seq_len} must be >= 2 (inputs and targets need two tokens)")
    self._seq_len = seq_len
    self._split_long = split_long
    self._max_segments = max_segments
    self._pad_id = pad_id
    self._what = what

  def __iter__(self) -> "PackIterator":
    return PackIterator(self._parent.__iter__(), seq_len=self._seq_len, split_long=self._split_long,
                        max_segments=self._max_segments, pad_id=self._pad_id, what=self._what)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._seq_len}, split_long={self._split_long})"


class PackIterator(grain.DatasetIterator):
  """The iterator of `PackIterDataset`."""

  def __init__(self, parent: grain.DatasetIterator, *, seq_len: int, split_long: bool,
               max_segments: int | None, pad_id: int, what: str):
    super().__init__(parent)
    self._seq_len = seq_len
    self._split_long = split_long
    self._max_segments = max_segments or seq_len
    self._pad_id = pad_id
    self._what = what
    self._pending = None  # (tokens, weights) of the element being consumed
    self._pending_state = None  # parent state before that element
    self._offset = 0

  def _fetch(self) -> bool:
    """Loads the next non-empty parent element into `_pending`; False when the parent is done."""
    while True:
      state = copy.deepcopy(self._parent.get_state())
      try:
        element = next(self._parent)
      except StopIteration:
        return False
      tokens = np.asarray(element["tokens"], np.int32).reshape(-1)
      if tokens.size == 0:
        continue
      weights = element.get("weights")
      weights = (np.ones(tokens.shape, np.float32) if weights is None
                 else np.asarray(weights, np.float32).reshape(-1))
      if weights.shape != tokens.shape:
        raise ValueError(f"tokens {tokens.shape} and weights {weights.shape} of an {self._what} differ")
      if not self._split_long and tokens.size > self._seq_len:
        raise ValueError(f"an {self._what} of {tokens.size} tokens does not fit seq_len={self._seq_len}")
      self._pending, self._pending_state, self._offset = (tokens, weights), state, 0
      return True

  def __next__(self) -> dict[str, np.ndarray]:
    t = self._seq_len
    inputs = np.full(t, self._pad_id, np.int32)
    targets = np.full(t, self._pad_id, np.int32)
    segment_ids = np.zeros(t, np.int32)
    positions = np.zeros(t, np.int32)
    weights = np.zeros(t, np.float32)
    used = segments = 0
    while used < t and segments < self._max_segments:
      if self._pending is None and not self._fetch():
        break
      tokens, token_weights = self._pending
      remaining, space = tokens.size - self._offset, t - used
      if remaining <= space:
        take, done = remaining, True
      elif self._split_long and space >= 2:
        take, done = space, False
      else:
        break  # Close the row; the element starts the next one.
      piece = tokens[self._offset:self._offset + take]
      piece_weights = token_weights[self._offset:self._offset + take]
      end = used + take
      segments += 1
      inputs[used:end] = piece
      targets[used:end - 1] = piece[1:]
      weights[used:end - 1] = piece_weights[1:]
      segment_ids[used:end] = segments
      positions[used:end] = np.arange(take, dtype=np.int32)
      used = end
      if done:
        self._pending, self._pending_state, self._offset = None, None, 0
      else:
        # The continuation starts at the last token placed, whose target was
        # cut off by the end of this row.
        self._offset += take - 1
    if used == 0:
      raise StopIteration
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": positions, "weights": weights}

  def get_state(self) -> dict[str, Any]:
    if self._pending is None:
      return {"parent": copy.deepcopy(self._parent.get_state()), "offset": -1}
    return {"parent": copy.deepcopy(self._pending_state), "offset": int(self._offset)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(copy.deepcopy(state["parent"]))
    self._pending, self._pending_state, self._offset = None, None, 0
    if state["offset"] >= 0:
      if not self._fetch():
        raise ValueError("packing state points past the end of its input; it does not belong to this data")
      self._offset = int(state["offset"])
