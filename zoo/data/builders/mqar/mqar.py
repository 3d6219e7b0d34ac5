"""`mqar`: multi-query associative recall (Arora et al. 2023, "Zoology"), written as text.

The model reads key-value pairs, then a line of queries; each query repeats a
key and must be completed with that key's value:

    <bos>ab:41 qz:07 mk:93 ... ub:28
    mk:93 ab:41 ...<eos>

- keys: `key_length` lowercase letters ('ab'), distinct within an example;
- values: `value_length` digits ('41'), distinct within an example (as in
  Zoology, where keys and values are both drawn without replacement), so
  each value identifies one key and guessing a value is a 1 in 10**value_length
  chance per digit block;
- queries: `num_queries` distinct keys of the example, in random order.

Letters for keys and digits for values keep the two vocabularies disjoint
(a value can never be mistaken for a key) while staying ordinary bytes that
a text-trained model has seen. The answer tokens, the only ones with loss
weight 1, are the value digits on the query line; what they must be is fully
determined by the pairs line, which is what makes this a recall test.

Length in tokens: (num_pairs + num_queries) * (key_length + value_length + 2) + 1.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from zoo.data.builders import synthetic

DEFAULTS = {"num_pairs": 16, "num_queries": 16, "key_length": 2, "value_length": 2}
_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def example_length(s: Mapping[str, Any]) -> int:
  # Each pair/query is "key:value" plus one separator (space, or the newline
  # between the two lines, or eos at the end); +1 for bos.
  item = s["key_length"] + 1 + s["value_length"] + 1
  return (s["num_pairs"] + s["num_queries"]) * item + 1


def check(s: Mapping[str, Any]) -> None:
  for field in DEFAULTS:
    if s[field] < 1:
      raise ValueError(f"data.mqar.{field}={s[field]} must be >= 1")
  if s["num_queries"] > s["num_pairs"]:
    raise ValueError(f"data.mqar.num_queries={s['num_queries']} must be <= data.mqar.num_pairs="
                     f"{s['num_pairs']} (each query asks a different key)")
  if s["num_pairs"] > 26 ** s["key_length"]:
    raise ValueError(f"data.mqar.num_pairs={s['num_pairs']} needs more distinct keys than "
                     f"data.mqar.key_length={s['key_length']} letters give ({26 ** s['key_length']})")
  if s["num_pairs"] > 10 ** s["value_length"]:
    raise ValueError(f"data.mqar.num_pairs={s['num_pairs']} needs more distinct values than "
                     f"data.mqar.value_length={s['value_length']} digits give ({10 ** s['value_length']})")


def _spell_keys(codes: np.ndarray, length: int) -> list[str]:
  letters = []
  for _ in range(length):
    letters.append(_LETTERS[codes % 26])
    codes = codes // 26
  return ["".join(chars) for chars in zip(*reversed(letters))]


def make_example(rng: np.random.Generator, s: Mapping[str, Any]) -> dict[str, Any]:
  pairs, queries = s["num_pairs"], s["num_queries"]
  keys = _spell_keys(rng.choice(26 ** s["key_length"], size=pairs, replace=False), s["key_length"])
  values = [f"{v:0{s['value_length']}d}" for v in rng.choice(10 ** s["value_length"], size=pairs, replace=False)]
  asked = rng.choice(pairs, size=queries, replace=False)
  pieces = [(" ".join(f"{k}:{v}" for k, v in zip(keys, values)) + "\n", False)]
  for n, i in enumerate(asked):
    pieces.append((f"{keys[i]}:", False))
    pieces.append((values[i], True))
    if n + 1 < queries:
      pieces.append((" ", False))
  return synthetic.compose(pieces)


TASK = synthetic.Task(
    name="mqar", defaults=DEFAULTS,
    abbreviations={"num_pairs": "pairs", "num_queries": "queries", "key_length": "keylen",
                   "value_length": "vallen"},
    example_length=example_length, check=check, make_example=make_example)


class Mqar(synthetic.SyntheticTaskBuilder):
  """Multi-query associative recall (Zoology) as byte text: 'ab:41 qz:07\\nqz:07 ab:41'; answers are the values."""

  name = "mqar"
  task = TASK
