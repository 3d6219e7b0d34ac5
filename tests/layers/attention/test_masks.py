"""Masks are data: each kind renders the visibility its docstring states."""

import jax.numpy as jnp
import numpy as np
import pytest

from layers.attention.masks import Mask


def dense(mask, b=1, tq=6, tk=6):
  return np.asarray(mask.dense(b, tq, tk))[:, 0]


def test_causal_and_bidirectional():
  np.testing.assert_array_equal(dense(Mask.make_causal())[0], np.tril(np.ones((6, 6), bool)))
  assert dense(Mask.bidirectional()).all()


def test_sliding_window_left_right():
  d = dense(Mask.sliding_window(2, 1, causal=False))[0]
  i, j = np.indices((6, 6))
  np.testing.assert_array_equal(d, (j >= i - 2) & (j <= i + 1))
  d = dense(Mask.sliding_window(2))[0]
  np.testing.assert_array_equal(d, (j >= i - 2) & (j <= i))


def test_chunked():
  d = dense(Mask.chunked(3, causal=False))[0]
  i, j = np.indices((6, 6))
  np.testing.assert_array_equal(d, (i // 3) == (j // 3))


def test_prefix_lm():
  d = dense(Mask.prefix_lm(jnp.array([2, 4])), b=2)
  i, j = np.indices((6, 6))
  for b, p in enumerate([2, 4]):
    np.testing.assert_array_equal(d[b], (j <= i) | (j < p))


def test_segments_with_restarting_positions():
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  pos = jnp.array([[0, 1, 2, 0, 1, 0]])
  d = dense(Mask.make_causal().with_segments(seg, pos))[0]
  expected = np.zeros((6, 6), bool)
  expected[:3, :3] = np.tril(np.ones((3, 3), bool))
  expected[3:5, 3:5] = np.tril(np.ones((2, 2), bool))
  expected[5, 5] = True  # padding sees only itself (its row is dropped by the loss weights)
  np.testing.assert_array_equal(d, expected)


def test_padding():
  d = dense(Mask.bidirectional().with_padding(jnp.array([4, 6])), b=2)
  assert d[0][:, :4].all() and not d[0][:, 4:].any()
  assert d[1].all()


def test_decode_alignment_bottom_right():
  d = dense(Mask.make_causal(), tq=2, tk=5)[0]
  np.testing.assert_array_equal(d, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


def test_bad_window_errors():
  with pytest.raises(ValueError, match="local_window_size"):
    Mask.sliding_window(-1).dense(1, 4, 4)
