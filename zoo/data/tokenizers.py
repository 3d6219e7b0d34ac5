"""Tokenizers: UTF-8 bytes (the default), SentencePiece model files, Hugging Face `tokenizer.json` files.

The byte tokenizer is the project's default because it needs no file, no
download and no training, works on any text (the pydoc corpus has non-ASCII
characters), and lets the synthetic tasks (MQAR, passkey, selective copy) be
written as ordinary text: a model trained on the text corpus can be evaluated
on them with the same vocabulary. Its ids are

    pad = 0, bos = 1, eos = 2, byte b -> b + 3          (vocab_size 259)

so that padding is id 0 (what the batch contract pads with) and every byte
value stays addressable.

SentencePiece and `tokenizers` are optional (`pip install sentencepiece` or
`pip install tokenizers`, or the project's `tokenizers` extra); they are
imported only when a file of theirs is asked for. All three expose the same
small interface: `encode(str) -> list[int]`, `decode(list[int]) -> str`,
`vocab_size`, `pad_id`, `bos_id`, `eos_id` (the last three may be None when a
model file defines no such token).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional, Sequence

import numpy as np

BYTES = "bytes"


class ByteTokenizer:
  """UTF-8 bytes shifted past three special ids."""

  pad_id = 0
  bos_id = 1
  eos_id = 2
  offset = 3
  vocab_size = 256 + offset
  name = BYTES

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str | bytes) -> np.ndarray:
    """int32 ids; the pipeline's fast path (no Python list per byte)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + self.offset

  def decode(self, ids: Sequence[int]) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"byte tokenizer ids must be in [0, {self.vocab_size}); got {ids.min()}..{ids.max()}")
    # Special ids carry no text; a model's sampled bytes may be invalid UTF-8.
    data = (ids[ids >= self.offset] - self.offset).astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece `.model` file."""

  def __init__(self, path: str):
    spm = _import_or_explain("sentencepiece", path)
    self.name = path
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._sp.get_piece_size())
    # SentencePiece reports -1 for a token the model was trained without.
    self.pad_id = _id_or_none(self._sp.pad_id())
    self.bos_id = _id_or_none(self._sp.bos_id())
    self.eos_id = _id_or_none(self._sp.eos_id())

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def encode_array(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


# tokenizer.json has no field for bos/eos/pad (Hugging Face keeps those in
# tokenizer_config.json), so they are found among the added tokens by the
# spellings the common model families use.
_BOS_SPELLINGS = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
_EOS_SPELLINGS = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "[SEP]")
_PAD_SPELLINGS = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizers` `tokenizer.json` file."""

  def __init__(self, path: str):
    tokenizers = _import_or_explain("tokenizers", path)
    self.name = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    # Special tokens are added explicitly by the pipeline (bos/eos per
    # document), so the file's post-processor must not add them a second time.
    self._tok.no_padding()
    self._tok.no_truncation()
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.bos_id = self._first_known(_BOS_SPELLINGS)
    self.eos_id = self._first_known(_EOS_SPELLINGS)
    self.pad_id = self._first_known(_PAD_SPELLINGS)

  def _first_known(self, spellings) -> Optional[int]:
    for s in spellings:
      i = self._tok.token_to_id(s)
      if i is not None:
        return int(i)
    return None

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_array(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return np.asarray(self.encode(text), dtype=np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _id_or_none(i: int) -> Optional[int]:
  return None if i is None or int(i) < 0 else int(i)


def _import_or_explain(module: str, path: str):
  try:
    return __import__(module)
  except ImportError as e:
    raise ImportError(
        f"data.tokenizer={path!r} needs the `{module}` package, which is not installed; "
        f"`pip install {module}` (or the project's `tokenizers` extra), or set data.tokenizer='bytes'."
    ) from e


def _kind_of_file(path: str) -> str:
  """'sentencepiece' or 'huggingface', from the name first and the content second."""
  base = os.path.basename(path)
  if base.endswith(".json"):
    return "huggingface"
  if base.endswith(".model") or base.endswith(".spm"):
    return "sentencepiece"
  with open(path, "rb") as f:
    head = f.read(64).lstrip()
  # A tokenizer.json is a JSON object; a SentencePiece model is a binary protobuf.
  if head.startswith(b"{"):
    try:
      with open(path, "r", encoding="utf-8") as f:
        json.load(f)
      return "huggingface"
    except ValueError:
      pass
  return "sentencepiece"


@functools.lru_cache(maxsize=16)
def load_tokenizer(spec: str):
  """'bytes', or a path to a SentencePiece `.model` / Hugging Face `tokenizer.json` file.

  Cached: the pipeline asks once per iterator, and SentencePiece/HF loads are not free.
  """
  if spec is None or spec == "" or spec == BYTES:
    return ByteTokenizer()
  path = os.path.expanduser(str(spec))
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"data.tokenizer={spec!r}: no such file. Give 'bytes' (the built-in byte tokenizer) or the path of "
        "a SentencePiece .model file (needs `pip install sentencepiece`) or a Hugging Face tokenizer.json "
        "file (needs `pip install tokenizers`)."
    )
  if _kind_of_file(path) == "huggingface":
    return HuggingFaceTokenizer(path)
  return SentencePieceTokenizer(path)
