"""The evaluation harness, baselines, model surgery and ``scribblejax evaluate`` on a tiny trained model."""

import json

import numpy as np
import pytest

from scribblejax.cli import main
from scribblejax.config import RefineConfig
from scribblejax.models import surgery
from scribblejax.params import head, split_params
from scribblejax.refinement import predict
from scribblejax.research import baselines as bl
from scribblejax.research import data, metrics
from scribblejax.research import evaluate as ev
from scribblejax.research.simulate import simulate_marks


@pytest.fixture(scope="module")
def case(tiny_model):
  return ev.task_case("nuclei2d", ev.load_backbone(tiny_model[1]), crop=40)


@pytest.mark.slow
def test_harness_refine_records_what_the_method_does_and_honours_marks(tiny_model, case):
  model, _ = tiny_model
  cfg = ev.EvalConfig(interactions=2)
  r = ev.run_case(case, bl.refine_method(model, 3, RefineConfig.paper(max_steps=30, learning_rate=0.05)), cfg)
  assert len(r["dice_per_interaction"]) == 3 and len(r["seconds_per_interaction"]) <= 2
  assert r["compile_seconds"] > 0 and set(r["noc"]) == {"0.85", "0.9"}
  assert all(set(i) == {"steps", "satisfied"} for i in r["method_info"])
  assert all(0.0 <= d <= 1.0 for d in r["dice_per_interaction"])
  # what the harness records is what the method does: replay interaction 1 by hand
  method = bl.refine_method(model, 3, RefineConfig.paper(max_steps=30, learning_rate=0.05))
  state = method.init(case.image)
  initial = np.asarray(method.labels(state))
  assert r["dice_per_interaction"][0] == pytest.approx(metrics.mean_foreground_dice(initial, case.truth, 2))
  marks = simulate_marks(
    initial,
    case.truth,
    2,
    kind=cfg.mark_kind,
    radius=cfg.radius,
    max_length=cfg.max_length,
    per_class=cfg.per_class,
    ignore_border=cfg.ignore_border,
  )
  assert r["marked_pixels"][0] == int((marks >= 0).sum()) > 0
  labels = np.asarray(method.labels(method.update(state, marks)))
  assert r["dice_per_interaction"][1] == pytest.approx(metrics.mean_foreground_dice(labels, case.truth, 2))
  # and the refinement honoured those marks (whether Dice rises on this 4/8-channel toy model depends
  # on its seed: test_refinement_improves_the_shipped_tissue_model asserts a gain on a real model)
  assert r["method_info"][0]["satisfied"] and np.all(labels[marks >= 0] == marks[marks >= 0])
  # the marks of interaction 1 only lie where the initial prediction is wrong
  assert all(c in (0, 1) for c in r["classes_marked"][0])
  # the initial method never changes, and the same user is deterministic
  init = ev.run_case(case, bl.initial_method(model), cfg)
  assert init["dice_per_interaction"] == [r["dice_per_interaction"][0]] * 3
  assert ev.run_case(case, bl.initial_method(model), cfg)["classes_marked"] == init["classes_marked"]


# RefineConfig's defaults at the time of writing, spelled out: the gain asserted below must not move when
# the defaults are retuned
EXPLICIT = RefineConfig.paper(max_steps=100)


@pytest.mark.slow
def test_refinement_improves_the_shipped_tissue_model():
  backbone = ev.resolve_backbone("tissue2d", "tissue2d")
  case = ev.task_case("tissue2d", backbone, crop=48)
  r = ev.run_case(case, bl.refine_method(backbone.model, 5, EXPLICIT), ev.EvalConfig(interactions=1))
  before, after = r["dice_per_interaction"]
  # measured on CPU: 0.503 -> 0.818; the margin leaves room for another machine's rounding, not for no gain
  assert after >= before + 0.2, r["dice_per_interaction"]
  assert r["method_info"] == [{"steps": r["method_info"][0]["steps"], "satisfied": True}]
  assert 0 < r["method_info"][0]["steps"] <= EXPLICIT.max_steps


