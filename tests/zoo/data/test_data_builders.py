"""Offline tfds builders: pydoc_text's splits, build-once caching, concurrent builds."""

import os
import re
import subprocess
import sys

import pytest

import zoo
from zoo.data import preparation
from zoo.data import sources
from zoo.data.builders.pydoc_text import PydocText, is_held_out


def _topics(builder, split):
  src = builder.as_data_source(split)
  return {src[i]["topic"].decode(): src[i]["text"].decode() for i in range(len(src))}


def test_pydoc_text_builds_offline_with_disjoint_nonempty_english_splits(data_dir):
  from pydoc_data.topics import topics
  builder = preparation.prepare(PydocText, data_dir)
  assert builder.is_prepared() and str(builder.info.file_format.value) == "array_record"
  train, validation = _topics(builder, "train"), _topics(builder, "validation")
  assert train and validation
  assert not set(train) & set(validation)
  assert set(train) | set(validation) == set(topics)
  assert 0.04 < len(validation) / len(topics) < 0.2
  assert all(is_held_out(t) for t in validation) and not any(is_held_out(t) for t in train)
  for split in (train, validation):
    text = " ".join(split.values())
    assert text == " ".join(topics[t] for t in split)  # stored verbatim
    words = re.findall(r"[a-z]+", text.lower())
    # Real English: the commonest English words are among the commonest here.
    assert {"the", "of", "is", "a", "to", "and"} <= {w for w, _ in _most_common(words, 20)}


def _most_common(words, n):
  counts = {}
  for w in words:
    counts[w] = counts.get(w, 0) + 1
  return sorted(counts.items(), key=lambda kv: -kv[1])[:n]


def test_build_is_cached_and_leaves_no_scratch(data_dir):
  first = preparation.prepare(PydocText, data_dir)
  info = os.path.join(first.data_dir, "dataset_info.json")
  stamp = os.stat(info).st_mtime_ns
  again = preparation.prepare(PydocText, data_dir)
  assert again.data_dir == first.data_dir and os.stat(info).st_mtime_ns == stamp
  assert not [d for d in os.listdir(data_dir) if d.startswith(".building-")]


_BUILD_IN_A_PROCESS = """
import sys
import zoo.data as data
from zoo.data.sources import synthetic_builder
cfg = data.default_data_config("selective_copy")
cfg.data_dir = sys.argv[1]
cfg.num_examples = 300
cfg.num_eval_examples = 7
b = synthetic_builder(cfg)
print(len(b.as_data_source("train")), len(b.as_data_source("validation")), b.data_dir)
"""


def test_two_processes_building_at_once_both_get_the_one_dataset(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(zoo.__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo] + sys.path))
  procs = [subprocess.Popen([sys.executable, "-c", _BUILD_IN_A_PROCESS, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  lines = {out.strip().splitlines()[-1] for out, _ in outs}
  assert len(lines) == 1 and lines.pop().startswith("300 7 ")
  versions = os.listdir(os.path.join(tmp_path, "selective_copy"))
  assert len(versions) == 1
  assert not [d for d in os.listdir(tmp_path) if d.startswith(".building-")]


def test_synthetic_settings_are_recorded_in_the_config_name(make_cfg):
  a = sources.synthetic_builder(make_cfg("mqar", mqar={"num_pairs": 5, "num_queries": 2}))
  b = sources.synthetic_builder(make_cfg("mqar", mqar={"num_pairs": 6, "num_queries": 2}))
  assert a.info.full_name != b.info.full_name
  assert "pairs5" in a.info.full_name and "queries2" in a.info.full_name and "seed0" in a.info.full_name


@pytest.mark.parametrize("name", ["mqar", "passkey", "selective_copy"])
def test_synthetic_features_are_tokens_weights_answer(make_cfg, name):
  src = sources.synthetic_builder(make_cfg(name)).as_data_source("validation")
  ex = src[0]
  assert set(ex) == {"tokens", "weights", "answer"}
  assert ex["tokens"].dtype.name == "int32" and ex["weights"].dtype.name == "float32"
