"""From a data config and a split to a random-access tfds ArrayRecord source, building it first if it is ours.

- `pydoc_text`, the synthetic tasks and `shapes` are built offline on first
  use into `data.data_dir` (`preparation.prepare`) and read with
  `builder.as_data_source(split)`;
- `tfds:<name>` is any dataset tfds can read from `data.data_dir`: one of its
  registered builders, or any directory of prepared files
  (`<data_dir>/<name>/<config>/<version>/dataset_info.json`). Nothing is
  downloaded: this machine may have no network, and a silent multi-GB
  download at the start of a training run is never wanted. A dataset that is
  not there yet gets a one-line error saying how to prepare it.

TensorFlow is never needed: sources are ArrayRecord, read through
`as_data_source`; a dataset prepared as TFRecord is reported as such.

A source is text or images. `shapes` is an image dataset; a `tfds:<name>`
dataset is one when it has the feature `data.image_key` ('image'), and then
`data.label_key` ('label', '' = none) and `data.caption_key` ('' = none) name
its label and caption. Keys of nested features are paths, so
`data.caption_key='captions/text'` reads coco_captions' captions. Every key is
checked against the dataset's features before anything is read, and so is
everything that would otherwise fail on the first batch: an image size that
varies while `data.image_size` is unset, encoded (PNG/JPEG) images without
PIL or OpenCV to decode them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from zoo.data import config as config_lib
from zoo.data import preparation
from zoo.data.builders.mqar import Mqar
from zoo.data.builders.passkey import Passkey
from zoo.data.builders.pydoc_text import PydocText
from zoo.data.builders.selective_copy import SelectiveCopy
from zoo.data.builders.shapes import Shapes

SYNTHETIC_BUILDERS = {cls.task.name: cls for cls in (Mqar, Passkey, SelectiveCopy)}
IMAGE_BUILDERS = {cls.task.name: cls for cls in (Shapes,)}


@dataclasses.dataclass(frozen=True)
class Source:
  """A split of a dataset, opened: `records` supports len() and [i]."""

  records: Sequence[Any]
  full_name: str  # tfds name/config/version, for fingerprints and messages
  kind: str  # "text": a text feature to tokenize; "tokens": synthetic examples; "image"
  text_key: str | None = None  # text: the document; image: the caption (None: no captions)
  image_key: str | None = None
  label_key: str | None = None  # None: no labels
  image_size: int = 0  # image: the side of the square images the pipeline yields


def synthetic_builder(cfg):
  """The prepared builder of synthetic task or generated image dataset `cfg.name` with its settings."""
  cls = SYNTHETIC_BUILDERS.get(cfg.name) or IMAGE_BUILDERS[cfg.name]
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
  if name in IMAGE_BUILDERS:
    return _image_source(synthetic_builder(cfg), cfg, split)
  if name.startswith(config_lib.TFDS_PREFIX):
    builder = _tfds_builder(cfg)
    if _is_image_dataset(builder, cfg):
      return _image_source(builder, cfg, split)
    features = builder.info.features
    if cfg.text_key not in features:
      raise ValueError(f"data.text_key={cfg.text_key!r} is not a feature of {name!r}; its features are "
                       f"{sorted(features.keys())}")
    return Source(_split_of(builder, split, name), builder.info.full_name, "text", cfg.text_key)
  config_lib.check_name(name)
  raise AssertionError(name)


def modality(cfg) -> str:
  """'image' or 'text': what the batches of the dataset `cfg` (a completed data config) hold."""
  if cfg.name in IMAGE_BUILDERS:
    return "image"
  if cfg.name.startswith(config_lib.TFDS_PREFIX):
    return "image" if _is_image_dataset(_tfds_builder(cfg), cfg) else "text"
  config_lib.check_name(cfg.name)
  return "text"


def num_classes(cfg) -> int:
  """Number of label values of the dataset `cfg`; 0 when it has no labels (text, or data.label_key='')."""
  if cfg.name in IMAGE_BUILDERS:
    return IMAGE_BUILDERS[cfg.name].num_classes
  if modality(cfg) == "text" or not cfg.label_key:
    return 0
  features = _tfds_builder(cfg).info.features
  label = _feature(features, cfg.label_key, "data.label_key", cfg.label_key, cfg.name)
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f"data.label_key={cfg.label_key!r} of {cfg.name!r} is {_one_line(label)}, not a ClassLabel, so "
                     "its number of classes is unknown")
  return int(label.num_classes)


def class_names(cfg) -> list[str]:
  """The label names of the dataset `cfg` (zero-shot prompts, reports); [] when it has no labels."""
  if cfg.name in IMAGE_BUILDERS:
    return list(IMAGE_BUILDERS[cfg.name].class_names)
  if not num_classes(cfg):
    return []
  features = _tfds_builder(cfg).info.features
  return list(_feature(features, cfg.label_key, "data.label_key", cfg.label_key, cfg.name).names)


def _is_image_dataset(builder, cfg) -> bool:
  return bool(cfg.image_key) and _has_feature(builder.info.features, cfg.image_key)


def _has_feature(features, key: str) -> bool:
  try:
    _walk(features, key)
  except (KeyError, TypeError):
    return False
  return True


def _walk(features, key: str):
  for part in key.split("/"):
    if isinstance(features, tfds.features.Sequence):
      features = features.feature
    if not isinstance(features, tfds.features.FeaturesDict) or part not in features:
      raise KeyError(key)
    features = features[part]
  return features


def _feature(features, key: str, field: str, value, name: str):
  """The feature at path `key`, or an error naming `field` and the features there are."""
  try:
    return _walk(features, key)
  except KeyError:
    raise ValueError(f"{field}={value!r} is not a feature of {name!r}; its features are "
                     f"{sorted(_paths(features))}") from None


def _one_line(feature) -> str:
  # Nested features print over several lines; errors are one line.
  return " ".join(repr(feature).split())


def _paths(features, prefix: str = "") -> list[str]:
  if isinstance(features, tfds.features.Sequence):
    features = features.feature
  if not isinstance(features, tfds.features.FeaturesDict):
    return [prefix[:-1]]
  return [p for k in features.keys() for p in _paths(features[k], f"{prefix}{k}/")]


def can_decode_images() -> bool:
  """Whether tfds can decode PNG/JPEG here without TensorFlow: it uses OpenCV or PIL, neither a dependency."""
  return bool(importlib.util.find_spec("cv2") or importlib.util.find_spec("PIL"))


def _image_source(builder, cfg, split: str) -> Source:
  """An image source, its keys, decodability and output size checked against the dataset's features."""
  name, features = cfg.name, builder.info.features
  image = _feature(features, cfg.image_key, "data.image_key", cfg.image_key, name)
  if isinstance(image, tfds.features.Image):
    if not can_decode_images():
      raise ImportError(f"data.name={name!r} stores its images encoded (data.image_key={cfg.image_key!r} is "
                        f"{_one_line(image)}); decoding them without TensorFlow needs PIL or OpenCV: "
                        "pip install pillow")
  elif not isinstance(image, tfds.features.Tensor) or np.dtype(image.np_dtype) != np.uint8:
    raise ValueError(f"data.image_key={cfg.image_key!r} of {name!r} is {_one_line(image)}; expected an Image or a "
                     "uint8 Tensor feature")
  shape = tuple(image.shape)
  if len(shape) not in (2, 3) or (len(shape) == 3 and shape[-1] not in (1, 3, 4, None)):
    raise ValueError(f"data.image_key={cfg.image_key!r} of {name!r} has shape {shape}; expected [H, W] or "
                     "[H, W, 1|3|4]")
  size = cfg.image_size
  if size is None:
    if shape[0] is None or shape[0] != shape[1]:
      raise ValueError(f"the images of {name!r} are {shape[0] or '?'}x{shape[1] or '?'}, not one square size; "
                       "set data.image_size to resize and centre-crop them to image_size x image_size")
    size = shape[0]
  label_key = cfg.label_key or None
  if label_key:
    label = _feature(features, label_key, "data.label_key", label_key, name)
    # A ClassLabel is an integer scalar Tensor too.
    if not (isinstance(label, tfds.features.Tensor) and label.shape == () and np.dtype(label.np_dtype).kind in "iu"):
      raise ValueError(f"data.label_key={label_key!r} of {name!r} is {_one_line(label)}; expected a ClassLabel or an "
                       "integer scalar (or data.label_key='' for none)")
  caption_key = cfg.caption_key or None
  if caption_key:
    text = _feature(features, caption_key, "data.caption_key", caption_key, name)
    if not isinstance(text, tfds.features.Text):
      raise ValueError(f"data.caption_key={caption_key!r} of {name!r} is {_one_line(text)}; expected a Text feature "
                       "(or data.caption_key='' for none)")
  records = _split_of(builder, split, name, _skip_other_images(features, cfg.image_key) or None)
  return Source(records, builder.info.full_name, "image", text_key=caption_key,
                image_key=cfg.image_key, label_key=label_key, image_size=int(size))