def test_random_walker_baseline_2d_and_3d():
  image = np.zeros((20, 20, 1), np.float32)
  image[5:15, 5:15] = 1.0
  marks = np.full((20, 20), -1)
  marks[10, 10] = 1
  marks[1, 1] = 0
  labels = bl.random_walker_labels(image, marks)
  assert labels[8, 8] == 1 and labels[18, 18] == 0
  vol = np.zeros((6, 12, 12), np.float32)
  vol[:, 3:9, 3:9] = 1
  m3 = np.full(vol.shape, -1)
  m3[3, 6, 6], m3[0, 0, 0] = 1, 0
  assert bl.random_walker_labels(vol, m3)[2, 5, 5] == 1
  assert bl.random_walker_labels(image, np.where(marks == 1, 1, -1)) is None  # one class: no walk


@pytest.mark.slow
def test_add_classes_keeps_prediction_and_learns_new_class(tiny_model, case):
  model, _ = tiny_model
  bigger = surgery.add_classes(model, 2)
  assert bigger.num_classes == 4 and model.num_classes == 2  # the input model is untouched
  before = np.asarray(predict(split_params(model, head()), case.image))
  after = np.asarray(predict(split_params(bigger, head()), case.image))
  assert after.shape[-1] == 4
  np.testing.assert_array_equal(after.argmax(-1), before.argmax(-1))
  np.testing.assert_allclose(after[..., 2], after[..., 0] - 4.0, atol=1e-4)
  truth = case.truth.copy()
  truth[:10, :10] = 2  # a new structure
  new_case = ev.make_case("new", case.image, truth, 3)
  r = ev.run_case(
    new_case,
    bl.refine_method(surgery.add_classes(model, 1), 3, RefineConfig.paper(max_steps=40, learning_rate=0.05)),
    ev.EvalConfig(interactions=1),
  )
  assert r["dice_per_class"][0][2] == 0 and r["dice_per_class"][1][2] > 0.1
  with pytest.raises(ValueError, match="positive"):
    surgery.add_classes(model, 0)
  with pytest.raises(ValueError, match="positive integer, got True"):  # was: one class
    surgery.add_classes(model, True)


def test_suppress_class_removes_class(tiny_model, case):
  model, _ = tiny_model
  amount = ev.suppression_amount(model, case.image, 1)
  missing = surgery.suppress_class(model, 1, amount=amount)
  assert not (np.asarray(predict(split_params(missing, head()), case.image)).argmax(-1) == 1).any()
  with pytest.raises(ValueError, match="amount must be a finite number"):
    surgery.suppress_class(model, 1, amount=float("nan"))  # was: a model predicting NaN
  with pytest.raises(ValueError, match="margin must be a finite number"):
    surgery.add_classes(model, 1, margin=float("inf"))


def test_make_case_and_metrics_errors():
  with pytest.raises(ValueError, match="differ"):
    ev.make_case("x", np.zeros((4, 4)), np.zeros((4, 5), int), 2)
  with pytest.raises(ValueError, match="outside"):
    ev.make_case("x", np.zeros((4, 4)), np.full((4, 4), 3), 2)
  with pytest.raises(ValueError, match="mark kind"):
    ev.EvalConfig(mark_kind="lasso")


