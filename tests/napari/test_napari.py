"""The napari plugin as a user drives it, headless (napari's ``make_napari_viewer`` under Xvfb): open an
image with a shipped model, paint a stroke, press Refine, check the segmentation honours it, undo; in
2-D and 3-D; a session saved from the widget continued by ``scribblejax refine --session``; bad input
named in the widget with nothing drawn lost.

On CI (``CI`` set) napari must import and a display must exist (``.ci/run`` runs the tests under
``xvfb-run``): a missing one fails instead of skipping. Elsewhere the tests skip without them.

``SCRIBBLEJAX_NAPARI_SCREENSHOT=docs/napari_widget.png`` also saves the 2-D test's screenshot there.
"""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image as PILImage
from scipy import ndimage

try:
  import napari  # noqa: F401
except ImportError:
  if os.environ.get("CI"):
    raise  # on CI the plugin's tests never skip silently
  pytest.skip('the napari extra is not installed (pip install "scribblejax[napari]")', allow_module_level=True)
if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
  if os.environ.get("CI"):
    raise RuntimeError("no display for napari's tests: run them under xvfb-run (as .ci/run does)")
  pytest.skip("no display: run under xvfb-run -a", allow_module_level=True)

from scribblejax.cli import main
from scribblejax.io import read_image, session_store
from scribblejax.napari import core
from scribblejax.napari.widget import NETWORK, POINTS_TEXT, SCRIBBLES, SEGMENTATION, TAKE_HERE, WHY, ScribbleWidget
from scribblejax.refinement.merge import REASONS
from scribblejax.research import data

# explicit knobs, so that the rounds are short and do not depend on the models' stored defaults
KNOBS = {"max_steps": "100"}  # the library's defaults otherwise
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
  """A 64x64 crop of the DSB nuclei test columns as a 16-bit PNG."""
  image, _ = data.nuclei_instances()
  path = tmp_path_factory.mktemp("images") / "cells.png"
  PILImage.fromarray(image[0:64, 384:448].astype(np.uint16)).save(path)
  return path


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
  """A 24x24x12 crop of the 3 mm MNI volume (tissue3d's test slab) as NIfTI at 3 mm."""
  ds = data.tissue3d()
  z0 = ds.test[2].start
  crop = ds.image[20:44, 28:52, z0 : z0 + 12, 0]
  path = tmp_path_factory.mktemp("images") / "brain.nii.gz"
  nib.save(nib.Nifti1Image(crop.astype(np.float32), ds.affine), path)
  return path


def _widget(make_napari_viewer, qtbot, image, model, session, warm=False, **knobs):
  viewer = make_napari_viewer()
  widget = ScribbleWidget(viewer)
  viewer.window.add_dock_widget(widget, name="scribblejax refine")
  widget.warm_check.setChecked(warm)  # compile on open: on in the 2-D and 3-D tests
  for field, text in {**KNOBS, **knobs}.items():
    widget.setting_edits[field].setText(text)
  widget.open(str(image), model, str(session))
  _wait(qtbot, widget)
  assert widget.interaction is not None, widget.message_label.text()
  return viewer, widget


def _wait(qtbot, widget):
  qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)


def _stroke(widget, index):
  """Paints the class the network does not predict along a short line (values: class + 1)."""
  labels = widget.viewer.layers[SEGMENTATION].data
  scribbles = widget.viewer.layers[SCRIBBLES]
  scribbles.data[index] = np.where(labels[index] == 1, 1, 2)
  scribbles.refresh()
  return scribbles.data.copy()


def _refine(qtbot, widget):
  widget.refine_button.click()
  _wait(qtbot, widget)
  assert widget.report is not None, widget.message_label.text()
  return widget.report


def _assert_honoured(widget, values):
  painted = values > 0
  labels = widget.viewer.layers[SEGMENTATION].data
  if widget.report["satisfied"]:
    np.testing.assert_array_equal(labels[painted], values[painted] - 1)
  assert widget.report["marks_honoured"] == float((labels[painted] == values[painted] - 1).mean())


