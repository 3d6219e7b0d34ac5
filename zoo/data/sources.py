"""From a data config and a split to a random-access tfds ArrayRecord source, building it first if it is ours.

- `pydoc_text` and the synthetic tasks are built offline on first use into
  `data.data_dir` (`preparation.prepare`) and read with
  `builder.as_data_source(split)`;
- `tfds:<name>` is any dataset tfds can read from `data.data_dir`: one of its
  registered builders, or any directory of prepared files
  (`<data_dir>/<name>/<config>/<version>/dataset_info.json`). Nothing is
  downloaded: this machine may have no network, and a silent multi-GB
  download at the start of a training run is never wanted. A dataset that is
  not there yet gets a one-line error saying how to prepare it.

TensorFlow is never needed: sources are ArrayRecord, read through
`as_data_source`; a dataset prepared as TFRecord is reported as such.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import tensorflow_datasets as tfds

from zoo.data import config as config_lib
from zoo.data import preparation
from zoo.data.builders.mqar import Mqar
from zoo.data.builders.passkey import Passkey
from zoo.data.builders.pydoc_text import PydocText
from zoo.data.builders.selective_copy import SelectiveCopy

SYNTHETIC_BUILDERS = {cls.task.name: cls for cls in (Mqar, Passkey, SelectiveCopy)}


@dataclasses.dataclass(frozen=True)
class Source:
  """A split of a dataset, opened: `records` supports len() and [i]."""

  records: Sequence[Any]
  full_name: str  # tfds name/config/version, for fingerprints and messages
  kind: str  # "text": a text feature to tokenize; "tokens": synthetic examples
  text_key: str | None = None


def synthetic_builder(cfg):
  """The prepared builder of synthetic task `cfg.name` with its settings."""
  cls = SYNTHETIC_BUILDERS[cfg.name]
  builder_config = cls.make_config(cfg[cfg.name].to_dict(), num_train=cfg.num_examples,
                                   num_validation=cfg.num_eval_examples, seed=cfg.generation_seed)
  return _prepared(cls, config_lib.resolve_data_dir(cfg.data_dir), builder_config)


_PREPARED: dict[tuple, Any] = {}


def _prepared(cls, data_dir: str, builder_config=None):
  # Cached per process: a train run opens train and eval iterators, often
  # several times, and each builder construction re-reads dataset_info.json.
  key = (cls, data_dir, builder_config.name if builder_config is not None else None)
  if key not in _PREPARED or not os.path.isdir(_PREPARED[key].data_dir):
    _PREPARED[key] = preparation.prepare(cls, data_dir, builder_config)
  return _PREPARED[key]


def open_source(cfg, split: str) -> Source:
  """Opens split `split` of the dataset `cfg` (a completed data config) describes."""
  name = cfg.name
  if name == "pydoc_text":
    builder = _prepared(PydocText, config_lib.resolve_data_dir(cfg.data_dir))
    return Source(_split_of(builder, split, name), builder.info.full_name, "text", "text")
  if name in SYNTHETIC_BUILDERS:
    builder = synthetic_builder(cfg)
    return Source(_split_of(builder, split, name), builder.info.full_name, "tokens")
  if name.startswith(config_lib.TFDS_PREFIX):
    return _open_tfds(name[len(config_lib.TFDS_PREFIX):], config_lib.resolve_data_dir(cfg.data_dir),
                      split, cfg.text_key, cfg.name)
  config_lib.check_name(name)
  raise AssertionError(name)


def _split_of(builder, split: str, name: str):
  available = sorted(builder.info.splits.keys())
  base = split.split("[", 1)[0]
  if base not in available:
    raise ValueError(f"data.name={name!r} has no split {split!r}; its splits are {available} "
                     "(set data.train_split / data.eval_split)")
  return builder.as_data_source(split)


def _how_to_prepare(tfds_name: str, data_dir: str) -> str:
  return (f"prepare it once where there is network access with: python -c \"import tensorflow_datasets as tfds; "
          f"tfds.builder('{tfds_name}', data_dir='{data_dir}', file_format='array_record')"
          ".download_and_prepare()\", or copy a prepared array_record copy into data.data_dir")


def _open_tfds(tfds_name: str, data_dir: str, split: str, text_key: str, full: str) -> Source:
  where = f"data.name={full!r} in data.data_dir={data_dir!r}"
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    # tfds' own message lists every dataset it knows (hundreds of lines).
    raise FileNotFoundError(
        f"{where}: tfds has no builder of that name here (none registered, e.g. because its module needs "
        f"TensorFlow, and no prepared files at {data_dir}/{tfds_name}); "
        + _how_to_prepare(tfds_name, data_dir)) from None
  if not builder.is_prepared():
    raise FileNotFoundError(f"{where}: not prepared there and nothing is downloaded at run time; "
                            + _how_to_prepare(tfds_name, data_dir))
  formats = {str(f.value) if hasattr(f, "value") else str(f)
             for f in [builder.info.file_format, *getattr(builder.info, "alternative_file_formats", [])] if f}
  if "array_record" not in formats:
    raise ValueError(f"{where} is prepared as {sorted(formats)}, which needs TensorFlow to read; "
                     "re-prepare it with file_format='array_record': " + _how_to_prepare(tfds_name, data_dir))
  features = builder.info.features
  if text_key not in features:
    raise ValueError(f"data.text_key={text_key!r} is not a feature of {full!r}; its features are "
                     f"{sorted(features.keys())}")
  return Source(_split_of(builder, split, full), builder.info.full_name, "text", text_key)
