import ml_collections
import numpy as np
import pytest

from zoo.training.optimizer import make_optimizer, make_schedule


def opt(**kw):
  c = ml_collections.ConfigDict(dict(name="adamw", learning_rate=1.0, schedule="warmup_cosine",
                                     warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2,
                                     b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  c.update(kw)
  return c


def test_warmup_cosine_shape():
  s = make_schedule(opt(), 110)
  np.testing.assert_allclose([s(0), s(9), s(10), s(110)], [0.1, 1.0, 1.0, 0.1], atol=1e-6)
  assert s(60) < s(30) < s(10)


def test_wsd_is_flat_then_decays_linearly():
  s = make_schedule(opt(schedule="wsd"), 110)  # warmup 10, stable 78, decay 22
  np.testing.assert_allclose([s(10), s(50), s(88)], [1.0, 1.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(s(99), 1.0 - 0.9 * 11 / 22, atol=1e-6)
  np.testing.assert_allclose(s(110), 0.1, atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(schedule="linear9"), "optimizer.schedule"),
    (dict(name="lion9"), "optimizer.name"),
    (dict(warmup_steps=-1), "optimizer.warmup_steps"),
])
def test_errors_name_the_setting(kw, match):
  with pytest.raises(ValueError, match=match):
    make_optimizer(opt(**kw), 100)
