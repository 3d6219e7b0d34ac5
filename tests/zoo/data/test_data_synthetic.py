"""Synthetic recall tasks: answers follow from the input, exact lengths, determinism, setting errors."""

import re

import numpy as np
import pytest

import zoo.data as data
from zoo.data.builders.mqar import TASK as MQAR
from zoo.data.builders.passkey import TASK as PASSKEY
from zoo.data.builders.passkey import passkey as passkey_lib
from zoo.data.builders.selective_copy import TASK as SELECTIVE_COPY
from zoo.data.sources import synthetic_builder
from zoo.data.tokenizers import ByteTokenizer

BYTES = ByteTokenizer()


def _examples(task, overrides=None, n=20, stream=0):
  settings = task.settings(overrides)
  return settings, [task.make_example(np.random.default_rng([0, stream, i]), settings) for i in range(n)]


def _check_common(task, settings, ex):
  tokens, weights = ex["tokens"], ex["weights"]
  assert tokens.dtype == np.int32 and weights.dtype == np.float32
  assert len(tokens) == len(weights) == task.example_length(settings)
  assert tokens[0] == BYTES.bos_id and tokens[-1] == BYTES.eos_id
  assert set(np.unique(weights)) <= {0.0, 1.0}
  # The weighted tokens spell the answer.
  assert BYTES.decode(tokens[weights > 0]) == ex["answer"].replace(" ", "")
  return BYTES.decode(tokens)


@pytest.mark.parametrize("overrides", [None, {"num_pairs": 8, "num_queries": 3, "key_length": 1, "value_length": 1},
                                       {"num_pairs": 40, "num_queries": 20, "key_length": 3, "value_length": 3}])
def test_mqar_answer_is_the_value_paired_with_the_queried_key(overrides):
  settings, examples = _examples(MQAR, overrides)
  for ex in examples:
    text = _check_common(MQAR, settings, ex)
    pairs_line, queries_line = text.split("\n")
    pairs = dict(item.split(":") for item in pairs_line.split(" "))
    assert len(pairs) == settings["num_pairs"]  # keys distinct
    assert len(set(pairs.values())) == settings["num_pairs"]  # values distinct
    assert all(re.fullmatch(f"[a-z]{{{settings['key_length']}}}", k) for k in pairs)
    assert all(re.fullmatch(f"[0-9]{{{settings['value_length']}}}", v) for v in pairs.values())
    queries = [item.split(":") for item in queries_line.split(" ")]
    assert len(queries) == len({k for k, _ in queries}) == settings["num_queries"]
    assert [v for _, v in queries] == ex["answer"].split(" ")
    for key, value in queries:
      assert pairs[key] == value
    # Exactly the value digits on the query line are weighted.
    assert ex["weights"].sum() == settings["num_queries"] * settings["value_length"]
    assert not ex["weights"][:len(pairs_line) + 2].any()


def test_passkey_digits_are_in_the_haystack_at_the_requested_depth():
  positions = {}
  for depth in (0.0, 0.5, 1.0):
    settings, examples = _examples(PASSKEY, {"length": 600, "depth": depth}, n=5)
    for ex in examples:
      text = _check_common(PASSKEY, settings, ex)
      key = ex["answer"]
      assert re.fullmatch(r"[0-9]{5}", key)
      haystack, question = text.rsplit("What is the pass key?", 1)
      assert f"The pass key is {key}. Remember it. {key} is the pass key." in haystack
      assert question == f" The pass key is {key}"
      assert text.startswith(passkey_lib.INTRO)
      positions.setdefault(depth, []).append(haystack.index("The pass key is") / len(haystack))
  assert max(positions[0.0]) < 0.3 < min(positions[0.5]) <= max(positions[0.5]) < 0.7 < min(positions[1.0])


def test_passkey_random_depth_varies():
  settings, examples = _examples(PASSKEY, {"length": 800, "depth": -1.0}, n=10)
  where = {BYTES.decode(ex["tokens"]).index("The pass key is") for ex in examples}
  assert len(where) > 3


def test_selective_copy_answer_is_the_scattered_letters_in_order():
  settings, examples = _examples(SELECTIVE_COPY, {"num_tokens": 6, "length": 40})
  for ex in examples:
    text = _check_common(SELECTIVE_COPY, settings, ex)
    region, answer = text.split("|")
    assert len(region) == 40 - 6 - 3
    assert set(region) <= set(".abcdefghijklmnopqrstuvwxyz")
    assert region.replace(".", "") == answer == ex["answer"]
    assert len(answer) == 6
  # Gaps are random, not a fixed shift.
  assert len({BYTES.decode(ex["tokens"]).index(ex["answer"][0]) for ex in examples}) > 3


