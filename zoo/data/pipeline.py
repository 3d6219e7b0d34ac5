"""The grain input pipeline behind `zoo.data.build_iterator`, and its checkpointable iterator.

    tfds ArrayRecord source (random access)
      -> per-host shard: records shard_index, shard_index + shard_count, ...
      -> train: global shuffle by seed, repeated forever, reshuffled per epoch
      -> tokenize (text) or take tokens + answer weights (synthetic)
      -> pack into [seq_len] rows with segment ids     (packing.py)
      -> train, text: window shuffle of the packed rows
      -> batch [batch_size, seq_len]; eval pads the last batch with empty rows

Image datasets share the first three stages, then

      -> image to [S, S, 3] float32 in [-1, 1]         (images.py)
         caption tokenized into a [seq_len] row, label, weight 1
      -> batch [batch_size, ...]; eval pads the last batch with all-zero rows

Sharding slices the record index space before shuffling, so host shards are
disjoint and together cover every record, whatever the seed. Every stage is
deterministic given (data, seed, shard), and every iterator in the chain
keeps its position as a small state, so `get_state()` after N batches,
`set_state()` on a fresh iterator, gives exactly batch N+1 next. The state
is plain JSON (ints and dicts) and carries a fingerprint of the pipeline
settings: restoring it into a pipeline built differently (another dataset,
seq_len, batch size, seed, shard) is an error instead of silently different
data.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import grain
import numpy as np

from zoo.data import config as config_lib
from zoo.data import images
from zoo.data import sources
from zoo.data import tokenizers
from zoo.data.packing import PackIterDataset

STATE_FORMAT = 1
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")
IMAGE_BATCH_KEYS = ("image", "label", "text", "weights")


def get_tokenizer(cfg):
  """The tokenizer of a completed data config; synthetic tasks only exist in bytes."""
  if config_lib.is_synthetic(cfg.name) and cfg.tokenizer not in ("", None, tokenizers.BYTES):
    raise ValueError(f"data.name={cfg.name!r} is written in the byte vocabulary; set data.tokenizer='bytes' "
                     f"(got data.tokenizer={cfg.tokenizer!r})")
  return tokenizers.load_tokenizer(cfg.tokenizer)


def check_fits(cfg, seq_len: int) -> None:
  """Synthetic examples and generated captions are never cut; their settings must give examples that fit seq_len."""
  if config_lib.is_synthetic(cfg.name):
    task = config_lib.SYNTHETIC_TASKS[cfg.name]
    length = task.example_length(task.settings(cfg[cfg.name].to_dict()))
  elif cfg.name in config_lib.IMAGE_DATASETS and cfg.caption_key and cfg.tokenizer in ("", None, tokenizers.BYTES):
    # The longest caption in bytes is known from the settings; other
    # tokenizers are checked caption by caption (`_image_example`).
    task = config_lib.IMAGE_DATASETS[cfg.name]
    length = task.example_length(task.settings(cfg[cfg.name].to_dict())) - 2 + cfg.add_bos + cfg.add_eos
  else:
    return
  if length > seq_len:
    raise ValueError(f"{_settings_of(cfg)} give examples of {length} tokens, longer than seq_len={seq_len}; "
                     f"make the task smaller or seq_len larger")


def _settings_of(cfg) -> str:
  task = config_lib.SYNTHETIC_TASKS.get(cfg.name) or config_lib.IMAGE_DATASETS[cfg.name]
  return ", ".join(f"data.{cfg.name}.{k}={v}" for k, v in task.settings(cfg[cfg.name].to_dict()).items())


def _seed32(seed: int, stream: int) -> int:
  # grain seeds must be in [0, 2**32); distinct streams keep the document
  # shuffle and the row shuffle independent.
  return int(np.random.SeedSequence([int(seed) % (2**63), stream]).generate_state(1)[0])


def _encode(text, *, tokenizer, bos, eos) -> np.ndarray:
  ids = tokenizer.encode_array(text)
  parts = ([np.asarray([bos], np.int32)] if bos is not None else []) + [ids] + (
      [np.asarray([eos], np.int32)] if eos is not None else [])
  return np.concatenate(parts).astype(np.int32)


def _text_to_tokens(record, *, text_key: str, tokenizer, bos, eos) -> dict[str, np.ndarray]:
  return {"tokens": _encode(record[text_key], tokenizer=tokenizer, bos=bos, eos=eos)}


def _lookup(record, key: str):
  # Keys of nested features are paths ('captions/text'), as in sources.
  for part in key.split("/"):
    record = record[part]
  return record


def _image_example(record, *, source, tokenizer, bos, eos, seq_len: int, pad_id: int,
                   too_long: str | None) -> dict[str, np.ndarray]:
  """One stored example -> {'image' [S, S, 3] float32, 'label' int32, 'text' [seq_len] int32, 'weights' 1.0}."""
  text = np.full(seq_len, pad_id, np.int32)
  if source.text_key:
    caption = _lookup(record, source.text_key)
    if not isinstance(caption, (str, bytes)):
      # Several captions per image (coco_captions): the first, so that eval
      # is deterministic; an image without any gets an empty one.
      caption = caption[0] if len(caption) else ""
    ids = _encode(caption, tokenizer=tokenizer, bos=bos, eos=eos)
    if len(ids) > seq_len and too_long:
      raise ValueError(f"{too_long} give a caption of {len(ids)} tokens, longer than seq_len={seq_len}; "
                       "make seq_len larger")
    # Captions of outside datasets have a long tail; cutting the few long ones
    # beats failing a run on the first.
    ids = ids[:seq_len]
    text[:len(ids)] = ids
  label = int(_lookup(record, source.label_key)) if source.label_key else -1
  return {"image": images.to_model_input(_lookup(record, source.image_key), source.image_size),
          "label": np.int32(label), "text": text, "weights": np.float32(1.0)}


def _synthetic_to_tokens(record) -> dict[str, np.ndarray]:
  return {"tokens": np.asarray(record["tokens"], np.int32), "weights": np.asarray(record["weights"], np.float32)}


def _stack_and_pad(rows, *, keys, batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
  batch = {k: np.stack([r[k] for r in rows]) for k in keys}
  missing = batch_size - len(rows)
  if missing:
    # Only the last eval batch is short; empty rows (segment 0, weight 0) keep
    # the batch shape static for jit and count for nothing.
    for k, v in batch.items():
      fill = pad_id if k in ("inputs", "targets", "text") else 0
      batch[k] = np.concatenate([v, np.full((missing,) + v.shape[1:], fill, v.dtype)])
  return batch


class DataIterator(grain.DatasetIterator):
  """Batches as dicts of numpy arrays; `get_state()` / `set_state()` are exact and JSON-serialisable.

  A grain `DatasetIterator`, so grain's Orbax checkpoint handler and
  `save`/`load` work on it as well.
  """

  def __init__(self, parent: grain.DatasetIterator, fingerprint: dict[str, Any]):
    super().__init__(parent)
    self.fingerprint = fingerprint

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    # A JSON round trip both proves the state serialisable and detaches it
    # from the live iterators' internals.
    return json.loads(json.dumps({"format": STATE_FORMAT, "pipeline": self.fingerprint,
                                  "position": self._parent.get_state()}))

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "position" not in state:
      raise ValueError("not a zoo.data iterator state (expected keys format, pipeline, position)")
    theirs = state.get("pipeline", {})
    differ = {k: (theirs.get(k), v) for k, v in self.fingerprint.items() if theirs.get(k) != v}
    if differ:
      detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
      raise ValueError(f"data iterator state was saved by a different input pipeline ({detail}); "
                       "it cannot resume this one exactly")
    self._parent.set_state(json.loads(json.dumps(state["position"])))

  def __str__(self) -> str:
    return f"DataIterator({self.fingerprint})"


def build_iterator(data_cfg, *, split: str, seq_len: int, batch_size: int, seed: int, train: bool,
                   shard_index: int = 0, shard_count: int = 1) -> DataIterator:
  """See `zoo.data.build_iterator`."""
  cfg = config_lib.complete(data_cfg)
  if seq_len < 2:
    raise ValueError(f"seq_len={seq_len} must be >= 2")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1 (the per-host batch)")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  tokenizer = get_tokenizer(cfg)
  check_fits(cfg, seq_len)
  source = sources.open_source(cfg, split)
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  bos = tokenizer.bos_id if cfg.add_bos else None
  eos = tokenizer.eos_id if cfg.add_eos else None
  image = source.kind == "image"

  ds = grain.MapDataset.source(source.records)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  if train:
    if len(ds) == 0:
      raise ValueError(f"data.name={cfg.name!r} split {split!r} has no records for shard {shard_index} of "
                       f"{shard_count}; nothing to train on")
    ds = ds.shuffle(seed=_seed32(seed, 0)).repeat()
  if image:
    # Our own captions must fit (check_fits; here for tokenizers other than bytes).
    too_long = _settings_of(cfg) if cfg.name in config_lib.IMAGE_DATASETS else None
    ds = ds.map(functools.partial(_image_example, source=source, tokenizer=tokenizer, bos=bos, eos=eos,
                                  seq_len=seq_len, pad_id=pad_id, too_long=too_long))
  elif source.kind == "text":
    ds = ds.map(functools.partial(_text_to_tokens, text_key=source.text_key, tokenizer=tokenizer, bos=bos, eos=eos))
  else:
    ds = ds.map(_synthetic_to_tokens)
  read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=64 if cfg.read_threads else 0)
  if image:
    # One example per row: nothing to pack, and examples are i.i.d. (no window shuffle).
    rows = ds.to_iter_dataset(read)
  else:
    rows = PackIterDataset(ds.to_iter_dataset(read), seq_len=seq_len, split_long=source.kind == "text",
                           max_segments=None if cfg.packing else 1, pad_id=pad_id,
                           what="example" if source.kind == "tokens" else "document")
    if train and cfg.shuffle_window > 1:
      rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=cfg.shuffle_window,
                                                         seed=_seed32(seed, 1))
  batches = rows.batch(batch_size, drop_remainder=False,
                       batch_fn=functools.partial(_stack_and_pad, keys=IMAGE_BATCH_KEYS if image else BATCH_KEYS,
                                                  batch_size=batch_size, pad_id=pad_id))
  fingerprint = {
      "dataset": source.full_name, "split": split, "seq_len": seq_len, "batch_size": batch_size,
      "seed": seed if train else None, "train": train, "shard_index": shard_index, "shard_count": shard_count,
      "packing": bool(cfg.packing) and not image, "tokenizer": f"{type(tokenizer).__name__}:{tokenizer.vocab_size}",
      "text_key": source.text_key, "add_bos": bool(cfg.add_bos), "add_eos": bool(cfg.add_eos),
      "shuffle_window": int(cfg.shuffle_window) if train and not image else 0,
  }
  if image:
    fingerprint.update(image_key=source.image_key, label_key=source.label_key, image_size=source.image_size)
  return DataIterator(batches.__iter__(), fingerprint)
