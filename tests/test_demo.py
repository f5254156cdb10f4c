"""The README's demo, in a small configuration."""

import json

import numpy as np

from scribblejax.demo import run_demo
from scribblejax.refine import RefineConfig


def test_demo_writes_dice_and_overlay(tmp_path):
  lines = []
  results = run_demo(tmp_path, train_steps=8, interactions=1, config=RefineConfig.paper(max_steps=5), log=lines.append)
  assert (tmp_path / "overlay.png").stat().st_size > 1000
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["dice_per_interaction"] == results["dice_per_interaction"]
  assert len(results["dice_per_interaction"]) == 2
  assert all(0.0 <= d <= 1.0 for d in results["dice_per_interaction"])
  assert 0 <= results["steps_per_interaction"][0] <= 5
  assert any("Dice" in line for line in lines)
  assert np.isfinite(results["seconds_per_interaction"]).all()


def test_demo_refuses_bad_counts_before_writing(tmp_path):
  import pytest
  for bad, message in ((dict(interactions=-1), "interactions"), (dict(layers=0), "positive integer")):
    with pytest.raises(ValueError, match=message):
      run_demo(tmp_path / "out", train_steps=8, log=lambda _: None, **bad)
    assert not (tmp_path / "out").exists()                 # was: the folder was made first
