"""What the three synthetic recall builders share: text-to-tokens, configs named by their settings, the builder.

Every synthetic example is written as ASCII text and encoded with the byte
tokenizer (`zoo.data.tokenizers.ByteTokenizer`), bos first and eos last, so
the tasks live in the same vocabulary as the text corpus and a model trained
on `pydoc_text` can be evaluated on them unchanged. An example stores

    tokens   int32 [n]    bos, the task's bytes + 3, eos
    weights  float32 [n]  1.0 on answer tokens, 0.0 elsewhere
    answer   text         the answer string (for reading and for checks)

`weights[i]` marks token i as an answer token. The pipeline turns that into
the loss weight of the position that *predicts* token i (one to the left).

Each task module (mqar/, passkey/, selective_copy/) defines a `Task`: default
settings, the exact example length those settings give, a validity check that
names the offending `data.<task>.<field>`, and `make_example(rng, settings)`.

The image dataset `shapes` reuses `Task` and `SyntheticTaskBuilder` for its
settings, config names and per-example seeding, with its own features (its
`example_length` is that of its longest caption).

Different settings must never share files, so the tfds config of a builder is
named after all of them (`mqar/pairs16-queries16-keylen2-vallen2-train20000-val1000-seed0`)
and each setting lands in its own directory of data_dir.

Examples are seeded one by one (`np.random.default_rng([seed, split, index])`),
so example i of a split is the same whatever `num_examples` is, and the train
and validation splits are drawn from disjoint streams.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from zoo.data.tokenizers import ByteTokenizer

_BYTES = ByteTokenizer()
_SPLIT_STREAM = {"train": 0, "validation": 1}


def compose(pieces: Sequence[tuple[str, bool]]) -> dict[str, Any]:
  """[(text, is_answer), ...] -> {'tokens', 'weights', 'answer'}, with bos and eos around it.

  Pieces are ASCII, so byte offsets are character offsets: the text is
  encoded once and answer spans are marked by offset (one numpy call per
  piece made building 20k MQAR examples take 10 s).
  """
  text = "".join(p for p, _ in pieces)
  if not text.isascii():
    raise ValueError("synthetic task text must be ASCII (one token per character)")
  tokens = np.empty(len(text) + 2, np.int32)
  tokens[0], tokens[-1] = _BYTES.bos_id, _BYTES.eos_id
  tokens[1:-1] = _BYTES.encode_array(text)
  weights = np.zeros(len(tokens), np.float32)
  answer, at = [], 1
  for piece, is_answer in pieces:
    if is_answer:
      weights[at:at + len(piece)] = 1.0
      answer.append(piece)
    at += len(piece)
  return {"tokens": tokens, "weights": weights, "answer": " ".join(answer)}


@dataclasses.dataclass(frozen=True)
class Task:
  """A synthetic task: its settings, their exact example length, their check, the generator."""

  name: str
  defaults: Mapping[str, Any]
  # Short spellings of the settings for the tfds config name, in order.
  abbreviations: Mapping[str, str]
  example_length: Callable[[Mapping[str, Any]], int]
  check: Callable[[Mapping[str, Any]], None]
  make_example: Callable[[np.random.Generator, Mapping[str, Any]], dict[str, Any]]

  def settings(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(self.defaults))
    if unknown:
      raise ValueError(f"data.{self.name} has unknown field(s) {unknown}; known: {sorted(self.defaults)}")
    out = {}
    for key, default in self.defaults.items():
      value = overrides.get(key, default)
      # Keep the default's type so 0.5 and 0.50 name the same config, and
      # "16" from a command line is not a different setting from 16.
      out[key] = type(default)(value)
    self.check(out)
    return out

  def config_name(self, settings: Mapping[str, Any], num_train: int, num_validation: int, seed: int) -> str:
    parts = [f"{self.abbreviations[k]}{_spell(settings[k])}" for k in self.defaults]
    parts += [f"train{num_train}", f"val{num_validation}", f"seed{seed}"]
    return "-".join(parts)


def _spell(value) -> str:
  if isinstance(value, float):
    return repr(round(value, 6))
  return str(value)


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """A tfds config carrying one setting of a synthetic task."""

  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  num_train: int = 0
  num_validation: int = 0
  seed: int = 0


class SyntheticTaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds `num_train` / `num_validation` examples of `task` into ArrayRecord."""

  task: Task
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  @classmethod
  def make_config(cls, settings: Mapping[str, Any] | None = None, *, num_train: int,
                  num_validation: int, seed: int) -> SyntheticConfig:
    settings = cls.task.settings(settings)
    if num_train < 0 or num_validation < 0 or num_train + num_validation == 0:
      raise ValueError(f"data.num_examples={num_train} and data.num_eval_examples={num_validation} "
                       "must be >= 0, and not both 0")
    return SyntheticConfig(
        name=cls.task.config_name(settings, num_train, num_validation, seed),
        version=cls.VERSION,
        description=f"{cls.task.name} with {settings}, {num_train} train / {num_validation} validation "
                    f"examples, seed {seed}",
        settings=settings, num_train=num_train, num_validation=num_validation, seed=seed)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=type(self).__doc__,
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "weights": tfds.features.Tensor(shape=(None,), dtype=np.float32),
            "answer": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    counts = {"train": config.num_train, "validation": config.num_validation}
    # tfds cannot write an empty split; a count of 0 means no such split (an
    # eval-only probe needs no train split).
    return {split: self._generate_examples(split, n) for split, n in counts.items() if n > 0}

  def _generate_examples(self, split: str, count: int):
    config = self.builder_config
    for index in range(count):
      rng = np.random.default_rng([config.seed, _SPLIT_STREAM[split], index])
      yield index, self.task.make_example(rng, config.settings)
