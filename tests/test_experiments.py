"""Every experiment in its tiny configuration, end to end, from the CLI."""

import json

import pytest

from scribblejax.cli import main
from scribblejax.experiments import EXPERIMENTS

@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_model):
  _, folder = tiny_model
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
