"""build_iterator: the batch contract, eval passes, host shards, exact resume, errors, tfds:<name>."""

import json

import numpy as np
import pytest

import zoo.data as data
from zoo.data.builders.pydoc_text import is_held_out
from zoo.data.builders.pydoc_text.pydoc_text import python_config_name

KEYS = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
        "weights": np.float32}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _check_batch(batch, batch_size, seq_len):
  assert set(batch) == set(KEYS)
  for k, dtype in KEYS.items():
    assert batch[k].shape == (batch_size, seq_len) and batch[k].dtype == dtype, k
  seg, w = batch["segment_ids"], batch["weights"]
  same_next = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
  np.testing.assert_array_equal(batch["targets"][:, :-1][same_next], batch["inputs"][:, 1:][same_next])
  assert np.all(w[:, :-1][~same_next] == 0) and np.all(w[:, -1] == 0)  # last token of a segment / padding
  assert np.all(w[seg == 0] == 0) and np.all(batch["inputs"][seg == 0] == 0)
  starts = np.ones_like(seg, bool)
  starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
  assert np.all(batch["positions"][starts & (seg > 0)] == 0)
  inside = ~starts[:, 1:] & (seg[:, 1:] > 0)
  assert np.all(batch["positions"][:, 1:][inside] == batch["positions"][:, :-1][inside] + 1)


def test_pydoc_train_batches_follow_the_contract(make_cfg):
  cfg = make_cfg("pydoc_text", read_threads=2)
  it = data.build_iterator(cfg, split="train", seq_len=128, batch_size=4, seed=0, train=True)
  tok = data.get_tokenizer(cfg)
  for batch in _take(it, 5):
    _check_batch(batch, 4, 128)
    assert batch["weights"].sum() >= 4 * 126  # packed: almost nothing wasted
  text = tok.decode(batch["inputs"][0])
  assert sum(c.isalpha() or c.isspace() for c in text) > 0.6 * len(text)


def test_pydoc_eval_is_one_deterministic_pass_over_every_token_pair(make_cfg):
  from pydoc_data.topics import topics
  cfg = make_cfg("pydoc_text")
  a = list(data.build_iterator(cfg, split="validation", seq_len=256, batch_size=8, seed=0, train=False))
  b = list(data.build_iterator(cfg, split="validation", seq_len=256, batch_size=8, seed=5, train=False))
  assert len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
  for batch in a:
    _check_batch(batch, 8, 256)
  # bos + bytes + eos per document; every next-token pair once.
  expected = sum(len(t.encode("utf-8")) + 1 for name, t in topics.items() if is_held_out(name))
  assert sum(batch["weights"].sum() for batch in a) == expected
  last = a[-1]
  empty = last["segment_ids"].max(axis=1) == 0
  assert empty.any() and np.all(last["weights"][empty] == 0)


def test_unpacked_rows_hold_one_document(make_cfg):
  cfg = make_cfg("pydoc_text", packing=False)
  for batch in data.build_iterator(cfg, split="validation", seq_len=512, batch_size=4, seed=0, train=False):
    _check_batch(batch, 4, 512)
    assert batch["segment_ids"].max() <= 1


def test_training_order_depends_on_the_seed_only(make_cfg):
  cfg = make_cfg("pydoc_text")
  first = lambda seed: next(data.build_iterator(cfg, split="train", seq_len=64, batch_size=4, seed=seed, train=True))
  assert _equal(first(3), first(3))
  assert not _equal(first(3), first(4))


def test_training_repeats_forever(make_cfg):
  cfg = make_cfg("selective_copy", selective_copy={"num_tokens": 4, "length": 30})
  it = data.build_iterator(cfg, split="validation", seq_len=32, batch_size=4, seed=0, train=True)
  seen = [tuple(row) for batch in _take(it, 10) for row in batch["inputs"]]
  assert len(seen) == 40 and len(set(seen)) == 10  # 10 validation examples, 4 epochs


