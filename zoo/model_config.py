"""From a `config.model` ConfigDict to a model's frozen config dataclass, one way for every model.

Unknown fields are an error naming them (a typo on the command line must not
be ignored); fields the loop fills from the data (`vocab_size`,
`num_classes`) are an error naming them when still unset;
`attention_options` ("gate=headwise,..." or a dict) becomes a sorted tuple
so the config stays hashable.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Type, TypeVar

from layers.attention.config import parse_options

T = TypeVar("T")


def from_model_config(cls: Type[T], model_cfg, *, model: str, required: Sequence[str] = ()) -> T:
  d = {k: v for k, v in dict(model_cfg).items() if k != "name"}
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"unknown model fields for {model}: {['model.' + u for u in unknown]};"
                     f" known: {sorted(fields)}")
  if "attention_options" in d:
    d["attention_options"] = tuple(sorted(parse_options(d["attention_options"]).items()))
  for name in required:
    if d.get(name) is None:
      raise ValueError(f"model.{name} is not set (the loop fills it from the dataset)")
  return cls(**d)