@pytest.mark.slow
def test_refine_in_2d_honours_the_stroke_and_undo_restores_the_layer(make_napari_viewer, qtbot, cells, tmp_path):
  viewer, widget = _widget(make_napari_viewer, qtbot, cells, "nuclei2d", tmp_path / "session", warm=True)
  assert "compiled in" in widget.message_label.text(), widget.message_label.text()
  segmentation = viewer.layers[SEGMENTATION]
  before = segmentation.data.copy()
  assert before.shape == (64, 64) and "1 = background, 2 = nucleus" in widget.legend_label.text()
  values = _stroke(widget, (30, slice(10, 30)))
  report = _refine(qtbot, widget)
  assert report["satisfied"], report
  assert report["compile_seconds"] < 1.0, report  # compiled on open, by the throwaway round
  assert viewer.layers[SEGMENTATION] is segmentation  # the same layer, updated in place
  _assert_honoured(widget, values)
  assert f"{report['steps']} steps" in widget.report_label.text()
  assert "every mark honoured" in widget.report_label.text()

  viewer.window.resize(1400, 900)
  viewer.screenshot(canvas_only=False, flash=False)  # the first one lays the resized window out
  viewer.reset_view()  # then fit the image: every screenshot below at one zoom
  shots = {}
  for shown in (False, True):  # the window, and the canvas alone, with the why layer hidden and shown
    viewer.layers[WHY].visible = shown
    shots[shown] = viewer.screenshot(canvas_only=False, flash=False), viewer.screenshot(flash=False)
  viewer.layers[WHY].visible = False
  (shot, canvas), (why_shot, why_canvas) = shots[False], shots[True]
  assert shot.ndim == 3 and shot.shape[0] > 200 and shot[..., :3].std() > 0
  # the why layer shown: the pixels the round changed coloured by why (magenta the image's, lime the new mark's)
  for hue, reason in (
    (lambda r, g, b: (r - g > 80) & (b - g > 80), "image"),
    (lambda r, g, b: (g - r > 80) & (g - b > 80), "new_marks"),
  ):
    coloured = [int(hue(*np.moveaxis(shown[..., :3].astype(int), -1, 0)).sum()) for shown in (canvas, why_canvas)]
    assert coloured[0] == 0 and coloured[1] > report["changed_this_round"][reason], (reason, coloured)
  for path in (tmp_path / "widget.png", os.environ.get("SCRIBBLEJAX_NAPARI_SCREENSHOT")):
    if path:
      PILImage.fromarray(np.asarray(shot)).save(path)
      PILImage.fromarray(np.asarray(why_shot)).save(Path(path).with_name(f"{Path(path).stem}_why.png"))

  widget.undo_button.click()
  _wait(qtbot, widget)
  np.testing.assert_array_equal(segmentation.data, before)
  assert not viewer.layers[SCRIBBLES].data.any()
  assert widget.interaction.rounds == 0 and NETWORK not in viewer.layers  # no round, no refined network
  assert not widget.take_button.isEnabled()


