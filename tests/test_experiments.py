"""Every experiment in its tiny configuration, end to end, from the CLI."""

import json

import pytest
from flax import nnx

from scribblejax import data
from scribblejax.cli import main
from scribblejax.experiments import EXPERIMENTS
from scribblejax.models.store import save_model
from scribblejax.models.unet import UNet
from scribblejax.normalize import normalize
from scribblejax.train import TrainConfig, train_segmenter

NORM = {"kind": "percentile", "lower": 1.0, "upper": 99.8}
KW = dict(spatial_dims=2, in_channels=1, num_classes=2, channels=[4, 8])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  ds = data.nuclei2d("binary")
  model = UNet(**KW, rngs=nnx.Rngs(0))
  train_segmenter(model, normalize(ds.image, NORM)[ds.train], ds.labels[ds.train],
                  TrainConfig(steps=30, crop=48, batch_size=4, learning_rate=1e-2), progress=False)
  folder = tmp_path_factory.mktemp("m") / "tiny"
  save_model(folder, model, family="scribblejax.UNet", kwargs=KW, normalization=NORM,
             class_names=["background", "nucleus"])
  out = tmp_path_factory.mktemp("exp")
  assert main(["evaluate", "--experiment", "all", "--size", "tiny", "--model", str(folder), "--tissue-model", "none",
               "--out", str(out)]) == 0
  return out


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_writes_json_table_plot(results, name):
  payload = json.loads((results / f"{name}.json").read_text())
  assert payload["size"] == "tiny" and payload["device"]
  assert (results / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
  assert "|" in (results / f"{name}.md").read_text()
  for r in payload["results"]:
    d = r["dice_per_interaction"]
    assert len(d) == 2 and all(0 <= x <= 1 for x in d if x is not None)


def test_experiment_outcomes(results):
  load = lambda n: json.loads((results / f"{n}.json").read_text())
  missed = load("missed_class")["results"]
  assert all(r["missed_class_dice"][0] == 0 for r in missed)                 # the class really is missed
  assert max(r["missed_class_dice"][1] for r in missed if r["method"] != "random_walker") > 0  # and inserted
  new = {r["method"]: r for r in load("new_class")["results"]}
  assert new["initial"]["new_class_dice"] == [0.0, 0.0]
  kinds = {r["mark_kind"] for r in load("mark_types")["results"]}
  assert kinds == {"scribble", "point", "box"}
  sweep = load("optimizer_sweep")
  assert sweep["best"] is not None and len(sweep["ranking"]) == 2
  assert {r["region_growing"] for r in load("region_growing")["results"]} == {0.0, 0.05}