@pytest.mark.slow
def test_cli_single_case_task_and_files(tiny_model, tmp_path, capsys, monkeypatch):
  _, folder = tiny_model
  out = tmp_path / "run"
  assert (
    main(
      [
        "evaluate",
        "--task",
        "nuclei2d",
        "--model",
        str(folder),
        "--crop",
        "32",
        "--interactions",
        "1",
        "--steps",
        "5",
        "--layers",
        "2",
        "--marks",
        "point",
        "--out",
        str(out),
      ]
    )
    == 0
  )
  res = json.loads((out / "results.json").read_text())
  for key in ("dice_per_interaction", "noc", "seconds_per_interaction", "method", "model", "device"):
    assert key in res
  assert len(res["dice_per_interaction"]) == 2 and (out / "results.png").stat().st_size > 0
  summary = capsys.readouterr().out
  for tau, n in res["noc"].items():  # '+': not reached in the interactions run
    assert f"NoC@{tau} {n}{'' if res['noc_reached'][tau] else '+'}" in summary
  assert main(["evaluate", "--experiment", "dice", "--size", "tiny", "--steps", "1", "--out", str(tmp_path / "e")]) == 1
  assert "--steps set(s) one case and does not apply to --experiment" in capsys.readouterr().err  # was: ignored
  assert not (tmp_path / "e").exists()
  assert main(["evaluate", "--task", "nuclei2d", "--crop", "0", "--out", str(tmp_path / "c")]) == 1
  assert "--crop must be >= 1" in capsys.readouterr().err  # was: IndexError
  # a user case by paths, with a label value the model lacks
  from scribblejax.io.images import Geometry, write_label_map

  ds = data.nuclei2d("binary")
  img = ds.image[:32, 384:416, 0].astype(np.uint16)
  lab = ds.labels[:32, 384:416].copy()
  lab[:4, :4] = 2
  import tifffile

  tifffile.imwrite(tmp_path / "img.tif", img)
  tifffile.imwrite(tmp_path / "lab.tif", lab.astype(np.uint8))
  args = [
    "evaluate",
    "--image",
    str(tmp_path / "img.tif"),
    "--label",
    str(tmp_path / "lab.tif"),
    "--model",
    str(folder),
    "--interactions",
    "1",
    "--steps",
    "3",
    "--layers",
    "1",
    "--out",
    str(tmp_path / "u"),
  ]
  assert main(args) == 1
  assert "--add-classes" in capsys.readouterr().err
  import scribblejax.research.evaluate_image as evaluate_image

  merged_with = []  # the classes the round's merge lets past the protection: the appended one
  round_labels = evaluate_image.round_labels
  monkeypatch.setattr(evaluate_image, "round_labels", lambda *a: merged_with.append(a[8]) or round_labels(*a))
  assert main(args + ["--add-classes", "1"]) == 0
  assert json.loads((tmp_path / "u" / "results.json").read_text())["num_classes"] == 3
  assert merged_with == [(2,)]
  import scribblejax.research.baselines as bl

  merge = bl.merge_round
  monkeypatch.setattr(bl, "merge_round", lambda *a, **k: merged_with.append(a[7]) or merge(*a, **k))
  task = ["evaluate", "--task", "nuclei2d", "--model", str(folder), "--crop", "32", "--interactions", "1"]
  assert main([*task, "--steps", "3", "--layers", "2", "--add-classes", "1", "--out", str(tmp_path / "t")]) == 0
  assert merged_with == [(2,), (2,)]  # the built-in task's harness too
  assert main(args[:6] + ["tissue3d"] + args[7:]) == 1  # a 2-D image for a 3-D model
  assert "the model takes 3-D images, but" in capsys.readouterr().err  # was: about marks
  tifffile.imwrite(tmp_path / "small.tif", lab[:16].astype(np.uint8))
  assert main(args[:4] + [str(tmp_path / "small.tif")] + args[5:]) == 1
  assert "shape" in capsys.readouterr().err
  assert (
    main(
      [
        "evaluate",
        "--image",
        str(tmp_path / "nope.tif"),
        "--label",
        str(tmp_path / "lab.tif"),
        "--model",
        str(folder),
        "--out",
        str(tmp_path / "v"),
      ]
    )
    == 1
  )
  err = capsys.readouterr().err.strip()
  assert "does not exist" in err and len(err.splitlines()) == 1
  # the results never overwrite an input (was: the label file replaced by the plot)
  (tmp_path / "r").mkdir()
  tifffile.imwrite(tmp_path / "r" / "results.png", np.asarray(tifffile.imread(tmp_path / "lab.tif")))
  kept = (tmp_path / "r" / "results.png").read_bytes()
  assert (
    main(
      [
        "evaluate",
        "--image",
        str(tmp_path / "img.tif"),
        "--label",
        str(tmp_path / "r" / "results.png"),
        "--model",
        str(folder),
        "--out",
        str(tmp_path / "r"),
      ]
    )
    == 1
  )
  assert "is the input" in capsys.readouterr().err and (tmp_path / "r" / "results.png").read_bytes() == kept
  del Geometry, write_label_map