@pytest.mark.parametrize("task,overrides,field", [
    (MQAR, {"num_pairs": 4, "num_queries": 5}, "data.mqar.num_queries"),
    (MQAR, {"num_pairs": 27, "key_length": 1}, "data.mqar.key_length"),
    (MQAR, {"num_pairs": 11, "num_queries": 2, "value_length": 1}, "data.mqar.value_length"),
    (PASSKEY, {"length": 100}, "data.passkey.length"),
    (PASSKEY, {"depth": 1.5}, "data.passkey.depth"),
    (SELECTIVE_COPY, {"num_tokens": 20, "length": 30}, "data.selective_copy.length"),
    (MQAR, {"num_keys": 3}, "data.mqar"),
])
def test_bad_settings_name_the_field(task, overrides, field):
  with pytest.raises(ValueError, match=re.escape(field)):
    task.settings(overrides)


@pytest.mark.parametrize("name,seq_len,field", [("mqar", 64, "data.mqar.num_pairs"),
                                                 ("passkey", 512, "data.passkey.length"),
                                                 ("selective_copy", 128, "data.selective_copy.length")])
def test_examples_longer_than_seq_len_are_an_error_naming_the_setting(make_cfg, name, seq_len, field):
  with pytest.raises(ValueError, match=rf"{re.escape(field)}=.*seq_len={seq_len}"):
    data.build_iterator(make_cfg(name), split="train", seq_len=seq_len, batch_size=2, seed=0, train=True)


def _records(builder, split):
  src = builder.as_data_source(split)
  return [(tuple(src[i]["tokens"]), tuple(src[i]["weights"]), src[i]["answer"]) for i in range(len(src))]


@pytest.mark.parametrize("name,settings", [("mqar", {"num_pairs": 6, "num_queries": 4}),
                                           ("passkey", {"length": 400}),
                                           ("selective_copy", {"num_tokens": 5, "length": 48})])
def test_builders_are_deterministic_by_seed_and_settings_do_not_collide(make_cfg, tmp_path, name, settings):
  cfg = make_cfg(name, **{name: settings})
  builder = synthetic_builder(cfg)
  assert len(builder.as_data_source("train")) == 48 and len(builder.as_data_source("validation")) == 10
  train, validation = _records(builder, "train"), _records(builder, "validation")
  assert not set(train) & set(validation)
  for tokens, weights, answer in train[:5]:
    assert len(tokens) == len(weights) and sum(weights) > 0 and answer
  # The same settings in another data_dir give the same examples ...
  again = make_cfg(name, **{name: settings}, data_dir=str(tmp_path / "again"))
  assert sorted(_records(synthetic_builder(again), "train")) == sorted(train)
  # ... another generation seed gives other examples, in another directory.
  other = make_cfg(name, **{name: settings}, generation_seed=1)
  other_builder = synthetic_builder(other)
  assert other_builder.data_dir != builder.data_dir
  assert set(_records(other_builder, "train")).isdisjoint(train)
  # More examples keep the first ones (each example has its own seed).
  more = synthetic_builder(make_cfg(name, **{name: settings}, num_examples=60))
  assert set(train) <= set(_records(more, "train"))


@pytest.mark.parametrize("task", ["mqar", "passkey", "selective_copy"])
def test_eval_probes_fill_seq_len_and_are_eval_only(data_dir, task):
  cfg = data.eval_probe_config(task, seq_len=300, data_dir=data_dir)
  length = {"mqar": MQAR, "passkey": PASSKEY, "selective_copy": SELECTIVE_COPY}[task].example_length(
      cfg[task].to_dict())
  assert 300 - 12 < length <= 300
  cfg.num_eval_examples = 8  # keep the test small
  batches = list(data.build_iterator(cfg, split="validation", seq_len=300, batch_size=4, seed=0, train=False))
  assert len(batches) == 2 and all((b["weights"].sum(axis=1) > 0).all() for b in batches)
  with pytest.raises(ValueError, match="no split 'train'"):
    data.build_iterator(cfg, split="train", seq_len=300, batch_size=4, seed=0, train=True)


def test_eval_probe_too_long_for_seq_len_names_it():
  with pytest.raises(ValueError, match=r"seq_len=100 is too short for the passkey probe"):
    data.eval_probe_config("passkey", seq_len=100)
  with pytest.raises(ValueError, match="unknown probe task"):
    data.eval_probe_config("text", seq_len=100)