@pytest.mark.slow
def test_bad_marks_are_named_and_nothing_drawn_is_lost(make_napari_viewer, qtbot, cells, tmp_path):
  viewer, widget = _widget(make_napari_viewer, qtbot, cells, "nuclei2d", tmp_path / "session")
  before = viewer.layers[SEGMENTATION].data.copy()
  scribbles = viewer.layers[SCRIBBLES]
  scribbles.data[5, 5:9] = 7  # no class: values are 0, 1, 2
  scribbles.refresh()
  drawn = scribbles.data.copy()
  widget.refine_button.click()
  _wait(qtbot, widget)
  assert "value 7" in widget.message_label.text() and "2 = nucleus" in widget.message_label.text()
  np.testing.assert_array_equal(scribbles.data, drawn)
  np.testing.assert_array_equal(viewer.layers[SEGMENTATION].data, before)
  scribbles.data[5, 5:9] = 2
  scribbles.refresh()
  widget.refine_button.click()
  widget.cancel_button.click()  # stops at the round's progress report
  _wait(qtbot, widget)
  assert widget.message_label.text().startswith("cancelled"), widget.message_label.text()
  assert widget.interaction.rounds == 0 and not (widget.interaction.session / "session.json").exists()
  np.testing.assert_array_equal(viewer.layers[SEGMENTATION].data, before)
  viewer.layers.remove(SCRIBBLES)
  widget.refine_button.click()
  assert "layer is gone" in widget.message_label.text()
  viewer.add_labels(drawn, name=SCRIBBLES)
  widget.setting_edits["max_steps"].setText("many")
  widget.refine_button.click()
  assert "--steps must be an integer" in widget.message_label.text()

  two = tmp_path / "two_channels.nii.gz"  # the 1-channel model cannot read 2 channels
  nib.save(nib.Nifti1Image(np.random.default_rng(0).random((32, 32, 1, 2), np.float32), np.eye(4)), two)
  widget.open(str(two), "nuclei2d")
  _wait(qtbot, widget)
  assert "channel" in widget.message_label.text() and widget.message_label.text().startswith("error:")
  assert viewer.layers[SCRIBBLES].data[5, 5] == 7  # the opened image and its strokes stay
  assert widget.interaction.image.path == str(cells)


@pytest.mark.slow
def test_a_session_saved_from_the_widget_continues_on_the_command_line(
  make_napari_viewer, qtbot, cells, tmp_path, capsys
):
  viewer, widget = _widget(make_napari_viewer, qtbot, cells, "nuclei2d", tmp_path / "session")
  _stroke(widget, (30, slice(10, 30)))
  _refine(qtbot, widget)
  saved = tmp_path / "saved"  # a copy, continued on the command line
  widget.save_session(str(saved))
  assert core.default_output(widget.interaction) == str(cells.with_name("cells.seg.png"))
  out = tmp_path / "widget_seg.png"
  widget.save_segmentation(str(out))
  np.testing.assert_array_equal(read_image(out, labels=True).array[..., 0], viewer.layers[SEGMENTATION].data)

  marks = np.zeros((64, 64), np.uint8)  # round 2 on the command line: background here
  marks[50, 40:50] = 255
  marks_path = tmp_path / "more.png"
  PILImage.fromarray(marks).save(marks_path)
  cli_out = tmp_path / "cli_seg.png"
  code = main(
    ["refine", "--session", str(saved), "--marks", str(marks_path), "--out", str(cli_out), "--steps", "100", "--json"]
  )
  report = json.loads(capsys.readouterr().out)
  assert code == 0 and report["round"] == 2 and report["rounds"] == 2

  again = ScribbleWidget(viewer)  # and back in the widget: two rounds, both strokes
  again.warm_check.setChecked(False)
  again.open(None, None, str(saved))
  _wait(qtbot, again)
  assert again.interaction.rounds == 2, again.message_label.text()
  np.testing.assert_array_equal(viewer.layers[SEGMENTATION].data, read_image(cli_out, labels=True).array[..., 0])
  assert viewer.layers[SCRIBBLES].data[50, 45] == 1 and viewer.layers[SCRIBBLES].data[30, 20] > 0
  # the command line's round brought its reasons: the why layer, opened with the session, shows them
  stored = session_store.round_arrays(saved, session_store.load_session(saved)["rounds"][-1])
  np.testing.assert_array_equal(viewer.layers[WHY].data, session_store.reasons_of(stored))
  assert viewer.layers[WHY].data[50, 45] == REASONS.index("mark") and not viewer.layers[WHY].visible
  network = again.interaction.initial
  again.reset_button.click()  # both rounds undone: the network's own, no marks
  _wait(qtbot, again)
  assert again.interaction.rounds == 0 and json.loads((saved / "session.json").read_text())["rounds"] == []
  np.testing.assert_array_equal(viewer.layers[SEGMENTATION].data, network)
  assert not viewer.layers[SCRIBBLES].data.any() and WHY not in viewer.layers