def _nuclei_files(tmp_path, size=96):
  """A DSB crop and its labels as TIFF files: (image path, label path, labels)."""
  import tifffile

  ds = data.nuclei2d("binary")
  img = ds.image[:size, 384 : 384 + size, 0].astype(np.uint16)
  lab = ds.labels[:size, 384 : 384 + size].astype(np.uint8)
  tifffile.imwrite(tmp_path / "img.tif", img)
  tifffile.imwrite(tmp_path / "lab.tif", lab)
  return tmp_path / "img.tif", tmp_path / "lab.tif", lab


@pytest.mark.slow
def test_a_case_given_by_files_runs_through_the_models_pipeline(tiny_model, tmp_path, capsys, monkeypatch):
  # A model stating a voxel spacing twice the image's and a patch: the simulated user sees what
  # predict writes, marks the image's grid, and the loop refines the marked patches on the model's grid.
  import shutil

  import tifffile

  _, folder = tiny_model
  piped = tmp_path / "piped"
  shutil.copytree(folder, piped)
  doc = json.loads((piped / "model.json").read_text())
  doc["metadata"] = {**(doc.get("metadata") or {}), "spacing": [2.0, 2.0], "patch_size": [32, 32]}
  (piped / "model.json").write_text(json.dumps(doc))
  img, lab, truth = _nuclei_files(tmp_path)
  assert (
    main(["predict", "--model", str(piped), "--image", str(img), "--out", str(tmp_path / "seg.tif"), "--quiet"]) == 0
  ), capsys.readouterr().err
  seg = tifffile.imread(tmp_path / "seg.tif")
  base = [
    "evaluate",
    "--image",
    str(img),
    "--label",
    str(lab),
    "--model",
    str(piped),
    "--steps",
    "60",
    "--lr",
    "0.05",
    "--layers",
    "3",
  ]
  assert main([*base, "--interactions", "2", "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
  res = json.loads((tmp_path / "run" / "results.json").read_text())
  assert res["dice_per_interaction"][0] == pytest.approx(metrics.mean_foreground_dice(seg, truth, 2))
  assert res["pipeline"]["model_grid"] == [48, 48] and res["pipeline"]["patch"] == [32, 32]
  assert res["pipeline"]["resampled"] and any("patch by patch" in n for n in res["pipeline"]["notes"])
  infos = res["method_info"]
  assert len(infos) == 2 and all(1 <= i["refined_patches"] <= 4 for i in infos)
  assert infos[0]["satisfied"] and infos[0]["marks_honoured"] > 0.9, infos
  # Interaction 1 is what `refine` does with the simulated user's marks drawn on the image.
  from PIL import Image as PILImage

  new = simulate_marks(seg, truth, 2)
  drawn = np.where(new == 0, 255, np.where(new < 0, 0, new)).astype(np.uint8)  # 0 unmarked, 255 background
  PILImage.fromarray(drawn).save(tmp_path / "marks.png")
  assert (
    main(
      [
        "refine",
        "--model",
        str(piped),
        "--image",
        str(img),
        "--marks",
        str(tmp_path / "marks.png"),
        "--out",
        str(tmp_path / "refined.tif"),
        "--steps",
        "60",
        "--lr",
        "0.05",
        "--layers",
        "3",
        "--quiet",
      ]
    )
    == 0
  ), capsys.readouterr().err
  report = json.loads((tmp_path / "refined.report.json").read_text())
  assert report["steps"] == infos[0]["steps"] and report["marks_honoured"] == infos[0]["marks_honoured"]
  refined = tifffile.imread(tmp_path / "refined.tif")
  assert res["dice_per_interaction"][1] == pytest.approx(metrics.mean_foreground_dice(refined, truth, 2))
  assert (refined != seg).sum() > 20  # the refinement changed something
  # the network's own segmentation, computed beside the refined one in one pass over the patches
  assert report["changed_pixels"] == int((refined != seg).sum())
  assert any("same pass over the patches" in n for n in report["notes"])
  from scribblejax.app import refine_round

  monkeypatch.setattr(refine_round, "JOINT_LOGITS_BYTES", 0)  # too big for one pass: one after the other
  assert (
    main(
      [
        "refine",
        "--model",
        str(piped),
        "--image",
        str(img),
        "--marks",
        str(tmp_path / "marks.png"),
        "--out",
        str(tmp_path / "apart.tif"),
        "--steps",
        "60",
        "--lr",
        "0.05",
        "--layers",
        "3",
        "--quiet",
      ]
    )
    == 0
  ), capsys.readouterr().err
  apart = json.loads((tmp_path / "apart.report.json").read_text())
  assert apart["changed_pixels"] == report["changed_pixels"] and not any("same pass" in n for n in apart["notes"])
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "apart.tif"), refined)
  # The whole image at the image's own spacing is another segmentation: the pipeline matters here.
  assert (
    main([*base, "--interactions", "0", "--no-resample", "--patch-size", "whole", "--out", str(tmp_path / "plain")])
    == 0
  )
  plain = json.loads((tmp_path / "plain" / "results.json").read_text())
  assert plain["pipeline"]["model_grid"] == [96, 96] and plain["pipeline"]["patch"] is None
  assert abs(plain["dice_per_interaction"][0] - res["dice_per_interaction"][0]) > 0.01
  # the pipeline's flags belong to cases given by files
  assert main(["evaluate", "--task", "nuclei2d", "--model", str(piped), "--mirror", "--out", str(tmp_path / "t")]) == 1
  assert "--mirror set(s) how the network sees a case given by --image/--label" in capsys.readouterr().err
  assert main(["evaluate", "--experiment", "dice", "--patch-size", "whole", "--out", str(tmp_path / "e")]) == 1
  assert "--patch-size set(s) one case" in capsys.readouterr().err


