"""bench/families.py end to end at 1 step: one line per (family, dataset, seed), with the sink mass
on text for an mha-core family and none for a family with its own core."""

import json
import os
import sys

import pytest

from bench import common, families


@pytest.mark.slow
def test_records_a_line_per_run(tmp_path, monkeypatch):
  monkeypatch.setattr(common, "RESULTS", str(tmp_path))
  monkeypatch.setattr(sys, "argv", ["families.py", "--families", "mha,entmax", "--datasets",
                                    "text", "--steps", "1", "--seeds", "0"])
  families.main()
  with open(os.path.join(tmp_path, "families.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [(r["family"], r["dataset"], r["seed"]) for r in lines] == [
      ("mha", "text", 0), ("entmax", "text", 0)]
  mha, entmax = lines
  assert 0.0 < mha["sink_mass"] < 1.0 and "sink_mass" not in entmax
  for r in lines:
    assert r["steps"] == 1 and r["params"] > 0 and r["eval_loss"] > 0 and r["step_s"] > 0


def test_every_dataset_makes_a_config_that_fits():
  from zoo.data import config as data_config
  from zoo.data.pipeline import check_fits
  for dataset in families.DATASETS:
    c = families.make_config("mha", dataset, 1, {})
    check_fits(data_config.complete(c.data), c.seq_len)