@pytest.mark.slow
def test_refine_in_3d_honours_the_stroke_and_undo_restores_the_layer(make_napari_viewer, qtbot, brain, tmp_path):
  viewer, widget = _widget(make_napari_viewer, qtbot, brain, "tissue3d", tmp_path / "session", warm=True)
  segmentation = viewer.layers[SEGMENTATION]
  before = segmentation.data.copy()
  assert before.shape == (24, 24, 12) and viewer.layers["image"].scale[0] == pytest.approx(3.0)
  scribbles = viewer.layers[SCRIBBLES]
  index = (12, slice(6, 18), 6)
  scribbles.data[index] = np.where(before[index] == 3, 3, 4)  # grey matter where it says white, else white
  scribbles.refresh()
  values = scribbles.data.copy()
  assert _refine(qtbot, widget)["satisfied"], widget.report
  _assert_honoured(widget, values)
  # a point (in the volume's index coordinates, the layers scaled by the voxel spacing) takes one region
  shown, own = segmentation.data.copy(), viewer.layers[NETWORK].data.copy()
  regions, count = ndimage.label(own != shown)
  assert count >= 1 and viewer.layers[TAKE_HERE].scale[0] == pytest.approx(3.0)
  # the largest regions pointed at, the first one's slice brought into view (in world units: index x spacing)
  widget.point_button.click()
  first = tuple(int(i) for i in viewer.layers[TAKE_HERE].data[0])
  assert regions[first] > 0 and np.bincount(regions.ravel())[regions[first]] == np.bincount(regions.ravel())[1:].max()
  assert all(
    viewer.dims.point[a] == pytest.approx(first[a] * viewer.layers[SEGMENTATION].scale[a])
    for a in viewer.dims.not_displayed
  )
  assert f"at ({', '.join(map(str, first))})" in widget.message_label.text()
  viewer.layers[TAKE_HERE].data = np.argwhere(regions == 1)[:1].astype(float)
  widget.take_points_button.click()
  _wait(qtbot, widget)
  np.testing.assert_array_equal(segmentation.data, np.where(regions == 1, own, shown))
  widget.undo_button.click()
  _wait(qtbot, widget)
  np.testing.assert_array_equal(segmentation.data, before)