@pytest.mark.parametrize("name", ["mqar", "passkey", "selective_copy"])
def test_synthetic_batches_weight_only_the_answers(make_cfg, name):
  cfg = make_cfg(name)
  seq_len = {"mqar": 256, "passkey": 1024, "selective_copy": 256}[name]
  tok = data.get_tokenizer(cfg)
  for batch in data.build_iterator(cfg, split="validation", seq_len=seq_len, batch_size=4, seed=0, train=False):
    _check_batch(batch, 4, seq_len)
    for row in range(4):
      if batch["segment_ids"][row].max() == 0:
        continue
      assert batch["segment_ids"][row].max() == 1  # one example per row (packing off)
      answer = tok.decode(batch["targets"][row][batch["weights"][row] > 0])
      text = tok.decode(batch["inputs"][row])
      if name == "passkey":
        assert len(answer) == 5 and text.endswith(f"The pass key is {answer}") and text.count(answer) == 3
      elif name == "mqar":
        pairs = dict(item.split(":") for item in text.split("\n")[0].split(" "))
        queries = [item.split(":") for item in text.split("\n")[1].split(" ")]
        assert answer == "".join(pairs[k] for k, _ in queries)
      else:
        assert answer == text.split("|")[0].replace(".", "")


def test_packed_synthetic_examples_stay_whole(make_cfg):
  cfg = make_cfg("mqar", packing=True, mqar={"num_pairs": 4, "num_queries": 2})
  batch = next(data.build_iterator(cfg, split="train", seq_len=128, batch_size=2, seed=0, train=True))
  _check_batch(batch, 2, 128)
  assert batch["segment_ids"].max() > 1
  for row in range(2):
    for s in range(1, batch["segment_ids"][row].max() + 1):
      where = batch["segment_ids"][row] == s
      assert where.sum() == 37 and batch["weights"][row][where].sum() == 4


def _all_rows(cfg, split, seq_len, **kwargs):
  rows = []
  for batch in data.build_iterator(cfg, split=split, seq_len=seq_len, batch_size=3, seed=0, train=False, **kwargs):
    rows += [tuple(r) for r, s in zip(batch["inputs"], batch["segment_ids"]) if s.max() > 0]
  return rows


def test_host_shards_are_disjoint_and_cover_the_data(make_cfg):
  cfg = make_cfg("mqar")
  everything = _all_rows(cfg, "train", 256)
  assert len(everything) == len(set(everything)) == 48
  shards = [_all_rows(cfg, "train", 256, shard_index=i, shard_count=3) for i in range(3)]
  assert sum(len(s) for s in shards) == 48
  assert set().union(*map(set, shards)) == set(everything)
  # Training streams stay inside their shard too.
  for i, shard in enumerate(shards):
    it = data.build_iterator(cfg, split="train", seq_len=256, batch_size=4, seed=1, train=True, shard_index=i,
                             shard_count=3)
    assert {tuple(r) for b in _take(it, 4) for r in b["inputs"]} == set(shard)


@pytest.mark.parametrize("name,train,read_threads", [("pydoc_text", True, 2), ("pydoc_text", False, 0),
                                                      ("mqar", True, 2), ("passkey", False, 2)])
def test_resumed_iterator_yields_exactly_the_same_next_batches(make_cfg, name, train, read_threads):
  cfg = make_cfg(name, read_threads=read_threads, num_eval_examples=30)
  kwargs = dict(split="train" if train else "validation", seq_len={"passkey": 1024, "mqar": 256}.get(name, 128),
                batch_size=3, seed=7, train=train)
  it = data.build_iterator(cfg, **kwargs)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  resumed = data.build_iterator(cfg, **kwargs)
  resumed.set_state(state)
  assert all(_equal(a, b) for a, b in zip(_take(resumed, 4), expected))
  # The state is a snapshot: taking more batches does not change a saved one.
  assert json.loads(json.dumps(it.get_state())) != state


def test_state_from_another_pipeline_is_refused(make_cfg):
  cfg = make_cfg("pydoc_text")
  it = data.build_iterator(cfg, split="train", seq_len=64, batch_size=2, seed=0, train=True)
  state = it.get_state()
  other = data.build_iterator(cfg, split="train", seq_len=128, batch_size=2, seed=0, train=True)
  with pytest.raises(ValueError, match="seq_len: saved 64, now 128"):
    other.set_state(state)