def _split_of(builder, split: str, name: str, decoders=None):
  available = sorted(builder.info.splits.keys())
  base = split.split("[", 1)[0]
  if base not in available:
    raise ValueError(f"data.name={name!r} has no split {split!r}; its splits are {available} "
                     "(set data.train_split / data.eval_split)")
  return builder.as_data_source(split, decoders=decoders)


def _skip_other_images(features, image_key: str, prefix: str = "") -> dict:
  """tfds decoders that leave every encoded image but `image_key` undecoded (bytes).

  A data source decodes all features of a record; an image nobody reads
  (a second view, a mask) would cost a PNG/JPEG decode per record, and would
  need PIL even when the image that is read is stored raw.
  """
  decoders = {}
  for key in features.keys():
    feature = features[key]
    if isinstance(feature, tfds.features.Image) and prefix + key != image_key:
      decoders[key] = tfds.decode.SkipDecoding()
    elif isinstance(feature, tfds.features.FeaturesDict):
      inner = _skip_other_images(feature, image_key, f"{prefix}{key}/")
      if inner:
        decoders[key] = inner
  return decoders


def _how_to_prepare(tfds_name: str, data_dir: str) -> str:
  return (f"prepare it once where there is network access with: python -c \"import tensorflow_datasets as tfds; "
          f"tfds.builder('{tfds_name}', data_dir='{data_dir}', file_format='array_record')"
          ".download_and_prepare()\", or copy a prepared array_record copy into data.data_dir")


def _tfds_builder(cfg):
  """The builder of `tfds:<name>` in data.data_dir, or a one-line error saying how to prepare it."""
  full, tfds_name = cfg.name, cfg.name[len(config_lib.TFDS_PREFIX):]
  data_dir = config_lib.resolve_data_dir(cfg.data_dir)
  where = f"data.name={full!r} in data.data_dir={data_dir!r}"
  try:
    try:
      builder = tfds.builder(tfds_name, data_dir=data_dir)
    except ImportError:
      # A registered builder whose module needs TensorFlow (coco_captions):
      # its prepared files, if any, are readable without its code.
      builder = tfds.core.read_only_builder.builder_from_files(tfds_name, data_dir=data_dir)
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
  return builder
