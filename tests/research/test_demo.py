"""The README's demo, in a small configuration: what it reports is what its model and marks compute."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import foreground_dice

from scribblejax.config import RefineConfig
from scribblejax.models.store import load_model
from scribblejax.params import last_layers, split_params
from scribblejax.pipeline.normalization import normalize
from scribblejax.refinement import refine
from scribblejax.research import data
from scribblejax.research.demo import run_demo
from scribblejax.research.simulate import simulate_marks

# the refinement settings spelled out, so that no assertion here depends on RefineConfig's defaults
CONFIG = RefineConfig.paper(max_steps=5)


def nuclei_case():
  """The demo's default case rebuilt from the data and the shipped model: (model, image, truth)."""
  model, info = load_model("nuclei2d")
  ds = data.nuclei2d("binary")
  return model, normalize(ds.image, info.normalization)[ds.test], ds.labels[ds.test]


@pytest.mark.slow
def test_demo_reports_the_dice_of_its_model_and_marks(tmp_path):
  lines = []
  results = run_demo(tmp_path, interactions=1, layers=5, config=CONFIG, log=lines.append)
  assert results["backbone"] == "shipped nuclei2d"
  assert (tmp_path / "overlay.png").stat().st_size > 1000
  assert json.loads((tmp_path / "results.json").read_text())["dice_per_interaction"] == results["dice_per_interaction"]
  dice0, dice1 = results["dice_per_interaction"]
  # interaction 0: the shipped network alone, its forward pass called here
  model, image, truth = nuclei_case()
  initial = np.asarray(model(jnp.asarray(image)[None])[0]).argmax(-1)
  assert dice0 == pytest.approx(foreground_dice(initial, truth, 2), abs=1e-6)
  # interaction 1: the same simulated user's marks, refined here by refine() on the last 5 layers
  marks = simulate_marks(initial, truth, 2, kind="scribble")
  result = refine(split_params(model, last_layers(5)), image, marks, CONFIG)
  labels = np.asarray(result.logits).argmax(-1)
  assert dice1 == pytest.approx(foreground_dice(labels, truth, 2), abs=1e-6)
  assert results["steps_per_interaction"] == [int(result.num_steps)]
  (line,) = [s for s in lines if s.startswith("interaction 1:")]
  said = re.search(r"(\d+) marked pixels, (\d+) steps, satisfied=(True|False)", line)
  assert said.groups() == (str(int((marks >= 0).sum())), str(int(result.num_steps)), str(bool(result.satisfied)))
  if result.satisfied:  # satisfied means every mark is honoured
    assert np.array_equal(labels[marks >= 0], marks[marks >= 0])
  assert np.isfinite(results["seconds_per_interaction"]).all()


def test_demo_refuses_bad_counts_before_writing(tmp_path):
  for bad, message in ((dict(interactions=-1), "interactions"), (dict(layers=0), "positive integer")):
    with pytest.raises(ValueError, match=message):
      run_demo(tmp_path / "out", train_steps=8, log=lambda _: None, **bad)
    assert not (tmp_path / "out").exists()  # was: the folder was made first
