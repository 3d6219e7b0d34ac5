"""Tokenizers: the byte tokenizer's ids, file loaders, and their errors."""

import sys

import numpy as np
import pytest

import zoo.data as data
from zoo.data import tokenizers


def test_byte_tokenizer_ids_and_round_trip():
  tok = tokenizers.ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
  assert tok.encode("A") == [ord("A") + 3]
  text = "Grüße, 世界: x = 1\n"
  ids = tok.encode(text)
  assert len(ids) == len(text.encode("utf-8"))
  assert min(ids) >= 3 and max(ids) < 259
  assert tok.decode(ids) == text
  # Special ids carry no text.
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
  np.testing.assert_array_equal(tok.encode_array(text.encode("utf-8")), ids)
  with pytest.raises(ValueError):
    tok.decode([259])


def test_vocab_size_and_get_tokenizer(make_cfg):
  assert data.vocab_size(make_cfg("pydoc_text")) == 259
  assert data.vocab_size(make_cfg("mqar")) == 259
  tok = data.get_tokenizer(make_cfg("pydoc_text"))
  assert tok.decode(tok.encode("hello")) == "hello"


def test_missing_tokenizer_file_names_the_setting(make_cfg, tmp_path):
  cfg = make_cfg("pydoc_text", tokenizer=str(tmp_path / "nope.model"))
  with pytest.raises(FileNotFoundError, match=r"data\.tokenizer.*sentencepiece.*tokenizers"):
    data.get_tokenizer(cfg)
  with pytest.raises(FileNotFoundError, match=r"data\.tokenizer"):
    data.build_iterator(cfg, split="train", seq_len=32, batch_size=2, seed=0, train=True)


def test_missing_package_names_the_setting_and_what_to_install(tmp_path, monkeypatch):
  path = tmp_path / "tok.model"
  path.write_bytes(b"\x0a\x00")
  monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails
  tokenizers.load_tokenizer.cache_clear()
  with pytest.raises(ImportError, match=r"data\.tokenizer.*pip install sentencepiece"):
    tokenizers.load_tokenizer(str(path))
  json_path = tmp_path / "tokenizer.json"
  json_path.write_text("{}")
  monkeypatch.setitem(sys.modules, "tokenizers", None)
  with pytest.raises(ImportError, match=r"data\.tokenizer.*pip install tokenizers"):
    tokenizers.load_tokenizer(str(json_path))


def test_synthetic_tasks_require_bytes(make_cfg, tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_text("{}")
  with pytest.raises(ValueError, match=r"data\.tokenizer='bytes'"):
    data.get_tokenizer(make_cfg("mqar", tokenizer=str(path)))


def _pydoc_lines(n=300):
  from pydoc_data.topics import topics
  return [line for text in topics.values() for line in text.splitlines() if line.strip()][:n]


def test_sentencepiece_file(tmp_path, make_cfg):
  spm = pytest.importorskip("sentencepiece")
  prefix = tmp_path / "sp"
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_pydoc_lines()), model_prefix=str(prefix),
                                 vocab_size=300, model_type="bpe", pad_id=0, unk_id=3, bos_id=1, eos_id=2,
                                 minloglevel=2)
  cfg = make_cfg("pydoc_text", tokenizer=str(prefix) + ".model")
  tok = data.get_tokenizer(cfg)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (300, 0, 1, 2)
  assert tok.decode(tok.encode("The assert statement")) == "The assert statement"
  batch = next(data.build_iterator(cfg, split="validation", seq_len=64, batch_size=2, seed=0, train=False))
  assert batch["inputs"].max() < 300 and batch["inputs"][0, 0] == tok.bos_id


def test_hugging_face_tokenizer_json(tmp_path, make_cfg):
  tk = pytest.importorskip("tokenizers")
  model = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
  model.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  model.decoder = tk.decoders.ByteLevel()
  trainer = tk.trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                   initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
  model.train_from_iterator(_pydoc_lines(), trainer=trainer)
  path = tmp_path / "tokenizer.json"
  model.save(str(path))
  cfg = make_cfg("pydoc_text", tokenizer=str(path))
  tok = data.get_tokenizer(cfg)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.decode(tok.encode("The assert statement")) == "The assert statement"
  assert data.vocab_size(cfg) == tok.vocab_size
