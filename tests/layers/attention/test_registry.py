import pytest

from layers.attention import registry


def test_mha_registered():
  assert "mha" in registry.names()
  assert registry.get("mha").family_id == "mha"


def test_unknown_id_rejected_with_the_setting_named():
  with pytest.raises(ValueError, match=r"unknown attention family 'nope_such'.*model.attention.*mha"):
    registry.get("nope_such")
