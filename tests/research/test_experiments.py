"""Every experiment in its tiny configuration, end to end, from the CLI: the Dice it reports is the Dice of
its network and of the refinement its simulated user asks for, recomputed here."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import foreground_dice

from scribblejax.cli import main
from scribblejax.config import RefineConfig
from scribblejax.params import last_layers, split_params
from scribblejax.refinement import compute_trunk, refine
from scribblejax.research import evaluate as ev
from scribblejax.research.experiments import EXPERIMENTS, SIZES
from scribblejax.research.simulate import simulate_marks

TINY = SIZES["tiny"]
# experiments whose runs all start from the unmodified backbone (missed_class lowers a head bias, new_class
# adds a class; bf16 runs predict in bfloat16)
PLAIN = ("dice", "multiclass", "shift", "mark_types", "region_growing", "steps_layers", "optimizer_sweep", "precision")


def network_labels(backbone: ev.Backbone, case: ev.Case) -> np.ndarray:
  """The backbone's own prediction on the case: its forward pass, argmax over classes."""
  return np.asarray(backbone.model(jnp.asarray(case.image)[None])[0]).argmax(-1)


def run(out, folder, names, tissue):
  assert (
    main(
      [
        "evaluate",
        "--experiment",
        names,
        "--size",
        "tiny",
        "--model",
        str(folder),
        "--tissue-model",
        tissue,
        "--out",
        str(out),
      ]
    )
    == 0
  )
  return out


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_model):
  """Every experiment on the nuclei backbone (the tiny trained model), tissue parts off."""
  return run(tmp_path_factory.mktemp("exp"), tiny_model[1], "all", "none")


@pytest.fixture(scope="module")
def tissue_results(tmp_path_factory, tiny_model):
  """The multi-class experiment on the shipped 4-class tissue2d backbone (the tissue parts, at tiny size)."""
  return run(tmp_path_factory.mktemp("exp_tissue"), tiny_model[1], "multiclass", "tissue2d")


@pytest.fixture(scope="module")
def backbones(tiny_model):
  return {"nuclei": ev.load_backbone(tiny_model[1]), "tissue": ev.resolve_backbone("tissue2d", "tissue2d")}


def load(folder, name):
  return json.loads((folder / f"{name}.json").read_text())


def case_of(backbones, task):
  backbone = backbones["nuclei" if task.startswith("nuclei") else "tissue"]
  return backbone, ev.task_case(task, backbone, TINY.crop)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_writes_json_table_plot(results, name):
  payload = load(results, name)
  assert payload["size"] == "tiny" and payload["device"]
  assert (results / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
  assert "|" in (results / f"{name}.md").read_text()
  for r in payload["results"]:
    d, per_class = r["dice_per_interaction"], r["dice_per_class"]
    assert len(d) == 2 and len(per_class) == 2 and all(len(p) == r["num_classes"] for p in per_class)
    for mean, classes in zip(d, per_class):  # the mean is the mean of the classes that occur
      present = [x for x in classes[1:] if x is not None]
      assert mean == pytest.approx(np.mean(present) if present else None)


@pytest.mark.parametrize("name", PLAIN)
def test_dice_before_any_mark_is_the_networks_own(results, backbones, name):
  cases = {}
  for r in load(results, name)["results"]:
    if r["method"].endswith("bfloat16"):
      continue
    if r["case"] not in cases:
      backbone, case = case_of(backbones, r["case"])
      cases[r["case"]] = foreground_dice(network_labels(backbone, case), case.truth, case.num_classes)
    assert r["dice_per_interaction"][0] == pytest.approx(cases[r["case"]], abs=1e-6), (r["case"], r["method"])
  assert cases  # some run was checked


def replay(backbone, case, layers, max_steps):
  """Interaction 1 of the harness's simulated user, refined here by refine(): (marks, result, labels)."""
  user = ev.EvalConfig(interactions=1)
  marks = simulate_marks(
    network_labels(backbone, case),
    case.truth,
    case.num_classes,
    kind=user.mark_kind,
    radius=user.radius,
    max_length=user.max_length,
    per_class=user.per_class,
    ignore_border=user.ignore_border,
  )
  config = RefineConfig.paper(max_steps=max_steps)  # the experiments' own config at this size
  split = split_params(backbone.model, last_layers(layers))
  trunk = compute_trunk(split, case.image, config) if config.cache_trunk else None  # as a session does
  result = refine(split, case.image, marks, config, trunk=trunk)
  return marks, result, np.asarray(result.logits).argmax(-1)


def check_replay(r, backbones):
  """The run ``r`` (last-l refinement, 1 interaction) reports what a replay by hand computes."""
  backbone, case = case_of(backbones, r["case"])
  marks, result, labels = replay(backbone, case, TINY.layers, TINY.max_steps)
  assert r["marked_pixels"] == [int((marks >= 0).sum())]
  assert r["dice_per_interaction"][1] == pytest.approx(foreground_dice(labels, case.truth, case.num_classes), abs=1e-6)
  assert r["method_info"] == [{"steps": int(result.num_steps), "satisfied": bool(result.satisfied)}]
  if result.satisfied:  # satisfied means every mark is honoured
    assert np.array_equal(labels[marks >= 0], marks[marks >= 0])


def test_refinement_reports_what_a_replay_computes(results, backbones):
  (r,) = [r for r in load(results, "dice")["results"] if r["method"] == f"refine_l{TINY.layers}"]
  check_replay(r, backbones)


@pytest.mark.slow
def test_tissue_multiclass_on_the_shipped_tissue_model(tissue_results, backbones):
  payload = load(tissue_results, "multiclass")
  assert payload["tissue_model"] == "tissue2d" and payload["skipped"] is None and payload["task"] == "tissue2d"
  (r,) = payload["results"]
  assert r["case"] == "tissue2d" and r["num_classes"] == 4
  backbone, case = case_of(backbones, "tissue2d")
  assert r["dice_per_interaction"][0] == pytest.approx(
    foreground_dice(network_labels(backbone, case), case.truth, 4), abs=1e-6
  )
  assert len(r["classes_marked"][0]) > 1  # several classes marked in one interaction
  check_replay(r, backbones)


def test_experiment_outcomes(results):
  missed = load(results, "missed_class")["results"]
  assert all(r["missed_class_dice"][0] == 0 for r in missed)  # the class really is missed
  assert max(r["missed_class_dice"][1] for r in missed if r["method"] != "random_walker") > 0  # and inserted
  new = {r["method"]: r for r in load(results, "new_class")["results"]}
  assert new["initial"]["new_class_dice"] == [0.0, 0.0]
  kinds = {r["mark_kind"] for r in load(results, "mark_types")["results"]}
  assert kinds == {"scribble", "point", "box"}
  sweep = load(results, "optimizer_sweep")
  assert sweep["best"] is not None and len(sweep["ranking"]) == 2
  assert {r["region_growing"] for r in load(results, "region_growing")["results"]} == {0.0, 0.05}