@pytest.mark.slow
def test_without_a_pipeline_the_pipeline_method_is_the_plain_one(tiny_model, tmp_path):
  # A model that states no spacing or patch sees the image as read: the pipeline's refinement, walker
  # and initial methods give what the plain methods give on the same case.
  from scribblejax.io.images import read_image
  from scribblejax.models.store import read_info
  from scribblejax.research.evaluate_image import image_case, pipeline_method, prepare_pipeline

  model, folder = tiny_model
  img, _, truth = _nuclei_files(tmp_path, 48)
  pipe = prepare_pipeline(model, read_info(folder), read_image(img), layers=3)
  assert pipe.fitted.patch is None and pipe.fitted.resampling is None and pipe.fitted.pad is None
  case = image_case("crop", read_image(img), truth, pipe, 2)
  np.testing.assert_array_equal(case.image, pipe.fitted.image)
  cfg = RefineConfig.paper(max_steps=20, learning_rate=0.05)
  config = ev.EvalConfig(interactions=2)
  for kind in ("refine", "initial", "random_walker"):
    got = ev.run_case(case, pipeline_method(kind, pipe, cfg), config)
    want = ev.run_case(case, bl.make_method(kind, model, layers=3, config=cfg), config)
    assert got["dice_per_interaction"] == want["dice_per_interaction"], kind
    if kind == "refine":
      assert [i["steps"] for i in got["method_info"]] == [i["steps"] for i in want["method_info"]]
      assert all(i["refined_patches"] == 0 for i in got["method_info"])


