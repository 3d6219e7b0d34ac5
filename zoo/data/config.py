"""The `data` config: defaults per dataset name, validation, and where data lives.

Every data config has every field (the schema is the same for all names), so
`--config.data.name=mqar` on a command line works on a config written for
`pydoc_text`; fields that do not apply to the chosen dataset are ignored.
Only the defaults differ by name (see `default_data_config`). The fields are
documented in `zoo/data/__init__.py`.
"""

from __future__ import annotations

import os

import ml_collections

from zoo.data.builders.mqar import TASK as MQAR
from zoo.data.builders.passkey import TASK as PASSKEY
from zoo.data.builders.selective_copy import TASK as SELECTIVE_COPY
from zoo.data.builders.shapes import TASK as SHAPES

DATA_DIR_ENV = "ATTENTION_ZOO_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/attention_zoo/tfds"
TEXT_CORPORA = ("pydoc_text",)
SYNTHETIC_TASKS = {task.name: task for task in (MQAR, PASSKEY, SELECTIVE_COPY)}
# Our generated image datasets; their settings are sub-configs like the synthetic tasks'.
IMAGE_DATASETS = {SHAPES.name: SHAPES}
TFDS_PREFIX = "tfds:"
VALID_NAMES = (TEXT_CORPORA + tuple(SYNTHETIC_TASKS) + tuple(IMAGE_DATASETS)
               + (TFDS_PREFIX + "<name>[/<config>][:<version>]",))


def default_data_dir() -> str:
  return os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR


def resolve_data_dir(data_dir: str | None) -> str:
  """The config's data_dir, or the default when empty; `~` expanded."""
  return os.path.abspath(os.path.expanduser(data_dir or default_data_dir()))


def check_name(name: str) -> str:
  if not isinstance(name, str) or not (
      name in TEXT_CORPORA or name in SYNTHETIC_TASKS or name in IMAGE_DATASETS
      or (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX))):
    raise ValueError(f"unknown dataset data.name={name!r}; valid names: {', '.join(VALID_NAMES)}")
  return name


def is_synthetic(name: str) -> bool:
  return name in SYNTHETIC_TASKS


def default_data_config(name: str = "pydoc_text") -> ml_collections.ConfigDict:
  """All data fields with the defaults for dataset `name` (see zoo/data/__init__.py)."""
  check_name(name)
  c = ml_collections.ConfigDict()
  c.name = name
  c.data_dir = default_data_dir()
  c.tokenizer = "bytes"
  c.text_key = "text"
  c.train_split = "train"
  c.eval_split = "validation"
  # None = chosen by name when the pipeline is built (`complete`), so that
  # `--config.data.name=mqar` on a text config still gets the synthetic
  # defaults.
  c.packing = ml_collections.config_dict.placeholder(bool)
  c.add_bos = True
  c.add_eos = True
  c.shuffle_window = ml_collections.config_dict.placeholder(int)
  c.read_threads = 2
  c.image_key = "image"
  c.label_key = "label"
  # None = chosen by name in `complete`: 'caption' for shapes, no captions for tfds:<name>.
  c.caption_key = ml_collections.config_dict.placeholder(str)
  c.image_size = ml_collections.config_dict.placeholder(int)
  c.num_examples = 20_000
  c.num_eval_examples = 1_000
  c.generation_seed = 0
  for task in (*SYNTHETIC_TASKS.values(), *IMAGE_DATASETS.values()):
    c[task.name] = ml_collections.ConfigDict(dict(task.defaults))
  return c


def complete(data_cfg) -> ml_collections.ConfigDict:
  """`data_cfg` with missing fields filled from the defaults and `None` (auto) resolved; unknown fields are an error."""
  given = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  if "name" not in given:
    raise ValueError(f"data.name is not set; valid names: {', '.join(VALID_NAMES)}")
  out = default_data_config(check_name(given["name"]))
  unknown = sorted(set(given) - set(out))
  if unknown:
    raise ValueError(f"unknown data config field(s) {['data.' + k for k in unknown]}; known: "
                     f"{sorted(out)}")
  for key, value in given.items():
    if isinstance(out[key], ml_collections.ConfigDict):
      sub_unknown = sorted(set(value) - set(out[key]))
      if sub_unknown:
        raise ValueError(f"unknown field(s) {[f'data.{key}.{k}' for k in sub_unknown]}; known: "
                         f"{sorted(out[key])}")
      for k, v in value.items():
        _assign(out[key], k, v, f"data.{key}.{k}")
    else:
      _assign(out, key, value, f"data.{key}")
  synthetic = is_synthetic(out.name)
  if out.packing is None:
    # One synthetic example per row keeps per-row metrics (exact match) per
    # example; text is packed so no compute is spent on padding.
    out.packing = not synthetic
  if out.shuffle_window is None:
    # Text rows cut from one long document are consecutive; a window shuffle
    # after packing spreads them over batches. Synthetic examples are i.i.d.
    out.shuffle_window = 0 if synthetic else 128
  if out.caption_key is None:
    out.caption_key = "caption" if out.name in IMAGE_DATASETS else ""
  if out.image_size is not None and out.image_size < 1:
    raise ValueError(f"data.image_size={out.image_size} must be >= 1 (or None: keep the stored size)")
  return out


def _assign(target, key, value, label):
  try:
    target[key] = value
  except TypeError as e:
    raise TypeError(f"{label}={value!r} has the wrong type: expected {type(target[key]).__name__}") from e


PROBE_EXAMPLES = 256


def eval_probe_config(task: str, *, seq_len: int, data_dir: str | None = None) -> ml_collections.ConfigDict:
  """The data config of a synthetic recall probe sized to `seq_len`, for evaluating any LM run.

  Probes are eval-only (a validation split of 256 examples, no train split)
  and scale with the context they test:
  - mqar: 2-letter keys, 2-digit values, as many pairs as fit (at most 64),
    every key queried;
  - passkey: examples exactly seq_len long, the key at a random depth per example;
  - selective_copy: examples exactly seq_len long, 16 letters to copy
    (fewer when seq_len is very short).
  The same (task, seq_len) always gives the same examples, so probe scores of
  different runs compare.
  """
  if task not in SYNTHETIC_TASKS:
    raise ValueError(f"unknown probe task {task!r}; choose one of {sorted(SYNTHETIC_TASKS)}")
  c = default_data_config(task)
  if data_dir:
    c.data_dir = data_dir
  c.num_examples = 0
  c.num_eval_examples = PROBE_EXAMPLES
  if task == "mqar":
    per_pair = 2 * (c.mqar.key_length + c.mqar.value_length + 2)  # one pair + its query
    c.mqar.num_pairs = c.mqar.num_queries = min(64, (seq_len - 1) // per_pair)
  elif task == "passkey":
    c.passkey.length = seq_len
    c.passkey.depth = -1.0
  else:
    c.selective_copy.length = seq_len
    c.selective_copy.num_tokens = max(1, min(16, (seq_len - 3) // 2))
  try:
    SYNTHETIC_TASKS[task].settings(c[task].to_dict())
  except ValueError as e:
    raise ValueError(f"seq_len={seq_len} is too short for the {task} probe: {e}") from None
  return c
