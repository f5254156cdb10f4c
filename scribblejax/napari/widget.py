"""The dock widget: choose a model and an image, paint scribbles, Refine, Undo, Reset, Save; after a
round, choose between its merged segmentation and the refined network's own labels.

Every heavy call (opening, a round, an undo) runs in a worker thread (``napari.qt.threading``); the
viewer stays live, and the layers change when the worker returns. A failed call leaves the layers as
they were and names the problem in the widget (nothing drawn is lost).

Layers: ``image``, ``segmentation`` (class k = label k; 0, the background, shows as nothing),
``scribbles`` (value k + 1 = class k, 0 = unmarked) and, after a round, ``refined network`` (hidden at
first: the latest round's refined network's own labels, which the merge took only in part; the
"Show network's own" button makes them the segmentation, and the next round starts from them) and
``take here`` (points: "Take network's own at points" takes those labels only in the regions of
difference the points lie in, and "Take merged at points", while they are shown whole, the merge;
"Point at largest differences" puts one in each of the three largest) and ``why`` (hidden at first: while
the latest round shows its merge, why the merge gave each pixel its label: every marked pixel its mark, and each
pixel the round changed the new marks' regions of change, the refined network's sureness, or the image;
:func:`scribblejax.napari.core.why_legend` names the colours, and with the layer selected the status bar names
the reason under the cursor).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (
  QCheckBox,
  QComboBox,
  QFileDialog,
  QFormLayout,
  QGridLayout,
  QHBoxLayout,
  QLabel,
  QLineEdit,
  QProgressBar,
  QPushButton,
  QVBoxLayout,
  QWidget,
)

from scribblejax.app import SETTINGS, RefineSettings, taken_words
from scribblejax.app.report import changed_line
from scribblejax.app.settings import settings_of
from scribblejax.io import session_store
from scribblejax.models.store import builtin_models, read_info
from scribblejax.napari import core
from scribblejax.refinement.merge import REASONS

IMAGE, SEGMENTATION, SCRIBBLES, NETWORK = "image", "segmentation", "scribbles", "refined network"
POINTED = 3  # the regions of difference "Point at largest differences" points at
WHY = "why"  # a labels layer: why the latest round's merge gave each pixel its label (core.why_values)
TAKE_HERE = "take here"  # a points layer: a point in each region where the other segmentation is to be taken
# the take buttons, by what they take (core.other_of of what is shown)
TAKE_TEXT = {"network": "Show network's own", "merged": "Show merged"}
POINTS_TEXT = {"network": "Take network's own at points", "merged": "Take merged at points"}
# the knobs the widget offers (the settings table's "napari" rows), by RefineSettings field: numbers as
# (the CLI's flag, field, type) in edit boxes, switches as fields in check boxes
KNOBS = tuple(
  (SETTINGS[field].flag, field, SETTINGS[field].type)
  for field in settings_of("napari")
  if SETTINGS[field].type is not bool
)
SWITCHES = tuple(field for field in settings_of("napari") if SETTINGS[field].type is bool)


class _Bridge(QObject):
  """Carries a worker thread's progress to the GUI thread (a queued signal)."""

  progress = Signal(int, int)