@pytest.mark.slow
def test_marks_outside_the_crop_to_the_non_zero_region_change_nothing(tiny_model, tmp_path):
  # nnU-Net's crop: outside the image's non-zero region the segmentation is background whatever the
  # network learns, so marks there alone leave the segmentation as it is (and are counted unhonoured).
  import shutil

  import tifffile

  from scribblejax.io.images import read_image
  from scribblejax.models.store import load_model
  from scribblejax.research.evaluate_image import pipeline_method, prepare_pipeline

  _, folder = tiny_model
  cropping = tmp_path / "cropping"
  shutil.copytree(folder, cropping)
  doc = json.loads((cropping / "model.json").read_text())
  doc["metadata"] = {**(doc.get("metadata") or {}), "crop_to_nonzero": True}
  (cropping / "model.json").write_text(json.dumps(doc))
  ds = data.nuclei2d("binary")
  img = np.zeros((48, 48), np.uint16)
  img[8:40, 8:40] = ds.image[:32, 384:416, 0].astype(np.uint16) + 1
  tifffile.imwrite(tmp_path / "img.tif", img)
  model, info = load_model(cropping)
  pipe = prepare_pipeline(model, info, read_image(tmp_path / "img.tif"), layers=2)
  assert pipe.fitted.crop is not None and pipe.fitted.image.shape[:-1] == (32, 32)
  method = pipeline_method("refine", pipe, RefineConfig.paper(max_steps=100, learning_rate=0.05))
  state = method.init(None)
  assert state.labels.shape == (48, 48) and not state.labels[:8].any()
  marks = np.full((48, 48), -1, np.int32)
  marks[2, 2:6] = 1
  after = method.update(state, marks)
  np.testing.assert_array_equal(after.labels, state.labels)
  assert method.info(after) == {
    "steps": 0,
    "satisfied": False,
    "marks_honoured": 0.0,
    "refined_patches": 0,
    "compile_seconds": 0.0,
  }
  marks[20, 20:24] = 1  # one inside: the loop runs
  inside = method.update(state, marks)
  assert inside.satisfied and (inside.labels[20, 20:24] == 1).all() and not inside.labels[:8].any()
  assert inside.honoured == 0.5  # the marks outside stay unhonoured


def _with_metadata(folder, tmp_path, name, **metadata):
  import shutil

  copy = tmp_path / name
  shutil.copytree(folder, copy)
  doc = json.loads((copy / "model.json").read_text())
  doc["metadata"] = {**(doc.get("metadata") or {}), **metadata}
  (copy / "model.json").write_text(json.dumps(doc))
  return copy


@pytest.mark.slow
def test_evaluate_takes_the_models_stored_refine_defaults_as_refine_does(tiny_model, tmp_path):
  _, folder = tiny_model
  stored = _with_metadata(folder, tmp_path, "stored", refine={"max_steps": 7, "learning_rate": 0.3, "layers": 2})
  img, lab, _ = _nuclei_files(tmp_path, 32)
  assert (
    main(
      [
        "evaluate",
        "--image",
        str(img),
        "--label",
        str(lab),
        "--model",
        str(stored),
        "--interactions",
        "1",
        "--out",
        str(tmp_path / "run"),
      ]
    )
    == 0
  )
  res = json.loads((tmp_path / "run" / "results.json").read_text())
  assert (res["layers"], res["max_steps"], res["learning_rate"]) == (2, 7, 0.3)  # was: 5, 100, 0.01
  assert res["method"] == "refine_l2" and res["method_info"][0]["steps"] <= 7
  assert (
    main(
      [
        "evaluate",
        "--image",
        str(img),
        "--label",
        str(lab),
        "--model",
        str(stored),
        "--interactions",
        "0",
        "--layers",
        "3",
        "--steps",
        "9",
        "--out",
        str(tmp_path / "flags"),
      ]
    )
    == 0
  )
  flags = json.loads((tmp_path / "flags" / "results.json").read_text())
  assert (flags["layers"], flags["max_steps"]) == (3, 9)
  assert (
    main(
      [
        "evaluate",
        "--image",
        str(img),
        "--label",
        str(lab),
        "--model",
        str(stored),
        "--crop",
        "16",
        "--out",
        str(tmp_path / "c"),
      ]
    )
    == 1
  )  # was: --crop silently ignored