def test_unknown_name_and_fields_are_errors(make_cfg):
  with pytest.raises(ValueError, match=r"data\.name='wikipedia'.*pydoc_text.*mqar.*tfds:"):
    data.default_data_config("wikipedia")
  cfg = make_cfg("pydoc_text")
  cfg.name = "wikipedia"
  with pytest.raises(ValueError, match=r"data\.name='wikipedia'"):
    data.build_iterator(cfg, split="train", seq_len=64, batch_size=2, seed=0, train=True)
  cfg = make_cfg("pydoc_text")
  cfg.packnig = True
  with pytest.raises(ValueError, match=r"data\.packnig"):
    data.build_iterator(cfg, split="train", seq_len=64, batch_size=2, seed=0, train=True)
  with pytest.raises(ValueError, match=r"no split 'test'.*\['train', 'validation'\]"):
    data.build_iterator(make_cfg("pydoc_text"), split="test", seq_len=64, batch_size=2, seed=0, train=True)


@pytest.mark.parametrize("name", ["tfds:lm1b", "tfds:c4/en", "tfds:no_such_dataset_anywhere"])
def test_tfds_dataset_missing_offline_is_a_one_line_error(make_cfg, name):
  cfg = make_cfg(name)
  with pytest.raises(FileNotFoundError) as err:
    data.build_iterator(cfg, split="train", seq_len=64, batch_size=2, seed=0, train=True)
  message = str(err.value)
  assert "\n" not in message
  assert f"data.name={name!r}" in message and f"data.data_dir={cfg.data_dir!r}" in message
  assert "download_and_prepare" in message and "array_record" in message


def test_any_prepared_tfds_dataset_is_read_by_name(make_cfg):
  # pydoc_text built into data_dir is a tfds dataset like any other.
  data.build_iterator(make_cfg("pydoc_text"), split="validation", seq_len=64, batch_size=2, seed=0, train=False)
  name = f"tfds:pydoc_text/{python_config_name()}"
  cfg = make_cfg(name)
  via_tfds = list(data.build_iterator(cfg, split="validation", seq_len=256, batch_size=8, seed=0, train=False))
  direct = list(data.build_iterator(make_cfg("pydoc_text"), split="validation", seq_len=256, batch_size=8, seed=0,
                                    train=False))
  assert len(via_tfds) == len(direct) and all(_equal(a, b) for a, b in zip(via_tfds, direct))
  with pytest.raises(ValueError, match=r"data\.text_key='body'.*\['text', 'topic'\]"):
    data.build_iterator(make_cfg(name, text_key="body"), split="train", seq_len=64, batch_size=2, seed=0,
                        train=True)


def test_default_config_has_every_field_and_env_data_dir(monkeypatch):
  monkeypatch.setenv("ATTENTION_ZOO_DATA_DIR", "/somewhere/tfds")
  for name in ("pydoc_text", "mqar", "passkey", "selective_copy", "tfds:lm1b"):
    cfg = data.default_data_config(name)
    assert cfg.name == name and cfg.data_dir == "/somewhere/tfds"
    for field in ("tokenizer", "text_key", "packing", "num_examples", "num_eval_examples"):
      assert field in cfg
    assert cfg.mqar.num_pairs and cfg.passkey.length and cfg.selective_copy.num_tokens
  # Auto defaults follow the name, also when the name is changed after the fact.
  from zoo.data.config import complete
  text = data.default_data_config("pydoc_text")
  assert complete(text).packing is True and complete(text).shuffle_window == 128
  text.name = "mqar"
  assert complete(text).packing is False and complete(text).shuffle_window == 0
  text.packing = True
  assert complete(text).packing is True


def test_iterator_checkpoints_with_orbax_through_grains_handler(make_cfg, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  import grain
  cfg = make_cfg("pydoc_text")
  make = lambda: data.build_iterator(cfg, split="train", seq_len=64, batch_size=2, seed=0, train=True)
  it = make()
  _take(it, 5)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = _take(it, 2)
    resumed = make()
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert all(_equal(a, b) for a, b in zip(_take(resumed, 2), expected))


def test_wrong_type_names_the_field(make_cfg):
  cfg = make_cfg("pydoc_text").to_dict()
  cfg["packing"] = "yes"
  with pytest.raises(TypeError, match=r"data\.packing='yes'"):
    data.build_iterator(cfg, split="train", seq_len=64, batch_size=2, seed=0, train=True)
