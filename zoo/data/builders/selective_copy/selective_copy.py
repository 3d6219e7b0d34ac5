"""`selective_copy`: the selective copying task of Mamba (Gu & Dao 2023), written as bytes.

`num_tokens` letters are scattered at random positions among '.' noise bytes;
after a '|' marker the model must write the letters again, in order:

    <bos>..q.....c..x...........a....|qcxa<eos>

Unlike plain copying, the gaps are random, so a model cannot solve it with a
fixed shift (a convolution): it has to select by content, which is the point
of the task. Letters are the 26 lowercase ASCII letters, drawn with
replacement; the noise byte '.' and the marker '|' are never letters.

- `length`: the exact example length in tokens (bos and eos included);
  the noisy region is `length - num_tokens - 3` bytes long;
- `num_tokens`: how many letters to copy (the answer, loss weight 1).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from zoo.data.builders import synthetic

DEFAULTS = {"num_tokens": 16, "length": 256}
NOISE = "."
MARKER = "|"
_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def region_length(s: Mapping[str, Any]) -> int:
  return s["length"] - s["num_tokens"] - 3


def example_length(s: Mapping[str, Any]) -> int:
  return s["length"]


def check(s: Mapping[str, Any]) -> None:
  if s["num_tokens"] < 1:
    raise ValueError(f"data.selective_copy.num_tokens={s['num_tokens']} must be >= 1")
  if region_length(s) < s["num_tokens"]:
    raise ValueError(f"data.selective_copy.length={s['length']} is too short for data.selective_copy."
                     f"num_tokens={s['num_tokens']}: need length >= 2 * num_tokens + 3 = "
                     f"{2 * s['num_tokens'] + 3}")


def make_example(rng: np.random.Generator, s: Mapping[str, Any]) -> dict[str, Any]:
  n, region = s["num_tokens"], region_length(s)
  letters = _LETTERS[rng.integers(0, len(_LETTERS), size=n)]
  where = np.sort(rng.choice(region, size=n, replace=False))
  noisy = np.full(region, NOISE)
  noisy[where] = letters
  return synthetic.compose([("".join(noisy) + MARKER, False), ("".join(letters), True)])


TASK = synthetic.Task(
    name="selective_copy", defaults=DEFAULTS, abbreviations={"num_tokens": "tokens", "length": "len"},
    example_length=example_length, check=check, make_example=make_example)


class SelectiveCopy(synthetic.SyntheticTaskBuilder):
  """Selective copying (Mamba) as byte text: letters among '.' noise, copied after '|'."""

  name = "selective_copy"
  task = TASK
