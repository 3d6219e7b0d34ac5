"""`passkey`: find a 5-digit pass key hidden in filler text (Mohtashami & Jaggi 2023), in bytes.

The prompt of "Landmark Attention" (and of most long-context papers since),
in plain English so a model trained on text can be asked it:

    There is an important info hidden inside a lot of irrelevant text. Find it
    and memorize it. I will quiz you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There
    and back again. The grass is green. ... The pass key is 68213. Remember it.
    68213 is the pass key. The sky is blue. ... What is the pass key? The pass
    key is 68213

- `length`: the exact length of every example in tokens (bos and eos
  included), so a sweep over lengths measures exactly what it says;
- `depth`: where the key sentence sits in the filler, 0.0 = right after the
  instructions, 1.0 = just before the question. A negative depth draws a new
  depth uniformly for every example (for training on the task).

The filler is whole sentences; the few bytes that no whole sentence fills are
spaces at the end of the filler. The loss weight is 1 on the five digits after
the final "The pass key is " and nowhere else.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from zoo.data.builders import synthetic

DEFAULTS = {"length": 1024, "depth": 0.5}

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there. ")
FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
          "There and back again. ")
QUESTION = "What is the pass key? The pass key is "
DIGITS = 5


def needle(key: str) -> str:
  return f"The pass key is {key}. Remember it. {key} is the pass key. "


def min_length() -> int:
  return 1 + len(INTRO) + len(needle("0" * DIGITS)) + len(QUESTION) + DIGITS + 1


def example_length(s: Mapping[str, Any]) -> int:
  return s["length"]


def check(s: Mapping[str, Any]) -> None:
  if s["length"] < min_length():
    raise ValueError(f"data.passkey.length={s['length']} is too short: the instructions, key sentence "
                     f"and question alone take {min_length()} tokens")
  if s["depth"] > 1.0:
    raise ValueError(f"data.passkey.depth={s['depth']} must be in [0, 1] (or negative for a random "
                     "depth per example)")


def make_example(rng: np.random.Generator, s: Mapping[str, Any]) -> dict[str, Any]:
  key = f"{int(rng.integers(10 ** (DIGITS - 1), 10 ** DIGITS))}"
  depth = float(rng.uniform(0.0, 1.0)) if s["depth"] < 0 else s["depth"]
  room = s["length"] - min_length()
  sentences, used = [], 0
  while used + len(FILLER[len(sentences) % len(FILLER)]) <= room:
    sentences.append(FILLER[len(sentences) % len(FILLER)])
    used += len(sentences[-1])
  at = int(round(depth * len(sentences)))
  haystack = "".join(sentences[:at]) + needle(key) + "".join(sentences[at:]) + " " * (room - used)
  return synthetic.compose([(INTRO + haystack + QUESTION, False), (key, True)])


TASK = synthetic.Task(
    name="passkey", defaults=DEFAULTS, abbreviations={"length": "len", "depth": "depth"},
    example_length=example_length, check=check, make_example=make_example)


class Passkey(synthetic.SyntheticTaskBuilder):
  """Passkey retrieval (needle in a haystack) as byte text; the answer is the 5-digit key."""

  name = "passkey"
  task = TASK
