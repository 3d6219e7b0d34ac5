"""`pydoc_text`: the documentation topics that ship inside every CPython.

`pydoc_data.topics.topics` maps a topic name ('assert', 'for', 'typesseq',
'specialnames', ...) to the text `help()` prints for it: chapters of the
Python Language Reference, about 80 documents and 0.47 MB of real English
prose with code in it. It is the project's embedded corpus because it is on
every machine that runs Python, so the default training run needs no download
and no network, yet it is natural language that a small LM can visibly learn.

One example per topic: `{'topic': name, 'text': the topic's text}`. Text is
stored, not tokens, so any tokenizer can read it.

Splits: `validation` holds the topics whose SHA-256 of the name falls in the
lowest 10% (11 topics, ~7% of the bytes on CPython 3.11), `train` the rest.
A hash of the name, rather than a random draw, keeps the split stable across
machines, seeds and Python versions that add or drop topics.

The text differs between CPython releases, so the builder config is named for
the running interpreter (`pydoc_text/py3.11`): data built by one version is
never mistaken for another's.
"""

from __future__ import annotations

import hashlib
import sys

import tensorflow_datasets as tfds

HELD_OUT_PERCENT = 10


def is_held_out(topic: str) -> bool:
  digest = hashlib.sha256(topic.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % 100 < HELD_OUT_PERCENT


def python_config_name() -> str:
  return f"py{sys.version_info.major}.{sys.version_info.minor}"


class PydocText(tfds.core.GeneratorBasedBuilder):
  """CPython's pydoc topics, one document per topic."""

  name = "pydoc_text"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One document per pydoc topic; 10% of topics by name hash held out."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=python_config_name(),
                              description=f"pydoc topics of CPython {python_config_name()[2:]}")
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly (not dataset_info_from_configs) so no README/CITATIONS
    # files are looked up next to this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "topic": tfds.features.Text(),
            "text": tfds.features.Text(),
        }),
        homepage="https://docs.python.org/3/reference/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with Python.
    return {
        "train": self._generate_examples(held_out=False),
        "validation": self._generate_examples(held_out=True),
    }

  def _generate_examples(self, held_out: bool):
    from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
    for topic in sorted(topics):
      if is_held_out(topic) == held_out:
        yield topic, {"topic": topic, "text": topics[topic]}
