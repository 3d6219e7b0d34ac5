"""Build a tfds dataset once into data_dir, safely when several processes ask at the same time.

tfds already writes into an `incomplete.*` directory and renames it at the
end, but two processes that both find the dataset missing would both build,
and the loser's final rename fails on the existing directory. So:

1. fast path: already prepared -> return the builder (no lock, no write);
2. otherwise take an exclusive `fcntl` lock on `data_dir/.locks/<dataset>`,
   so the other processes wait instead of building the same thing;
3. check again under the lock (the winner may have just finished);
4. build into a private temporary data_dir and move the finished version
   directory into place with one `os.rename`, so a reader never sees a half
   written dataset, even if the builder is killed half way.

Progress bars are switched off while building: they are noise in a
training log.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from typing import Type

from absl import logging
import tensorflow_datasets as tfds

ARRAY_RECORD = "array_record"


def prepare(builder_cls: Type[tfds.core.DatasetBuilder], data_dir: str,
            config: tfds.core.BuilderConfig | None = None) -> tfds.core.DatasetBuilder:
  """Returns a prepared ArrayRecord builder of `builder_cls` (config `config`) in `data_dir`."""
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  builder = builder_cls(data_dir=data_dir, config=config, file_format=ARRAY_RECORD)
  if builder.is_prepared():
    return builder
  os.makedirs(os.path.join(data_dir, ".locks"), exist_ok=True)
  lock_name = builder.info.full_name.replace("/", "__")
  with _exclusive_lock(os.path.join(data_dir, ".locks", lock_name + ".lock")):
    builder = builder_cls(data_dir=data_dir, config=config, file_format=ARRAY_RECORD)
    if builder.is_prepared():
      return builder
    start = time.time()
    _build_then_move(builder_cls, data_dir, config, final_dir=builder.data_dir)
    logging.info("Built %s into %s in %.1f s", builder.info.full_name, builder.data_dir, time.time() - start)
  return builder_cls(data_dir=data_dir, config=config, file_format=ARRAY_RECORD)


def _build_then_move(builder_cls, data_dir: str, config, final_dir: str) -> None:
  scratch = tempfile.mkdtemp(prefix=".building-", dir=data_dir)
  try:
    with _progress_bars_off():
      tmp_builder = builder_cls(data_dir=scratch, config=config, file_format=ARRAY_RECORD)
      tmp_builder.download_and_prepare(file_format=ARRAY_RECORD)
    built = os.fspath(tmp_builder.data_dir)
    # dataset_info.json names its files relative to its own directory, so the
    # finished version directory can move anywhere.
    os.makedirs(os.path.dirname(final_dir), exist_ok=True)
    try:
      os.rename(built, final_dir)
    except OSError:
      if not os.path.isdir(final_dir):
        raise
      # Another process built it without our lock (a data_dir on a file
      # system without flock); theirs is as good as ours.
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(path: str):
  with open(path, "a+") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _progress_bars_off():
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  was_on = getattr(tqdm_utils, "_active", True)
  tfds.disable_progress_bar()
  try:
    yield
  finally:
    tfds.display_progress_bar(was_on)