@pytest.mark.slow
def test_the_merge_switch_reaches_the_round(make_napari_viewer, qtbot, cells, tmp_path):
  from qtpy.QtCore import Qt

  # one step: the refined network cannot honour a stroke yet, so the merge (which writes the marks) shows
  viewer, widget = _widget(make_napari_viewer, qtbot, cells, "nuclei2d", tmp_path / "session", max_steps="1")
  merge = widget.setting_checks["progressive_merge"]
  assert merge.checkState() == Qt.CheckState.PartiallyChecked  # the model's setting, else the library's
  assert widget.settings().progressive_merge is None
  merge.setCheckState(Qt.CheckState.Checked)
  assert widget.settings().progressive_merge is True
  merge.setCheckState(Qt.CheckState.PartiallyChecked)
  _stroke(widget, (30, slice(10, 30)))
  merged = _refine(qtbot, widget)
  assert merged["settings"]["progressive_merge"] is True  # the library's default
  assert merged["network_marks_honoured"] < 1.0 and merged["marks_honoured"] == 1.0, merged
  # the refined network's own labels beside the merge, hidden; the take button shows them, and back
  own, shown = viewer.layers[NETWORK], viewer.layers[SEGMENTATION].data.copy()
  assert not own.visible and merged["network_differs"] == int((own.data != shown).sum()) > 0
  assert "differ in" in widget.report_label.text() and widget.take_button.text() == "Show network's own"
  changed = sum(merged["changed_this_round"].values())  # the stroke's pixels at least: marked
  assert (
    merged["changed_this_round"]["mark"] > 0 and f"this round changed {changed} pixels" in widget.report_label.text()
  )
  # the why layer, hidden: each changed pixel coloured by its reason, as many per reason as the report counts
  why, before = viewer.layers[WHY], widget.interaction.initial  # the first round starts from the network's own
  assert not why.visible and f"layer {WHY!r} shows where" in widget.report_label.text()
  for code, reason in enumerate(REASONS[1:], start=1):
    assert int(((why.data == code) & (shown != before)).sum()) == merged["changed_this_round"][reason], reason
  np.testing.assert_array_equal(shown[why.data == 0], before[why.data == 0])  # no reason: the label kept
  widget.take_button.click()
  _wait(qtbot, widget)
  np.testing.assert_array_equal(viewer.layers[SEGMENTATION].data, own.data)
  assert widget.interaction.taken == "network" and widget.take_button.text() == "Show merged"
  assert WHY not in viewer.layers  # the reasons are the merge's: not shown beside the network's own labels
  widget.take_button.click()
  _wait(qtbot, widget)
  np.testing.assert_array_equal(viewer.layers[SEGMENTATION].data, shown)
  assert widget.interaction.taken == "merged" and viewer.layers.selection.active.name == SCRIBBLES
  np.testing.assert_array_equal(viewer.layers[WHY].data, why.data)
  # region by region: a point in one region of difference takes the network's own labels there only
  regions, count = ndimage.label(own.data != shown)
  assert count > 1
  point = np.argwhere(regions == 1)[0]
  widget.take_points_button.click()  # no point yet: named, nothing changes
  _wait(qtbot, widget)
  assert "no point" in widget.message_label.text() and widget.interaction.taken == "merged"
  viewer.layers[TAKE_HERE].data = point[None].astype(float)
  widget.take_points_button.click()
  _wait(qtbot, widget)
  np.testing.assert_array_equal(viewer.layers[SEGMENTATION].data, np.where(regions == 1, own.data, shown))
  assert widget.interaction.taken == "mixed" and widget.take_button.text() == "Show network's own"
  assert len(viewer.layers[TAKE_HERE].data) == 0  # the points are used up
  widget.take_button.click()  # from the mix: the network's own whole
  _wait(qtbot, widget)
  assert widget.interaction.taken == "network"
  # the network's own shown whole: the points point at, and take, the merge in the regions where it differs
  assert widget.take_points_button.text() == "Take merged at points"
  widget.point_button.click()
  assert "region(s) where the segmentation and the merged labels differ" in widget.message_label.text()
  back = regions == regions[tuple(np.round(viewer.layers[TAKE_HERE].data[0]).astype(int))]
  viewer.layers[TAKE_HERE].data = viewer.layers[TAKE_HERE].data[:1]
  widget.take_points_button.click()
  _wait(qtbot, widget)
  np.testing.assert_array_equal(viewer.layers[SEGMENTATION].data, np.where(back, shown, own.data))
  assert widget.interaction.taken == "mixed" and widget.take_points_button.text() == POINTS_TEXT["network"]
  for _ in range(2):  # the mix to the network's own whole, and the merge back
    widget.take_button.click()
    _wait(qtbot, widget)
  np.testing.assert_array_equal(viewer.layers[SEGMENTATION].data, shown)
  # the largest regions of difference, pointed at; the person keeps the second's point only, and takes there
  widget.point_button.click()
  sizes, pointed = np.bincount(regions.ravel())[1:], viewer.layers[TAKE_HERE].data.copy()
  at = [int(regions[tuple(np.round(p).astype(int))]) for p in pointed]
  assert len(at) == min(3, count) and [sizes[a - 1] for a in at] == sorted(sizes, reverse=True)[: len(at)]
  assert "region(s) where the segmentation and the refined network's own labels differ" in widget.message_label.text()
  viewer.layers[TAKE_HERE].data = pointed[1:2]
  widget.take_points_button.click()
  _wait(qtbot, widget)
  np.testing.assert_array_equal(viewer.layers[SEGMENTATION].data, np.where(regions == at[1], own.data, shown))
  widget.take_button.click()  # the mix to the network's own whole, and the merge back
  _wait(qtbot, widget)
  widget.take_button.click()
  _wait(qtbot, widget)
  np.testing.assert_array_equal(viewer.layers[SEGMENTATION].data, shown)
  merge.setCheckState(Qt.CheckState.Unchecked)
  assert widget.settings().progressive_merge is False
  values = _stroke(widget, (12, slice(5, 25)))
  report = _refine(qtbot, widget)
  assert report["settings"]["progressive_merge"] is False, report["settings"]
  # the segmentation is the refined network's own: it honours the marks exactly as far as the network does
  assert report["marks_honoured"] == report["network_marks_honoured"] < 1.0, report
  _assert_honoured(widget, values)
  # without the merge the segmentation is the refined network's own: no second layer, nothing to choose
  assert report["network_differs"] == 0 and widget.interaction.taken is None and NETWORK not in viewer.layers
  assert WHY not in viewer.layers
  assert not any(b.isEnabled() for b in (widget.take_button, widget.take_points_button, widget.point_button))
  assert TAKE_HERE not in viewer.layers