def _pipeline_on_a_crop(tiny_model, tmp_path, **metadata):
  """The tiny model with ``metadata`` added, prepared for a 32 x 32 DSB crop (last 2 layers tunable)."""
  from scribblejax.io.images import read_image
  from scribblejax.models.store import load_model
  from scribblejax.research.evaluate_image import prepare_pipeline

  model, info = load_model(_with_metadata(tiny_model[1], tmp_path, "with_metadata", **metadata))
  img, _, _ = _nuclei_files(tmp_path, 32)
  return prepare_pipeline(model, info, read_image(img), layers=2)


def test_marks_of_two_interactions_in_one_coarse_voxel_keep_the_newer_as_a_session_does(tiny_model, tmp_path):
  from scribblejax.research.evaluate_image import pipeline_method

  pipe = _pipeline_on_a_crop(tiny_model, tmp_path, spacing=[2.0, 2.0])
  method = pipeline_method("refine", pipe, RefineConfig.paper(max_steps=3))
  state = method.init(None)
  marks = np.full((32, 32), -1, np.int32)
  marks[11, 10] = 1
  state = method.update(state, marks)
  assert state.model_marks[5, 5] == 1
  marks[10, 10] = 0  # the same voxel of the model's grid, a later interaction
  state = method.update(state, marks)
  assert state.model_marks[5, 5] == 0  # was: 1 (all marks resampled at once, the older held)


def test_with_patches_the_keep_term_is_off_as_refine_has_it(tiny_model, tmp_path):
  from scribblejax.pipeline.round import round_config
  from scribblejax.research.evaluate_image import pipeline_method

  pipe = _pipeline_on_a_crop(tiny_model, tmp_path, patch_size=[16, 16])
  # the keep term reads the network's logits at every voxel; with patches the loop has them at the marks only
  # (it was once silently a constant term, then refused; now off, as `scribblejax refine` turns it off)
  assert round_config(RefineConfig(keep_weight=0.5), pipe.fitted).keep_weight == 0.0
  assert round_config(RefineConfig(keep_weight=0.5), pipe.fitted).optimizer == "adam"
  (tmp_path / "whole").mkdir()
  whole = _pipeline_on_a_crop(tiny_model, tmp_path / "whole")
  assert round_config(RefineConfig(keep_weight=0.5), whole.fitted).keep_weight == 0.5
  assert pipeline_method("refine", pipe, RefineConfig.paper()).name == "refine_l2"
  with pytest.raises(ValueError, match="fbrs runs on built-in tasks"):
    pipeline_method("fbrs", pipe)


@pytest.mark.slow
def test_baselines_take_a_model_that_states_no_layer_order_given_an_example():
  import jax
  import jax.numpy as jnp
  from flax import nnx

  class Plain(nnx.Module):  # no layer_order(): traced from the example
    def __init__(self, rngs):
      self.first = nnx.Conv(1, 4, (3, 3), rngs=rngs)
      self.last = nnx.Conv(4, 2, (1, 1), rngs=rngs)

    def __call__(self, x):
      return self.last(jax.nn.relu(self.first(x)))

  model, image = Plain(nnx.Rngs(0)), np.random.default_rng(0).normal(size=(12, 12, 1)).astype(np.float32)
  example = jnp.zeros((1, 12, 12, 1))
  with pytest.raises(ValueError, match="pass an example input"):
    bl.refine_method(model, 1)
  initial = bl.make_method("initial", model, example=example)
  labels = initial.init(image)
  np.testing.assert_array_equal(labels, np.argmax(model(image[None])[0], -1))
  marks = np.full((12, 12), -1, np.int32)
  marks[3, 3] = 1 - labels[3, 3]
  method = bl.make_method(
    "refine",
    model,
    layers=1,
    config=RefineConfig.paper(max_steps=200, learning_rate=0.5, prox_weight=0.0),
    example=example,
  )
  state = method.update(method.init(image), marks)
  assert method.info(state)["satisfied"] and method.labels(state)[3, 3] == marks[3, 3]
  assert ev.suppression_amount(model, image, 1) >= 1.0


