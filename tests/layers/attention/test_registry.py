import pytest

from layers.attention import registry


def test_mha_registered():
  assert "mha" in registry.names()
  assert registry.get("mha").family_id == "mha"


def test_unknown_id_rejected_with_the_setting_named():
  with pytest.raises(ValueError, match=r"unknown attention family 'nope_such'.*model.attention.*mha"):
    registry.get("nope_such")


def test_options_flag_form_parses_literals_and_nested_commas():
  from layers.attention.config import parse_options
  assert parse_options("gate=headwise,top_k=2,layout=(2, (3, 3), 3),on=True") == {
      "gate": "headwise", "top_k": 2, "layout": (2, (3, 3), 3), "on": True}
  assert parse_options("") == {} and parse_options({"a": 1}) == {"a": 1}
  with pytest.raises(ValueError, match="model.attention_options: 'gate' is not key=value"):
    parse_options("gate")