class ScribbleWidget(QWidget):
  """scribblejax's interactive refinement, docked in a napari viewer.

  Args:
    napari_viewer: the viewer (napari passes it by this name).
    parent: a Qt parent.

  Attributes:
    interaction: the open :class:`scribblejax.napari.core.Interaction`, or ``None``.
    report: the latest round's report (the CLI's), or ``None``.
    busy: a worker is running.
    worker: the latest worker (tests wait on it).
  """

  def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
    super().__init__(parent)
    self.viewer = napari_viewer
    self.interaction: core.Interaction | None = None
    self.report: dict | None = None
    self.busy = False
    self.worker = None
    self._next = None  # a step to start when the running one has finished
    self._cancel = threading.Event()
    self._bridge = _Bridge()
    self._bridge.progress.connect(self._on_progress)
    self._build()

  # ------------------------------------------------------------------------------------------
  # Layout.

  def _build(self) -> None:
    layout = QVBoxLayout(self)
    files = QFormLayout()
    self.model_box = QComboBox()
    self.model_box.setEditable(True)
    self.model_box.addItems(builtin_models())
    self.model_box.setToolTip("a shipped model, or a model folder (model.json) saved or converted by scribblejax")
    files.addRow("model", _row(self.model_box, _button("Folder...", self._choose_model)))
    self.image_edit = QLineEdit()
    self.image_edit.setPlaceholderText("NIfTI, NRRD, TIFF, PNG, JPEG, DICOM")
    files.addRow("image", _row(self.image_edit, _button("File...", self._choose_image)))
    self.session_edit = QLineEdit()
    self.session_edit.setPlaceholderText("empty: a temporary folder (Save session keeps it)")
    files.addRow("session", _row(self.session_edit, _button("Folder...", self._choose_session)))
    layout.addLayout(files)
    self.open_button = _button("Open", lambda: self.open())
    self.warm_check = QCheckBox("compile on open")
    self.warm_check.setChecked(True)
    self.warm_check.setToolTip(
      "after opening, compile the refinement with a throwaway one-step round (the "
      "session is untouched), so that the first Refine does not wait for it"
    )
    layout.addWidget(_row(self.open_button, self.warm_check))
    layout.addLayout(self._class_rows())
    layout.addLayout(self._setting_rows())
    layout.addLayout(self._action_rows())
    self.progress_bar = QProgressBar()
    self.progress_bar.setFormat("%v / %m")
    self.progress_bar.setToolTip("SGD steps of the round, then patches of the segmentation (with patches)")
    layout.addWidget(self.progress_bar)
    self.report_label = _wrapping("")
    self.message_label = _wrapping("Choose a model and an image, then Open.")
    layout.addWidget(self.report_label)
    layout.addWidget(self.message_label)
    layout.addStretch(1)
    self._enable()

  def _class_rows(self) -> QFormLayout:
    form = QFormLayout()
    self.class_box = QComboBox()
    self.class_box.currentIndexChanged.connect(self._on_class)
    form.addRow("paint class", self.class_box)
    self.legend_label = _wrapping("scribble value = class + 1; 0 = unmarked")
    form.addRow(self.legend_label)
    self.new_class_edit = QLineEdit()
    self.new_class_edit.setPlaceholderText("a class the network was never trained for")
    self.add_class_button = _button("Add class", lambda: self.add_class())
    form.addRow("new class", _row(self.new_class_edit, self.add_class_button))
    return form

  def _setting_rows(self) -> QGridLayout:
    grid = QGridLayout()
    self.setting_edits = {}
    for i, (flag, field, _) in enumerate(KNOBS):
      edit = QLineEdit()
      edit.setPlaceholderText("off" if field == "region_growing" else "default")
      edit.setToolTip(f"as scribblejax refine {flag}; empty: the model's stored setting, else the library's")
      self.setting_edits[field] = edit
      grid.addWidget(QLabel(flag), i // 2, 2 * (i % 2))
      grid.addWidget(edit, i // 2, 2 * (i % 2) + 1)
    self.setting_checks = {}
    for i, field in enumerate(SWITCHES):
      check = QCheckBox(SETTINGS[field].flag)
      tip = f"as scribblejax refine {SETTINGS[field].flag}: {SETTINGS[field].help}"
      if SETTINGS[field].stored:  # on, off, or (partly checked) the model's stored setting, else the library's
        check.setTristate(True)
        check.setCheckState(Qt.CheckState.PartiallyChecked)
        tip += "; partly checked: the model's setting, else the library's"
      check.setToolTip(tip)
      self.setting_checks[field] = check
      grid.addWidget(check, len(KNOBS) // 2 + i, 2)
    self.continue_check = self.setting_checks["continue_weights"]
    return grid

  def _action_rows(self) -> QGridLayout:
    grid = QGridLayout()
    self.refine_button = _button("Refine", lambda: self.refine())
    self.cancel_button = _button("Cancel", self.cancel)
    self.undo_button = _button("Undo", lambda: self.undo())
    self.reset_button = _button("Reset to network", lambda: self.reset())
    self.save_seg_button = _button("Save segmentation...", lambda: self.save_segmentation())
    self.save_session_button = _button("Save session...", lambda: self.save_session())
    self.take_button = _button(TAKE_TEXT["network"], lambda: self.take())
    self.take_button.setToolTip(
      "the latest round's segmentation: its merge (the default) or the refined network's own labels "
      "(layer 'refined network'); the next round starts from the one shown (scribblejax refine --take)"
    )
    self.take_points_button = _button(POINTS_TEXT["network"], lambda: self.take_at_points())
    self.take_points_button.setToolTip(
      f"the refined network's own labels (or, while they are shown whole, the merge) only in the regions where "
      f"they differ from the segmentation that hold a point of layer {TAKE_HERE!r} (scribblejax refine --take "
      "network|merged --where FILE)"
    )
    self.point_button = _button("Point at largest differences", lambda: self.point_at_differences())
    self.point_button.setToolTip(
      f"put a point of layer {TAKE_HERE!r} in each of the {POINTED} largest regions where the refined network's "
      "own labels (while they are shown whole, the merge) differ from the segmentation; delete the points of "
      "the regions where the segmentation is right, then take at the rest"
    )
    for i, b in enumerate(
      (
        self.refine_button,
        self.cancel_button,
        self.undo_button,
        self.reset_button,
        self.take_button,
        self.take_points_button,
        self.point_button,
        self.save_seg_button,
        self.save_session_button,
      )
    ):
      grid.addWidget(b, i // 2, i % 2)
    return grid

  def _enable(self) -> None:
    opened = self.interaction is not None and not self.busy
    for b in (self.refine_button, self.undo_button, self.reset_button, self.save_seg_button, self.save_session_button):
      b.setEnabled(opened)
    self.add_class_button.setEnabled(opened and self.interaction.rounds == 0)
    self.take_button.setEnabled(opened and self.interaction.taken is not None)
    self.take_points_button.setEnabled(opened and self.interaction.taken is not None)
    self.point_button.setEnabled(opened and self.interaction.taken is not None)
    taken = self.interaction.taken if self.interaction is not None else None
    self.take_button.setText(TAKE_TEXT[core.other_of(taken)])
    self.take_points_button.setText(POINTS_TEXT[core.other_of(taken)])
    self.open_button.setEnabled(not self.busy)
    self.cancel_button.setEnabled(self.busy)

  # ------------------------------------------------------------------------------------------
  # Actions (each public method is what its button calls).

  def open(self, image: str | None = None, model: str | None = None, session: str | None = None) -> None:
    """Opens an image with a model (default: the fields'); a named session folder is continued."""
    image = image if image is not None else self.image_edit.text().strip() or None
    model = model if model is not None else self.model_box.currentText().strip() or None
    session = session if session is not None else self.session_edit.text().strip() or None
    self._show_fields(image, model, session)
    self._run("opening", lambda: core.open_interaction(image, model, session), self._opened)

  def refine(self) -> None:
    """Runs one round on the scribble layer (``scribblejax refine --session``)."""
    it = self.interaction
    if it is None:
      return self._say("open an image first", error=True)
    try:
      settings = self.settings()
      values = np.array(self._layer(SCRIBBLES).data, copy=True)
    except ValueError as err:
      return self._say(str(err), error=True)
    except KeyError:
      return self._say(f"the {SCRIBBLES!r} layer is gone; Open the image again", error=True)
    self._cancel.clear()
    progress = self._progress_callback()
    self._run(
      "refining",
      lambda: core.refine_round(it, values, settings, progress=progress, patch_progress=progress),
      self._refined,
    )

  def cancel(self) -> None:
    """Asks the running round to stop at its next progress report (the session stays as it was)."""
    self._cancel.set()
    self._say("cancelling at the next progress report...")

  def undo(self) -> None:
    """Drops the latest round: the segmentation and the scribbles go back (unsent strokes stay)."""
    it = self.interaction
    if it is None:
      return
    pending = self._pending()
    self._run("undoing", lambda: core.undo_round(it), lambda new: self._restored(new, pending, "undid a round"))

  def reset(self) -> None:
    """Undoes every round: the network's own segmentation and no marks."""
    it = self.interaction
    if it is None:
      return
    self._run("resetting", lambda: core.reset(it), lambda new: self._restored(new, None, "back to the network"))

  def take(self, which: str | None = None) -> None:
    """Shows the latest round's refined network's own labels (``"network"``) or its merge (``"merged"``;
    default: the one not shown); the next round starts from it."""
    it = self._choice()
    if it is None:
      return
    which = which or core.other_of(it.taken)
    what = taken_words(which)
    self._run("taking", lambda: core.take(it, which), lambda new: self._taken(new, what))

  def _choice(self) -> core.Interaction | None:
    """The interaction when its latest round offers a choice between two segmentations; else ``None``,
    with the reason said when one is open."""
    it = self.interaction
    if it is not None and it.taken is None:
      self._say("the latest round offers no choice: no round, one without the merge, or an older one", error=True)
      return None
    return it

  def take_at_points(self) -> None:
    """Takes the refined network's own labels (the merge, while those are shown whole) in the regions where
    they differ from the segmentation that hold a point of the ``take here`` layer; the points are cleared,
    and the next round starts from the mix."""
    it = self._choice()
    if it is None:
      return
    try:
      where = core.points_mask(self._layer(TAKE_HERE).data, it.image.spatial_shape)
    except KeyError:
      return self._say(f"the {TAKE_HERE!r} layer is gone: refine a round to get it back", error=True)
    except ValueError as err:
      return self._say(f"{err} (layer {TAKE_HERE!r})", error=True)
    which = core.other_of(it.taken)
    what = taken_words(which, pointed=True)
    self._run("taking", lambda: core.take(it, which, where=where), lambda new: self._taken(new, what))

  def point_at_differences(self) -> None:
    """Puts a point of the ``take here`` layer in each of the :data:`POINTED` largest regions where the
    refined network's own labels (the merge, while those are shown whole) differ from the segmentation
    shown, replacing the points there, and says how large each is and where; the person deletes the
    points of the regions to leave as they are."""
    it = self._choice()
    if it is None:
      return
    found, which = core.largest_differences(it, POINTED), core.other_of(it.taken)
    if TAKE_HERE not in self.viewer.layers:
      return self._say(f"the {TAKE_HERE!r} layer is gone: refine a round to get it back", error=True)
    self._layer(TAKE_HERE).data = np.array([d.point for d in found], float).reshape(-1, it.labels.ndim)
    described = core.describe_differences(found, it.class_names, which)
    if not found:
      return self._say(f"nothing to point at: {described}")
    spacing = it.image.geometry.spacing
    for axis in self.viewer.dims.not_displayed:  # the first region's slice in view
      self.viewer.dims.set_point(axis, found[0].point[axis] * spacing[axis])
    self._say(f"{described}. Points in layer {TAKE_HERE!r}: delete those where the segmentation is right, then take")

  def add_class(self, name: str | None = None) -> None:
    """Appends a class to the network's head (before the first round only; the session keeps it)."""
    it = self.interaction
    name = (name if name is not None else self.new_class_edit.text()).strip()
    if it is None or not name:
      return
    try:
      if it.rounds or _session_started(it):
        raise ValueError("a session keeps the classes it started with: add classes before the first round")
      names = core.class_names_of(_model_info(it.model), (*it.new_classes, name))
    except ValueError as err:
      return self._say(str(err), error=True)
    self.interaction = it._replace(class_names=names, new_classes=(*it.new_classes, name))
    self._show_classes()
    self.class_box.setCurrentIndex(len(names) - 1)
    self._say(f"added class {name!r} (scribble value {len(names)}); it is learnt from its marks")

  def save_segmentation(self, path: str | None = None) -> None:
    """Writes the segmentation in the image's format (asks for a file when ``path`` is ``None``)."""
    it = self.interaction
    if it is None:
      return
    if self.busy:
      return self._say("busy: save when the running step has finished", error=True)
    path = path or QFileDialog.getSaveFileName(self, "Save segmentation", core.default_output(it), "")[0]
    if not path:
      return
    try:
      family = core.save_segmentation(it, path)
    except (ValueError, OSError) as err:
      return self._say(str(err), error=True)
    self._say(f"wrote {path} ({family})")

  def save_session(self, folder: str | None = None) -> None:
    """Copies the session folder to ``folder`` (asks when ``None``) and goes on there."""
    it = self.interaction
    if it is None:
      return
    if self.busy:
      return self._say("busy: save when the running step has finished", error=True)
    folder = folder or QFileDialog.getExistingDirectory(self, "Save session into an empty folder")
    if not folder:
      return
    try:
      self.interaction = core.save_session(it, folder)
    except (ValueError, OSError) as err:
      return self._say(str(err), error=True)
    self.session_edit.setText(str(self.interaction.session))
    self._say(f"session in {folder}; continue with: scribblejax refine --session {folder} --marks FILE --out FILE")

  def set_setting(self, field: str, value: Any) -> None:
    """Fills one knob as ``scribblejax view``'s flags do: an edit box gets ``value``'s text, a check box
    is checked or unchecked (``None``: a stored setting's check box goes back to partly checked, the
    model's setting).

    Raises:
      KeyError: ``field`` is no knob of the widget.
    """
    if field in self.setting_checks:
      partly = value is None and SETTINGS[field].stored
      checked = Qt.CheckState.Checked if value else Qt.CheckState.Unchecked
      self.setting_checks[field].setCheckState(Qt.CheckState.PartiallyChecked if partly else checked)
    else:
      self.setting_edits[field].setText("" if value is None else str(value))

  def settings(self) -> RefineSettings:
    """The knobs as :class:`RefineSettings` (an empty field: the model's default).

    Raises:
      ValueError: a field that is not a number, named by its CLI flag.
    """
    values = {}
    for flag, field, kind in KNOBS:
      text = self.setting_edits[field].text().strip()
      if text:
        try:
          values[field] = kind(text)
        except ValueError:
          raise ValueError(f"{flag} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    return RefineSettings(**values, **{field: _switch(check) for field, check in self.setting_checks.items()})

  # ------------------------------------------------------------------------------------------
  # Workers.

  def _run(self, what: str, work: Callable[[], Any], done: Callable[[Any], None]) -> None:
    from napari.qt.threading import create_worker

    if self.busy:
      return self._say("busy: wait for the running step", error=True)
    self.busy = True
    self._enable()
    self._say(f"{what}...")
    # errors are the widget's to show (a default connection would re-raise them in the GUI thread)
    worker = create_worker(
      work, _start_thread=False, _connect={"returned": done, "errored": self._failed, "finished": self._finished}
    )
    self.worker = worker
    worker.start()

  def _finished(self) -> None:
    self.busy = False
    self._enable()
    follow, self._next = self._next, None
    if follow is not None:
      self._run(*follow)

  def _failed(self, err: BaseException) -> None:
    if isinstance(err, core.Cancelled):
      self._say("cancelled: the session and the layers are as they were")
    elif isinstance(err, (ValueError, OSError)):
      self._say(" ".join(str(err).split()) or type(err).__name__, error=True)
    else:
      self._say(f"{type(err).__name__}: {err}", error=True)

  def _progress_callback(self) -> Callable[[int, int], None]:
    cancel, bridge = self._cancel, self._bridge

    def progress(done: int, total: int) -> None:
      if cancel.is_set():
        raise core.Cancelled()
      bridge.progress.emit(int(done), int(total))

    return progress

  def _on_progress(self, done: int, total: int) -> None:
    self.progress_bar.setMaximum(max(total, 1))
    self.progress_bar.setValue(min(done, max(total, 1)))

  # ------------------------------------------------------------------------------------------
  # Results (GUI thread).

  def _opened(self, it: core.Interaction) -> None:
    self.interaction = it
    self.report = None
    for name in (WHY, TAKE_HERE, NETWORK, SCRIBBLES, SEGMENTATION, IMAGE):
      if name in self.viewer.layers:
        self.viewer.layers.remove(name)
    self._add_image(it)
    scale = tuple(it.image.geometry.spacing)
    self.viewer.add_labels(np.array(it.labels, np.int32), name=SEGMENTATION, scale=scale, opacity=0.4)
    scribbles = self.viewer.add_labels(core.scribble_values(it), name=SCRIBBLES, scale=scale)
    scribbles.brush_size = 3
    scribbles.mode = "paint"
    self._show_network(it)
    self._show_why(it)
    self._show_classes()
    self._orient(it)
    self.viewer.reset_view()
    self.session_edit.setText(str(it.session))
    self.report_label.setText("")
    opened = (
      f"opened {Path(it.image.path).name} ({it.image.geometry.describe()}) with {it.model}; "
      f"{it.rounds} round(s) in the session"
    )
    self._say(opened)
    if self.warm_check.isChecked():
      self._next = (
        "compiling the refinement (paint meanwhile; Refine is ready when this ends)",
        lambda: self._warm_up(it),
        lambda seconds: self._say(f"{opened}; compiled in {seconds:.1f}s"),
      )

  def _warm_up(self, it: core.Interaction) -> float:
    """In the worker: :func:`scribblejax.napari.core.warm_up` with the fields' settings."""
    try:
      return core.warm_up(it, self.settings())
    except ValueError as err:
      raise ValueError(f"compiling on open failed (Refine will compile): {err}") from None

  def _add_image(self, it: core.Interaction) -> None:
    array, scale = it.image.array, tuple(it.image.geometry.spacing)
    if array.shape[-1] == 1:
      self.viewer.add_image(array[..., 0], name=IMAGE, scale=scale)
    elif array.shape[-1] in (3, 4) and it.image.family in ("png", "jpeg", "tiff"):
      self.viewer.add_image(array, name=IMAGE, rgb=True, scale=scale)
    else:
      self.viewer.add_image(array, name=IMAGE, channel_axis=-1, scale=scale)

  def _orient(self, it: core.Interaction) -> None:
    """A medical volume (axes i, j, k) is sliced along k, with i across the screen (an axial view of a
    RAS-oriented file); raster stacks (z, y, x) keep napari's own order."""
    if it.image.family in ("nifti", "nrrd", "dicom") and len(it.image.spatial_shape) == 3:
      self.viewer.dims.order = (2, 1, 0)
    else:
      self.viewer.dims.order = tuple(range(self.viewer.dims.ndim))

  def _refined(self, result: tuple[core.Interaction, dict]) -> None:
    it, report = result
    self.interaction, self.report = it, report
    self._set_layer(SEGMENTATION, it.labels)
    self._show_network(it)
    self._show_why(it)
    text = core.summary(report)
    if it.reasons is not None and changed_line(report.get("changed_this_round")):
      text += f" (layer {WHY!r} shows where: {core.why_legend()})"
    if report.get("network_differs"):
      text += (
        f"; the refined network's own labels (layer {NETWORK!r}) differ in {report['network_differs']} pixel(s): "
        f"{TAKE_TEXT['network']} takes them"
      )
    if report.get("erased_marks"):
      text += f"; {report['erased_marks']} erased mark pixel(s) stay in the session (Undo drops a round)"
    self.report_label.setText(text)
    self._say(f"refined: session {it.session}")

  def _restored(self, it: core.Interaction, pending: np.ndarray | None, what: str) -> None:
    self.interaction, self.report = it, None
    self._set_layer(SEGMENTATION, it.labels)
    self._show_network(it)
    self._show_why(it)
    marks = it.drawn if pending is None else np.where(pending >= 0, pending, it.drawn)
    self._set_layer(SCRIBBLES, core.values_of(marks))
    self.report_label.setText("")
    self._say(f"{what}: {it.rounds} round(s) in the session")

  def _taken(self, it: core.Interaction, what: str) -> None:
    self.interaction = it
    self._set_layer(SEGMENTATION, it.labels)
    self._show_why(it)
    if TAKE_HERE in self.viewer.layers:
      self._layer(TAKE_HERE).data = np.zeros((0, it.labels.ndim))
    self.report_label.setText(f"round {it.rounds} shows {what}")
    self._say(f"round {it.rounds} shows {what}; the next round starts from it")

  def _show_network(self, it: core.Interaction) -> None:
    """The ``refined network`` layer: the latest round's refined network's own labels (hidden when first
    added); no layer before a round."""
    if it.network is None:
      for name in (TAKE_HERE, NETWORK):
        if name in self.viewer.layers:
          self.viewer.layers.remove(name)
      return
    scale = tuple(it.image.geometry.spacing)
    added = False
    if NETWORK not in self.viewer.layers:
      self.viewer.add_labels(np.array(it.network, np.int32), name=NETWORK, scale=scale, opacity=0.4, visible=False)
      added = True
    else:
      self._set_layer(NETWORK, it.network)
    if TAKE_HERE not in self.viewer.layers:
      self.viewer.add_points(np.zeros((0, it.labels.ndim)), name=TAKE_HERE, scale=scale, size=3, face_color="yellow")
      added = True
    else:  # points placed for an earlier round say nothing about this one
      self._layer(TAKE_HERE).data = np.zeros((0, it.labels.ndim))
    if added and SCRIBBLES in self.viewer.layers:  # painting stays on the scribbles
      self.viewer.layers.selection.active = self._layer(SCRIBBLES)

  def _show_why(self, it: core.Interaction) -> None:
    """The ``why`` layer: why the latest round's merge gave each pixel its label (hidden when first added);
    no layer while the round shows something else, or before a round."""
    values = core.why_values(it)
    if values is None:
      if WHY in self.viewer.layers:
        self.viewer.layers.remove(WHY)
      return
    if WHY in self.viewer.layers:
      self._set_layer(WHY, values)
      return
    self.viewer.add_labels(
      values,
      name=WHY,
      scale=tuple(it.image.geometry.spacing),
      opacity=0.6,
      visible=False,
      colormap={None: "transparent", **{code: core.WHY_COLOURS[r] for code, r in enumerate(REASONS)}},
      features={"why": list(REASONS)},
    )
    if SCRIBBLES in self.viewer.layers:  # painting stays on the scribbles
      self.viewer.layers.selection.active = self._layer(SCRIBBLES)

  def _pending(self) -> np.ndarray | None:
    """Strokes painted since the latest round (they survive an undo), or ``None`` if unreadable."""
    it = self.interaction
    try:
      return core.pending_marks(core.marks_of(self._layer(SCRIBBLES).data, it.class_names), it.drawn)[0]
    except (ValueError, KeyError):
      return None

  def _set_layer(self, name: str, values: np.ndarray) -> None:
    """Writes ``values`` into the layer's own array (the same layer, updated in place; a layer the
    user deleted comes back)."""
    if name not in self.viewer.layers:
      scale = tuple(self.interaction.image.geometry.spacing)
      self.viewer.add_labels(np.array(values, np.int32), name=name, scale=scale)
      return
    layer = self._layer(name)
    if layer.data.shape == values.shape:
      layer.data[...] = values
      layer.refresh()
    else:
      layer.data = np.array(values, np.int32)

  def _layer(self, name: str):
    return self.viewer.layers[name]

  def _show_classes(self) -> None:
    it = self.interaction
    self.class_box.blockSignals(True)
    self.class_box.clear()
    self.class_box.addItems([f"{k + 1}: {n}" for k, n in enumerate(it.class_names)])
    self.class_box.blockSignals(False)
    self.class_box.setCurrentIndex(min(1, len(it.class_names) - 1))
    self._on_class(self.class_box.currentIndex())
    self.legend_label.setText(f"scribble value = class + 1: {core.legend(it.class_names)}")
    self._enable()

  def _on_class(self, index: int) -> None:
    if index >= 0 and SCRIBBLES in self.viewer.layers:
      self._layer(SCRIBBLES).selected_label = index + 1

  def _show_fields(self, image: str | None, model: str | None, session: str | None) -> None:
    self.image_edit.setText(image or "")
    if model:
      self.model_box.setCurrentText(model)
    self.session_edit.setText(session or "")

  def _say(self, text: str, error: bool = False) -> None:
    self.message_label.setStyleSheet("color: #e05050;" if error else "")
    self.message_label.setText(("error: " if error else "") + text)

  def _choose_model(self) -> None:
    folder = QFileDialog.getExistingDirectory(self, "Model folder (model.json)")
    if folder:
      self.model_box.setCurrentText(folder)

  def _choose_image(self) -> None:
    path = QFileDialog.getOpenFileName(self, "Image", "", "")[0]
    if path:
      self.image_edit.setText(path)

  def _choose_session(self) -> None:
    folder = QFileDialog.getExistingDirectory(self, "Session folder")
    if folder:
      self.session_edit.setText(folder)


def _session_started(it: core.Interaction) -> bool:
  return session_store.load_session(it.session) is not None


def _model_info(model: str) -> Any:
  return read_info(model)


def _switch(check: QCheckBox) -> bool | None:
  """A check box's setting: on or off; ``None`` (the model's, else the library's) when partly checked."""
  if check.checkState() == Qt.CheckState.PartiallyChecked:
    return None
  return check.isChecked()


def _button(text: str, slot: Callable[[], Any]) -> QPushButton:
  button = QPushButton(text)
  button.clicked.connect(lambda *_: slot())
  return button


def _row(*widgets: QWidget) -> QWidget:
  box = QWidget()
  row = QHBoxLayout(box)
  row.setContentsMargins(0, 0, 0, 0)
  for w in widgets:
    row.addWidget(w)
  return box


def _wrapping(text: str) -> QLabel:
  label = QLabel(text)
  label.setWordWrap(True)
  return label


def make_widget(napari_viewer: Any) -> ScribbleWidget:
  """The manifest's widget command."""
  return ScribbleWidget(napari_viewer)