def test_growth_keeps_what_the_user_drew_and_relabels_what_growth_inferred():
  image = np.zeros((6, 8, 1), np.float32)  # flat: growth reaches every free pixel
  none = np.full((6, 8), -1, np.int32)
  first = none.copy()
  first[:, 4] = 0  # round 1: a drawn background line
  marks, drawn, grown = ev.next_marks(none, none, first, image, 1.0)
  assert (marks >= 0).all() and (marks == 0).all()  # it grew over everything
  second = none.copy()
  second[2, 1] = 1  # round 2: nucleus, left of the line
  marks, drawn, grown = ev.next_marks(marks, drawn, second, image, 1.0)
  assert (marks[:, :4] == 1).all()  # round 1's inferred background relabelled
  assert (marks[:, 4:] == 0).all()  # the drawn line stands and walls the right side
  np.testing.assert_array_equal(drawn, ev.accumulate(first, second))
  assert (grown[:, 4:] == -1).all()
  same, _, _ = ev.next_marks(none, none, second, image, 0.0)  # no growth: the marks as drawn
  np.testing.assert_array_equal(same, second)


def test_a_round_with_nothing_new_to_mark_stops_and_says_so():
  from scribblejax.research.baselines import Method

  truth = np.zeros((24, 24), np.int32)
  truth[4:12, 4:12] = 1
  case = ev.make_case("stuck", np.random.default_rng(0).random((24, 24)), truth, 2)
  never = Method(
    "never",
    lambda image: np.zeros((24, 24), np.int32),
    lambda s: s,
    lambda s, marks: s,
    lambda image: None,
    lambda s: {},
  )
  said = []
  result = ev.run_case(case, never, ev.EvalConfig(interactions=4, mark_kind="scribble"), log=said.append)
  # the method honours nothing: the user marks the error once, then finds nothing new (its marks cover
  # the whole eroded error) and stops, instead of drawing the same pixels again as if it were progress
  assert result["stop_reason"] == "no new error to mark"
  assert result["stopped_early"] is not None and result["stopped_early"] < 4
  assert result["satisfied"] == [False] * result["stopped_early"]
  assert result["rounds_unsatisfied"] == result["stopped_early"]
  assert result["marks_honoured"][0] == 0.0
  assert said and "finds no new error" in said[0]
  assert result["dice_auc"] == 0.0


def test_dice_auc_and_marks_honoured():
  assert ev.dice_auc([0.5, 1.0]) == 0.75
  assert ev.dice_auc([0.2, 0.4, 0.6]) == pytest.approx(0.4)
  assert ev.marks_honoured(np.array([1, 0, 1]), np.array([1, 1, -1])) == 0.5
  assert ev.marks_honoured(np.array([1]), np.array([-1])) is None


def test_cpu_of_reads_the_first_processors_model_and_the_features_that_choose_kernels():
  from scribblejax.research.evaluate import CPU_FEATURES, cpu_of

  text = (
    "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx fma avx2 avx512f avx512_bf16\n\n"
    "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu amx_tile\n"
  )
  assert cpu_of(text) == {"cpu_model": "AMD EPYC", "cpu_features": ["avx", "avx2", "fma", "avx512f", "avx512_bf16"]}
  assert cpu_of("") == {"cpu_model": None, "cpu_features": []}
  assert set(cpu_of(text)["cpu_features"]) <= set(CPU_FEATURES)