def test_points_mask_marks_the_pixels_nearest_the_points_and_names_bad_points():
  mask = core.points_mask(np.array([[1.2, 2.6], [0.0, 0.0]]), (3, 4))
  np.testing.assert_array_equal(np.argwhere(mask), [[0, 0], [1, 3]])
  for points, message in [
    (np.zeros((0, 2)), "no point"),
    (np.array([[1.0, 1.0, 1.0]]), "each needs 2 coordinates"),
    (np.array([[2.6, 1.0]]), r"point \[2.6, 1.0\] lies outside the image \(3, 4\)"),
  ]:
    with pytest.raises(ValueError, match=message):
      core.points_mask(points, (3, 4))


def test_marks_of_names_a_value_that_is_no_class():
  names = ("background", "nucleus")
  assert core.legend(names) == "0 = unmarked, 1 = background, 2 = nucleus"
  np.testing.assert_array_equal(core.marks_of(np.array([0, 1, 2]), names), [-1, 0, 1])
  with pytest.raises(ValueError, match="value 3 at 1 pixel"):
    core.marks_of(np.array([0, 3]), names)
  new, erased = core.pending_marks(np.array([1, -1, 0, 0]), np.array([1, 0, -1, 1]))
  np.testing.assert_array_equal(new, [-1, -1, 0, 0])
  assert erased == 1


@pytest.mark.slow
def test_view_opens_the_image_with_the_widget_docked(make_napari_viewer, qtbot, monkeypatch, cells, tmp_path):
  viewers = []
  monkeypatch.setattr(napari, "Viewer", lambda **kwargs: viewers.append(make_napari_viewer(**kwargs)) or viewers[-1])
  monkeypatch.setattr(napari, "run", lambda: None)  # the event loop is pytest-qt's
  monkeypatch.setattr(ScribbleWidget, "_warm_up", lambda self, it: 0.0)
  argv = ["view", str(cells), "--model", "nuclei2d", "--steps", "7", "--no-progressive-merge"]
  assert main([*argv, "--session", str(tmp_path / "s")]) == 0
  widget = viewers[0].window.dock_widgets["scribblejax refine"]
  _wait(qtbot, widget)
  assert widget.interaction is not None, widget.message_label.text()
  assert {SEGMENTATION, SCRIBBLES, "image"} <= {layer.name for layer in viewers[0].layers}
  assert widget.settings().max_steps == 7 and widget.settings().progressive_merge is False
  widget.add_class("mitosis")  # a class the network never learnt: value 3
  assert "3 = mitosis" in widget.legend_label.text() and widget.class_box.count() == 3
  widget.add_class("Nucleus")
  assert "already a class" in widget.message_label.text()


def test_view_has_help(capsys):
  with pytest.raises(SystemExit) as exit_:
    main(["view", "--help"])
  assert exit_.value.code == 0 and "value = class + 1" in capsys.readouterr().out


def test_the_manifest_names_the_widget():
  import npe2

  manifest = npe2.PluginManifest.from_distribution("scribblejax")
  assert manifest.contributions.widgets[0].display_name == "scribblejax refine"
  module = manifest.contributions.commands[0].python_name.split(":")[0]
  assert Path(module.replace(".", "/") + ".py").name == "widget.py"
