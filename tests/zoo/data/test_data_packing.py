"""The packer: documents never share a segment, targets never cross one, every pair is trained once, exact resume."""

import json

import grain
import numpy as np
import pytest

from zoo.data.packing import PackIterDataset

LENGTHS = [5, 13, 3, 9, 1, 30, 7, 2, 16, 8, 4]


def _docs(lengths=LENGTHS, weights=False):
  docs = []
  for d, n in enumerate(lengths):
    # Token values encode (document, index) so any mix-up is visible.
    doc = {"tokens": (1000 * (d + 1) + np.arange(n)).astype(np.int32)}
    if weights:
      doc["weights"] = (np.arange(n) % 3 == 0).astype(np.float32)
    docs.append(doc)
  return docs


def _rows(docs, **kwargs):
  ds = PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(grain.ReadOptions(num_threads=0)), **kwargs)
  return list(ds)


def _check_row_invariants(row, seq_len):
  inputs, targets, seg, pos, w = (row[k] for k in ("inputs", "targets", "segment_ids", "positions", "weights"))
  for k, dtype in (("inputs", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                   ("positions", np.int32), ("weights", np.float32)):
    assert row[k].shape == (seq_len,) and row[k].dtype == dtype
  real = seg > 0
  # Padding only at the end; segment ids count up from 1.
  assert not np.any(real[1:] & ~real[:-1])
  ids = seg[real]
  assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
  for s in np.unique(ids):
    where = np.flatnonzero(seg == s)
    doc = inputs[where] // 1000
    assert len(set(doc)) == 1  # one document per segment
    np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # positions restart
    np.testing.assert_array_equal(targets[where[:-1]], inputs[where[1:]])  # shift within the segment
    assert targets[where[-1]] == 0 and w[where[-1]] == 0  # the last token predicts nothing
  # No document appears twice in one row.
  firsts = [inputs[np.flatnonzero(seg == s)[0]] // 1000 for s in np.unique(ids)]
  assert len(firsts) == len(set(firsts))
  assert np.all(inputs[~real] == 0) and np.all(targets[~real] == 0) and np.all(w[~real] == 0)


@pytest.mark.parametrize("seq_len", [4, 8, 16, 31])
def test_packed_text_rows_keep_documents_apart_and_train_every_pair_once(seq_len):
  rows = _rows(_docs(), seq_len=seq_len, split_long=True)
  pairs = []
  for row in rows:
    _check_row_invariants(row, seq_len)
    valid = row["weights"] > 0
    pairs += list(zip(row["inputs"][valid], row["targets"][valid]))
  expected = [(1000 * (d + 1) + i, 1000 * (d + 1) + i + 1) for d, n in enumerate(LENGTHS) for i in range(n - 1)]
  assert sorted(pairs) == sorted(expected)  # each next-token pair exactly once, none across documents
  # Greedy packing: every row but the last is full, or one short where a
  # one-token piece would train nothing.
  assert all(int((r["segment_ids"] > 0).sum()) >= seq_len - 1 for r in rows[:-1])


def test_unpacked_rows_hold_one_document_each():
  rows = _rows(_docs(), seq_len=8, split_long=True, max_segments=1)
  for row in rows:
    _check_row_invariants(row, 8)
    assert row["segment_ids"].max() == 1


def test_examples_are_never_cut_and_answer_weights_shift_onto_the_predicting_position():
  docs = _docs([5, 3, 7, 2, 6], weights=True)
  rows = _rows(docs, seq_len=8, split_long=False)
  seen = []
  for row in rows:
    _check_row_invariants(row, 8)
    for s in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
      where = np.flatnonzero(row["segment_ids"] == s)
      doc = docs[row["inputs"][where[0]] // 1000 - 1]
      np.testing.assert_array_equal(row["inputs"][where], doc["tokens"])  # whole
      np.testing.assert_array_equal(row["weights"][where[:-1]], doc["weights"][1:])
      seen.append(int(row["inputs"][where[0]]))
  assert sorted(seen) == [1000 * (d + 1) for d in range(5)]
  with pytest.raises(ValueError, match="does not fit seq_len=4"):
    _rows(docs, seq_len=4, split_long=False)


@pytest.mark.parametrize("kwargs", [dict(seq_len=8, split_long=True), dict(seq_len=8, split_long=True, max_segments=1),
                                    dict(seq_len=16, split_long=False)])
def test_state_resumes_exactly_at_every_row(kwargs):
  docs = _docs() if kwargs["split_long"] else _docs([5, 3, 7, 2, 6, 9, 1, 4])
  source = grain.MapDataset.source(docs)
  make = lambda: iter(PackIterDataset(source.to_iter_dataset(grain.ReadOptions(num_threads=0)), **kwargs))
  reference = list(make())
  it = make()
  for n in range(len(reference) + 1):
    state = json.loads(json.dumps(it.get_state()))
    resumed = make()
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - n
    for a, b in zip(rest, reference[n:]):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    if n < len(reference):
      next(it)
