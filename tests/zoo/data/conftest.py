"""Shared fixtures: one tfds data_dir per test session, small synthetic settings."""

import pytest

import zoo.data as data


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def make_cfg(data_dir):
  """default_data_config(name) pointed at the session data_dir, with small synthetic splits."""

  def make(name, **overrides):
    cfg = data.default_data_config(name)
    cfg.data_dir = data_dir
    cfg.num_examples = 48
    cfg.num_eval_examples = 10
    cfg.read_threads = 0
    for key, value in overrides.items():
      if isinstance(value, dict):
        for k, v in value.items():
          cfg[key][k] = v
      else:
        cfg[key] = value
    return cfg

  return make

