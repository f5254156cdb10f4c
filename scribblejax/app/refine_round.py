"""``refine``: one refinement round (or an undo) on an image with marks files, in a session or alone.

:func:`run_refine` checks the request (files, session, classes) before any heavy work and reads the
marks; a round is then a sequence of named steps over one immutable :class:`Request`:

1. :func:`load`: the network (with any new classes), the settings resolved, the image fitted;
2. :func:`round_marks`: the session's earlier marks, this round's on the model's grid, grown;
3. :func:`refine_marks`: the network's own segmentation, the refinement loop, the refined logits;
4. :func:`segment`: the refined labels on the image's grid, merged into the previous segmentation;
5. :func:`persist`: the segmentation, overlay and report written, the session's round stored.

Steps 3 and 4 run :mod:`scribblejax.pipeline.round`, the step the evaluation harness runs too.

The marks' truth is the image's grid: what the user drew, plus what region growing added; the model's
grid gets them by :func:`scribblejax.pipeline.grid.to_model`, once per round.
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from scribblejax import marks as marks_lib
from scribblejax.app.models import Log, load_network, model_ref, read_info, silent
from scribblejax.app.report import (
  COMPILE_NOTE,
  changed_line,
  check_outputs,
  class_counts,
  companion_paths,
  compile_timer,
  device_info,
  round_line,
  write_outputs,
)
from scribblejax.app.settings import (
  SETTINGS,
  MarkOptions,
  RefineSettings,
  reported_settings,
  resolve_class_names,
  session_new_classes,
  with_new_classes,
)
from scribblejax.config import RefineConfig
from scribblejax.io import session_store
from scribblejax.io.images import Image, image_digest, output_format, read_image
from scribblejax.io.marks_files import read_marks
from scribblejax.kernels import resolve_conv_backend
from scribblejax.models.surgery import add_classes
from scribblejax.params import last_layers
from scribblejax.pipeline.grid import (
  check_marks_inside_crop,
  cover_marks,
  inside,
  labels_from_logits,
  masks_on_image,
  to_image,
  to_model,
  to_model_counted,
)
from scribblejax.pipeline.network import Loop, Network, loop_split, network_logits, prepare, same_tree
from scribblejax.pipeline.preprocess import Fitted, network_input, span_text
from scribblejax.pipeline.round import honoured_fraction, refine_on_model_grid, round_config, round_labels
from scribblejax.pipeline.spec import InferenceOptions, spec_from_info
from scribblejax.refinement import num_classes_of, resolve_driver
from scribblejax.refinement.merge import Merged, changed_by, differences

# refine segments the image with W and with the refined weights in one pass over the patches when their
# two float32 logits volumes take at most this many bytes (else one pass after the other)
JOINT_LOGITS_BYTES = 4 * 2**30
LISTED_DIFFERENCES = 5  # the regions of difference a report lists, largest first
# a round's two segmentations in words, for reports, log lines and the viewer
NAMES = {"network": "the refined network's own labels", "merged": "the merged labels"}


def taken_words(which: str, pointed: bool = False) -> str:
  """What a take makes the round show, in words: ``which``'s labels, ``pointed``: in the regions pointed at."""
  return NAMES[which] + (" in the regions pointed at" if pointed else "")


# the flags that set each pipeline option a session records
_PIPELINE_FLAGS = {
  "resample": "--no-resample",
  "crop": "--no-crop",
  "mirror": "--mirror",
  "patch_size": "--patch-size",
  "step": "--patch-step",
}


class Request(NamedTuple):
  """One round, checked and read: what every step reads."""

  model: str  # as given (a built-in name or a folder)
  model_ref: str  # as reports and sessions store it
  image: Image
  digest: str  # the image's digest (sessions)
  marks_files: tuple[str, ...]
  new: np.ndarray  # int32[*image_spatial]: this round's marks as read, -1 unmarked
  out: str | None
  session: str | None
  doc: dict | None  # the session as stored (None: a first round, or no session)
  undone: dict | None  # the round an undo dropped first
  settings: RefineSettings
  class_names: tuple[str, ...] | None
  info: Any  # the model's stored info
  overlay: bool
  inference: InferenceOptions
  added: tuple[str, ...]  # classes appended to the network's head
  log: Log = silent
  progress: Any = None  # progress(steps, max_steps) during the loop
  patch_progress: Any = None  # patch_progress(done, total) during a sliding window


class Prepared(NamedTuple):
  """The network made ready for the round's image (:func:`load`)."""

  network: Network
  split: Any
  fitted: Fitted
  layers: int
  config: RefineConfig
  grow: float | None  # the region-growing threshold (None: off)
  num_classes: int


class RoundMarks(NamedTuple):
  """The round's marks on both grids (:func:`round_marks`)."""

  new_image: np.ndarray  # int32[*image_spatial]: this round's marks, grown
  drawn_image: np.ndarray  # int32[*image_spatial]: every round's marks as drawn (no growth)
  marks_image: np.ndarray  # int32[*image_spatial]: every round's marks, grown
  previous_image: np.ndarray | None  # the marks of the rounds before
  model: np.ndarray  # int32[*model_spatial]: every round's marks on the model's grid, covered
  arrays: dict | None  # the previous round's stored arrays
  grown: int  # voxels region growing added
  clashes: int  # marked voxels that lost their label to another on the model's grid
  start: Any  # the previous round's tunable leaves (--continue-weights), else None


class Refined(NamedTuple):
  """The refinement's outcome (:func:`refine_marks`)."""

  result: Any  # RefineResult
  logits: np.ndarray  # the refined network's model-layout logits
  before_image: np.ndarray  # int32[*image_spatial]: the network's own segmentation (or the session's)
  unsure_image: np.ndarray | None  # where the network was unsure, on the image's grid
  sure_image: np.ndarray | None  # where the network was sure (the merge protects it), on the image's grid
  initial: np.ndarray | None  # the session's stored initial segmentation
  loop: Loop
  joint: bool  # before and after came from one pass over the patches
  driver: str
  seconds: float
  compile_seconds: float


class Segmented(NamedTuple):
  """The round's segmentation (:func:`segment`)."""

  labels: np.ndarray  # int32[*image_spatial]
  honoured: float  # of marked pixels, in the segmentation
  network_honoured: float  # of marked pixels, in the refined network's labels
  network_labels: np.ndarray  # int32[*image_spatial]: the refined network's own labels
  changed: dict[str, int] | None = None  # with the merge: the pixels it changed, per reason (merge.changed_by)
  reasons: np.ndarray | None = None  # uint8[*image_spatial], with the merge: why each pixel of labels has its
  # label, an index into merge.REASONS


def run_refine(
  *,
  model: str | None,
  image: str | None,
  marks: Sequence[str],
  out: str | None,
  session: str | None = None,
  undo: bool = False,
  take: str | None = None,
  where: str | None = None,
  regions: Sequence[int] = (),
  settings: RefineSettings = RefineSettings(),
  mark_options: MarkOptions = MarkOptions(),
  overlay: bool = True,
  log: Log = silent,
  progress: Any = None,
  inference: InferenceOptions = InferenceOptions(),
  patch_progress: Any = None,
) -> dict:
  """One refinement round (or an undo) on an image with marks files.

  Args:
    model: a model folder or built-in name (taken from the session when ``None``).
    image: the image file or DICOM folder (taken from the session when ``None``).
    marks: marks files, accumulated in order; in a session they accumulate over earlier rounds.
    out: the segmentation to write (optional only for an undo without new marks).
    session: a session folder: created on the first round, continued afterwards.
    undo: drop the session's latest round first (then add a round if ``marks`` are given).
    take: ``"network"`` or ``"merged"``: make the session's latest round's segmentation the refined
      network's own labels or the round's merge (:func:`scribblejax.io.session_store.take`), and write
      it to ``out``; no refinement (no ``marks``, no ``undo``).
    where: with ``take``, a marks file (any format ``marks`` takes; its classes are ignored) whose marked
      pixels point at the regions to take: only the connected regions where the segmentation shown and
      ``take``'s differ that they touch change (:func:`scribblejax.refinement.merge.take_where`).
    regions: with ``take``, instead of ``where``: the ranks (1: the largest) of the connected regions where
      the segmentation shown and ``take``'s differ to take, as a report's ``differences`` lists them.
    settings: the refinement's knobs.
    mark_options: how marks files are read.
    overlay: write ``<out stem>.overlay.png``.
    log: progress messages.
    progress: ``progress(steps_taken, max_steps)`` during the refinement (see :func:`scribblejax.refine`).
    inference: crop, spacing, patches, mirroring (:class:`scribblejax.pipeline.InferenceOptions`). With
      patches, the loop runs the patches that hold marks, blended as the sliding window blends them
      (:class:`scribblejax.pipeline.MarkedPatches`), and the refined network then segments the whole
      image patch by patch.
    patch_progress: ``patch_progress(done, total)`` after each patch of a sliding-window segmentation:
      after the refinement, when the network's own segmentation comes with the refined one (a first
      round, see :func:`scribblejax.pipeline.sliding_window_logits_of`), else before and after it
      (``done`` starts again at 1 for the second).

  Returns:
    The report (also written as ``<out stem>.report.json``).

  Raises:
    ValueError: bad input, with a message naming the problem.
  """
  doc = session_store.load_session(session) if session else None
  _check_request(doc, session, undo, marks, settings, take, where, regions)
  if doc is not None:
    model = model or doc["model"]
    image = image or doc["image"]
  if model is None or image is None:
    raise ValueError(f"--{'model' if model is None else 'image'} is required (no session to take it from)")
  if out is None and marks:
    raise ValueError("--out is required")
  report_path, overlay_path = companion_paths(out) if out else (None, None)
  check_outputs([out, report_path, overlay_path if overlay else None], [image, *marks, *([where] if where else [])])
  info = read_info(model)
  ref = model_ref(model)
  log(f"reading {image}")
  img = read_image(image)
  if out:
    output_format(out, img.geometry)
  digest = image_digest(img)
  if doc is not None:
    _check_session(doc, session, img, digest, model, ref, inference, bool(marks))
  class_names, num_classes, added = _classes(settings, mark_options, info, doc, session, model)
  new = _read_marks(marks, img, mark_options, num_classes, class_names, log) if marks else None
  if take is not None:
    pointed = _read_where(where, img, mark_options, class_names, log) if where else None
    if regions:
      pointed = ranked_regions(session, doc, take, regions)
    return after_take(doc, session, take, img, out, overlay, log, info, class_names, pointed)
  undone = None
  if undo:
    doc, undone = session_store.without_last_round(doc, session)
    log(f"undoing round {undone['round']} of session {session}")
  if new is None:
    return after_undo(doc, session, undone, img, out, overlay, log, info, class_names)
  request = Request(
    model,
    ref,
    img,
    digest,
    tuple(marks),
    new,
    out,
    session,
    doc,
    undone,
    settings,
    class_names,
    info,
    overlay,
    inference,
    added,
    log,
    progress,
    patch_progress,
  )
  return refine_round(request)


def _check_request(
  doc: dict | None,
  session: str | None,
  undo: bool,
  marks: Sequence[str],
  settings: RefineSettings,
  take: str | None = None,
  where: str | None = None,
  regions: Sequence[int] = (),
) -> None:
  """Refuses a request that cannot be run, before any file is read but the session's."""
  if where is not None and take is None:
    raise ValueError("--where points at the regions --take takes: give it with --take")
  if regions and take is None:
    raise ValueError("--regions names the regions --take takes: give it with --take")
  if regions and where is not None:
    raise ValueError("--regions and --where both point at regions to take: give one")
  bad = [r for r in regions if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 1]
  if bad:
    raise ValueError(f"--regions are ranks of regions of difference, 1 the largest, got {bad}")
  if take is not None:
    if take not in session_store.TAKES:
      raise ValueError(f"--take is one of {', '.join(session_store.TAKES)}, got {take!r}")
    if not session:
      raise ValueError("--take needs --session (the folder whose latest round it changes)")
    if undo or marks:
      raise ValueError("--take changes the latest round's segmentation only: give it without --undo and --marks")
    given = [SETTINGS[f].flag if f in SETTINGS else "--new-class" for f in _given_settings(settings)]
    if given:
      raise ValueError(f"--take refines nothing, so it takes no method settings: drop {', '.join(given)}")
    if doc is None or not doc["rounds"]:
      raise ValueError(f"nothing to take: session {session} has no rounds")
    return
  if undo and not session:
    raise ValueError("--undo needs --session (the folder of the rounds to undo)")
  if settings.continue_weights and not session:
    raise ValueError("--continue-weights needs --session (it starts a round from the previous round's weights)")
  if undo and (doc is None or not doc["rounds"]):
    raise ValueError(f"nothing to undo: session {session} has no rounds")
  if not marks and not undo:
    raise ValueError("refine needs at least one --marks file")


def _given_settings(settings: RefineSettings) -> list[str]:
  """The fields of ``settings`` that differ from their defaults (the knobs a user set)."""
  default = RefineSettings()
  return [f.name for f in dataclasses.fields(settings) if getattr(settings, f.name) != getattr(default, f.name)]


def _check_session(
  doc: dict,
  session: str | None,
  img: Image,
  digest: str,
  model: str,
  ref: str,
  inference: InferenceOptions,
  new_round: bool,
) -> None:
  """Refuses a session of another image or model, or (for a new round) other pipeline options."""
  if doc["image_digest"] != digest:
    raise ValueError(f"image {img.path} is not the image of session {session} ({doc['image']})")
  if doc["model"] != ref:
    raise ValueError(f"model {model} is not the model of session {session} ({doc['model']})")
  check_session_pipeline(doc, session, inference, new_round)


def _classes(
  settings: RefineSettings, mark_options: MarkOptions, info: Any, doc: dict | None, session: str | None, model: str
) -> tuple[tuple[str, ...] | None, int | None, tuple[str, ...]]:
  """The class names marks files are read with, the class count, and the classes appended this round."""
  stated = spec_from_info(info)
  class_names = resolve_class_names(mark_options.class_names, info, stated.num_classes)
  num_classes = stated.num_classes
  added = session_new_classes(settings.new_classes, doc, session)
  if added:
    if num_classes is None:
      raise ValueError(f"model {model} does not state how many classes it predicts; --new-class needs that")
    class_names = with_new_classes(class_names or tuple(str(k) for k in range(num_classes)), added)
    num_classes += len(added)
  return class_names, num_classes, added


def _read_marks(
  marks: Sequence[str],
  img: Image,
  mark_options: MarkOptions,
  num_classes: int | None,
  class_names: Sequence[str] | None,
  log: Log,
) -> np.ndarray:
  """The marks files on the image's grid, accumulated in order.

  Raises:
    ValueError: a file that cannot be read as marks, or files that mark no pixel.
  """
  log(f"reading marks {', '.join(map(str, marks))}")
  new = _marks_on_grid(marks, img, mark_options, num_classes, class_names)
  if not (new >= 0).any():
    raise ValueError(f"the marks files {', '.join(map(str, marks))} mark no pixel")
  return new


def _marks_on_grid(
  paths: Sequence[str],
  img: Image,
  mark_options: MarkOptions,
  num_classes: int | None,
  class_names: Sequence[str] | None,
) -> np.ndarray:
  """Marks files on the image's grid, accumulated in order, read with ``mark_options`` (``num_classes``
  ``None``: a label map's values are not checked against the classes)."""
  return read_marks(
    list(paths),
    img.geometry,
    num_classes=num_classes,
    class_names=class_names,
    background_value=mark_options.background_value,
    unmarked_value=mark_options.unmarked_value,
    radius=mark_options.radius,
    rectangle=mark_options.rectangle,
  )


def ranked_regions(session: str, doc: dict, which: str, ranks: Sequence[int]) -> np.ndarray:
  """A mask pointing at the regions of difference of ranks ``ranks`` (1: the largest) between the latest
  round's segmentation shown and its ``which`` labels, as a report's ``differences`` lists them.

  Raises:
    ValueError: as :func:`scribblejax.io.session_store.labels_to_take`, a round refined without the merge,
      or a rank beyond the regions there are.
  """
  arrays, labels = session_store.labels_to_take(session, doc, which)
  if not session_store.choices(arrays):
    raise ValueError(
      f"round {doc['rounds'][-1]['round']} of session {session} was refined without the merge: it has one "
      "segmentation, no regions of difference"
    )
  regions = differences(arrays["labels"], labels, max(ranks))
  if not regions:
    raise ValueError(f"--regions: the segmentation shown is {NAMES[which]} everywhere: nothing to take")
  if max(ranks) > len(regions):
    raise ValueError(
      f"--regions {max(ranks)}: the segmentation shown and {NAMES[which]} differ in {len(regions)} region(s) only"
    )
  pointed = np.zeros(arrays["labels"].shape, bool)
  for rank in ranks:
    pointed[regions[rank - 1].point] = True
  return pointed


def differences_against(arrays: dict[str, np.ndarray], shown: np.ndarray) -> str | None:
  """Which of a round's two segmentations the regions of difference of ``shown`` are counted against: the
  refined network's own labels, unless those are what is shown (then the merge); ``None`` for a round
  with one segmentation."""
  if not session_store.choices(arrays):
    return None
  return "merged" if np.array_equal(shown, arrays["network_labels"]) else "network"


def differences_report(shown: np.ndarray, other: np.ndarray, class_names: Sequence[str] | None) -> list[dict]:
  """The largest regions where ``shown`` and ``other`` differ (at most :data:`LISTED_DIFFERENCES`), for a
  report: rank, pixels, a point inside (the image's array index) and the class on either side."""

  def name(k: int) -> str | int:
    return class_names[k] if class_names is not None and k < len(class_names) else k

  return [
    {"rank": i + 1, "pixels": d.size, "point": list(d.point), "shown": name(d.shown), "other": name(d.other)}
    for i, d in enumerate(differences(shown, other, LISTED_DIFFERENCES))
  ]


def _read_where(
  where: str, img: Image, mark_options: MarkOptions, class_names: Sequence[str] | None, log: Log
) -> np.ndarray:
  """The pixels ``--where``'s marks file marks, on the image's grid.

  Args:
    where: a marks file of any kind ``--marks`` takes: a label map's values are not read as classes (any
      value but the unmarked one points); a LabelMe or Slicer file names the model's classes, as marks do.
    img: the image (its geometry).
    mark_options: how marks files are read.
    class_names: the classes a LabelMe or Slicer file may name.
    log: progress messages.

  Returns:
    ``bool[*spatial]``: the pixels pointed at.

  Raises:
    ValueError: a file that cannot be read as marks, or one that marks no pixel.
  """
  log(f"reading {where}")
  pointed = _marks_on_grid([where], img, mark_options, None, class_names)
  if not (pointed >= 0).any():
    raise ValueError(f"--where {where} marks no pixel: it points at no region to take")
  return pointed >= 0


def check_session_pipeline(doc: dict, session: str | None, inference: InferenceOptions, new_round: bool) -> None:
  """Refuses a new round whose pipeline options differ from the session's first round (a session stored
  before they were recorded is not checked): its weights, its initial segmentation and its marks belong
  to that pipeline.

  Raises:
    ValueError: naming the flags that differ.
  """
  stored = doc.get("pipeline")
  if not new_round or stored is None:
    return
  current = inference.record()
  differ = [
    f"{_PIPELINE_FLAGS[k]} ({stored.get(k)!r} then, {current[k]!r} now)"
    for k in _PIPELINE_FLAGS
    if stored.get(k) != current[k]
  ]
  if differ:
    raise ValueError(
      f"session {session} was refined with other pipeline options: {', '.join(differ)}; give its "
      "rounds the same options, or start a new session"
    )


def after_undo(
  doc: dict,
  session: str,
  undone: dict,
  img: Image,
  out: str | None,
  overlay: bool,
  log: Log,
  info: Any,
  class_names: Sequence[str] | None,
) -> dict:
  """Saves the session without its last round and writes the segmentation it now shows.

  Returns:
    The undo's report.
  """
  initial = session_store.load_initial(session)
  if doc["rounds"]:
    arrays = session_store.round_arrays(session, doc["rounds"][-1])
    labels, marks = arrays["labels"], arrays["marks"]
  else:
    labels, marks = initial, None
  if labels is None:
    raise ValueError(f"session {session} has lost its stored segmentation (initial.npz); start a new session")
  num_classes = int(max(labels.max(), 0 if initial is None else initial.max())) + 1
  report = {
    "command": "refine",
    "undo": True,
    "undone_round": undone["round"],
    "rounds": len(doc["rounds"]),
    "session": str(session),
    "image": doc["image"],
    "model": doc["model"],
    "class_pixels": class_counts(labels, class_names or info.class_names, num_classes),
  }
  report = write_outputs(
    report,
    out,
    img,
    labels,
    initial if initial is not None else labels,
    labels if doc["rounds"] else None,
    marks,
    overlay,
    log,
    f"{Path(img.path).name}: after undo",
  )
  session_store.save_session(session, doc)
  session_store.remove_round_file(session, doc, undone)
  return report


def after_take(
  doc: dict,
  session: str,
  which: str,
  img: Image,
  out: str | None,
  overlay: bool,
  log: Log,
  info: Any,
  class_names: Sequence[str] | None,
  where: np.ndarray | None = None,
) -> dict:
  """Makes the latest round's segmentation its merge or the refined network's own labels (with ``where``:
  in the regions it points at), and writes it.

  Returns:
    The report: the round, what it showed before (``was``) and shows now (``shows``: ``"merged"``,
    ``"network"`` or ``"mixed"``), the pixels that changed, and the fraction of the marks the segmentation
    now honours.
  """
  arrays, labels = session_store.labels_to_take(session, doc, which, where)
  record = doc["rounds"][-1]
  initial = session_store.load_initial(session)
  num_classes = int(max(arrays["labels"].max(), labels.max())) + 1
  report = {
    "command": "refine",
    "take": which,
    "was": session_store.taken_of(arrays),
    "shows": which if where is None else session_store.shown_name(arrays, labels),
    "round": record["round"],
    "rounds": len(doc["rounds"]),
    "session": str(session),
    "image": doc["image"],
    "model": doc["model"],
    "changed_pixels": int((labels != arrays["labels"]).sum()),
    "marks_honoured": honoured_fraction(labels, arrays["marks"]),
    "class_pixels": class_counts(labels, class_names or info.class_names, num_classes),
  }
  against = differences_against(arrays, labels)
  if against is not None:  # what is left to take region by region
    names = class_names or info.class_names or [str(k) for k in range(num_classes)]
    report["differences_with"] = against
    report["differences"] = differences_report(labels, arrays[f"{against}_labels"], names)
  what = taken_words(which, where is not None)
  title = f"{Path(img.path).name}: round {record['round']}, {what}"
  report = write_outputs(
    report, out, img, labels, initial if initial is not None else labels, labels, arrays["marks"], overlay, log, title
  )
  session_store.store_take(session, doc, arrays, labels, report["shows"])
  log(f"round {record['round']} of session {session} now takes {what}")
  return report


def refine_round(request: Request) -> dict:
  """One round on checked, read input: :func:`load`, :func:`round_marks`, :func:`refine_marks`,
  :func:`segment`, :func:`persist`.

  Returns:
    The round's report.
  """
  prepared = load(request)
  marks = round_marks(request, prepared)
  refined = refine_marks(request, prepared, marks)
  segmented = segment(request, prepared, marks, refined)
  return persist(request, prepared, marks, refined, segmented)


def load(request: Request) -> Prepared:
  """The network (its head extended by the new classes), the settings resolved, and the image fitted."""
  log = request.log
  network = load_network(request.model, log)
  if request.added:
    log(f"appending class(es) {', '.join(request.added)} to the network's head")
    try:
      extended = add_classes(network.model, len(request.added))
    except ValueError as err:
      raise ValueError(f"--new-class cannot extend this model's head: {err}") from None
    network = network._replace(
      model=extended, spec=network.spec._replace(num_classes=network.spec.num_classes + len(request.added))
    )
  num_classes = network.spec.num_classes
  layers, config, grow = request.settings.resolve(request.info.metadata)
  network, split, fitted, layers = prepare(network, request.image, request.info, layers, request.inference)
  for note in fitted.notes:
    log(f"note: {note}")
  effective = round_config(config, fitted)
  if effective is not config:
    log("note: with patches the keep term is off (it needs the network's logits at every voxel)")
    config = effective
  if num_classes is None:
    num_classes = num_classes_of(split, network_input(fitted))
  return Prepared(network, split, fitted, layers, config, grow, num_classes)


def _grow(
  new: np.ndarray, new_model: np.ndarray, fitted: Fitted, grow: float, previous_drawn: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, int]:
  """This round's marks grown on the model's grid (never into the padding, nor into or across what the
  user drew in earlier rounds: their word; what earlier growth inferred, a newer round's may relabel).

  Returns:
    ``(new_image, new_model, grown)``: the grown marks on both grids and the voxels growth added.
  """
  grown_marks = np.full_like(new_model, -1)
  region = inside(fitted)
  blocked = None if previous_drawn is None else to_model(previous_drawn, fitted)[region] >= 0
  grown_marks[region] = marks_lib.grow_marks(new_model[region], fitted.image[region], grow, blocked=blocked)
  grown = int((grown_marks >= 0).sum() - (new_model >= 0).sum())
  grown_image = to_image(grown_marks, fitted)
  if previous_drawn is not None:
    grown_image = np.where(previous_drawn >= 0, -1, grown_image)
  return np.where(new >= 0, new, grown_image), grown_marks, grown


def round_marks(request: Request, prepared: Prepared) -> RoundMarks:
  """The session's earlier marks and this round's, grown, on the image's grid and the model's.

  Raises:
    ValueError: marks outside the model's crop, or marks the network's classes cannot hold.
  """
  fitted, new, doc, session = prepared.fitted, request.new, request.doc, request.session
  previous_image, previous_drawn, arrays = None, None, None
  if doc is not None and doc["rounds"]:
    arrays = session_store.round_arrays(session, doc["rounds"][-1])
    previous_image, previous_drawn = arrays["marks"], session_store.drawn_marks(arrays)
  check_marks_inside_crop(
    new if previous_image is None else marks_lib.accumulate(previous_image, new), fitted, request.class_names
  )
  new_model, clashes = to_model_counted(new, fitted)
  if clashes:
    request.log(
      f"note: {clashes} marked voxel(s) share a voxel of the model's grid with a mark of another class; "
      "one label holds there"
    )
  previous, start = None, None
  if previous_image is not None:
    previous = to_model(previous_image, fitted)
    if request.settings.continue_weights:
      start = session_store.tunable_leaves(arrays)
  new_image, grown = new, 0
  if prepared.grow:
    new_image, new_model, grown = _grow(new, new_model, fitted, prepared.grow, previous_drawn)
  drawn_image = new if previous_drawn is None else marks_lib.accumulate(previous_drawn, new)
  marks_image = new_image if previous_image is None else marks_lib.accumulate(previous_image, new_image)
  model_marks = new_model if previous is None else marks_lib.accumulate(previous, new_model)
  # where the image was resampled: also the voxels the segmentation's way back reads for each mark
  model_marks = cover_marks(model_marks, marks_image, fitted)
  model_marks = marks_lib.validate_mark_map(model_marks, fitted.image.shape[:-1], prepared.num_classes)
  return RoundMarks(new_image, drawn_image, marks_image, previous_image, model_marks, arrays, grown, clashes, start)


def _loop(request: Request, prepared: Prepared, marks: RoundMarks) -> tuple[Loop, bool]:
  """What the loop runs, and whether there is nothing to refine (every mark outside the crop)."""
  fitted, model_marks, log = prepared.fitted, marks.model, request.log
  # every mark outside the crop (background marks, which the pipeline honours there): nothing to refine
  nothing = fitted.patch is not None and not (model_marks >= 0).any()
  if nothing:
    log(
      "note: every mark lies outside the image's non-zero region, where the segmentation is background "
      "already: nothing to refine"
    )
    return Loop(prepared.split, fitted.image, model_marks, 0, 0), True
  loop = loop_split(
    prepared.network, fitted, prepared.split, model_marks, last_layers(prepared.layers), request.inference
  )
  if loop.patches:
    count, per_call = loop.patches, loop.per_call
    batches = "" if per_call >= count else f", {per_call} per network call (rematerialised one call at a time)"
    log(
      f"note: the loop runs the {count} patch(es) that hold marks (region {span_text(loop.region)} of the model's "
      f"grid{batches}), blended as the sliding window blends them; the refined network then segments the whole "
      "image"
    )
  return loop, False


def refine_marks(request: Request, prepared: Prepared, marks: RoundMarks) -> Refined:
  """The network's own segmentation (the session's, or computed), the refinement loop on the marks, and
  the refined network's logits (with patches and no stored segmentation, both in one pass over the
  patches, unless two volumes of logits would not fit :data:`JOINT_LOGITS_BYTES`)."""
  split, fitted, config, inference = prepared.split, prepared.fitted, prepared.config, request.inference
  initial = session_store.load_initial(request.session) if request.session else None
  joint = (
    initial is None
    and fitted.patch is not None
    and 2 * 4 * int(np.prod(fitted.image.shape[:-1])) * prepared.num_classes <= JOINT_LOGITS_BYTES
  )
  unsure_image = session_store.load_unsure(request.session) if initial is not None else None
  sure_image = session_store.load_sure(request.session) if initial is not None else None
  before_image = initial
  if initial is None and not joint:
    before_logits = network_logits(split, fitted, step=inference.step, progress=request.patch_progress)
    before_image = labels_from_logits(before_logits, fitted)
    unsure_image, _, sure_image = masks_on_image(None, before_logits, fitted, config)
    del before_logits
  loop, nothing = _loop(request, prepared, marks)
  start = (
    None
    if marks.start is None
    else same_tree(loop.split.tunable, marks.start, "--continue-weights needs the same --layers as the previous round")
  )
  driver = resolve_driver(config.driver, config.conv_backend, config.compute_dtype, config.cache_trunk)
  request.log(
    f"refining the last {prepared.layers} layers: up to {config.max_steps} steps on "
    f"{int((marks.model >= 0).sum())} marked pixels (driver {driver}, {device_info()['device']})"
  )
  with compile_timer() as compiled:
    start_time = time.perf_counter()
    # nothing: the network (W, or the previous round's W_lam) as it stands, no step
    result, logits, before = refine_on_model_grid(
      split,
      fitted,
      loop,
      config,
      inference.step,
      start=start,
      progress=request.progress,
      patch_progress=request.patch_progress,
      joint=joint,
      nothing=nothing,
    )
    if joint:
      before_image = labels_from_logits(before, fitted)
      unsure_image, _, sure_image = masks_on_image(None, before, fitted, config)
    del before
    seconds = time.perf_counter() - start_time
  return Refined(
    result, logits, before_image, unsure_image, sure_image, initial, loop, joint, driver, seconds, compiled[0]
  )


def segment(request: Request, prepared: Prepared, marks: RoundMarks, refined: Refined) -> Segmented:
  """The refined labels on the image's grid and, with the progressive merge, merged into the previous
  segmentation where this round's new marks ask for it; logs the round's closing line."""
  config, log, result = prepared.config, request.log, refined.result
  steps, satisfied = int(result.num_steps), bool(result.satisfied)
  arrays = marks.arrays
  previous_labels = (
    arrays["labels"] if arrays is not None and arrays.get("labels") is not None else refined.before_image
  )
  stale = refined.unsure_image is None and refined.initial is not None
  if config.progressive_merge and stale and config.merge_confidence > 0:
    log("note: this session was started before its network's unsure pixels were stored; the merge frees none")
  regions = prepared.fitted.regions is not None
  if config.progressive_merge and refined.sure_image is None and refined.initial is not None and not regions:
    log("note: this session was started before its network's sure pixels were stored; the merge protects none")
  # with the merge, what this round added: a marks file that holds earlier rounds' marks too does not make them new
  labels, network_labels, reasons = round_labels(
    refined.logits,
    prepared.fitted,
    config,
    previous_labels,
    marks.marks_image,
    marks.previous_image,
    refined.unsure_image if config.merge_confidence > 0 else None,  # an older session stored it at 0.8
    refined.sure_image,
    new_classes=tuple(range(prepared.num_classes - len(request.added), prepared.num_classes)),  # appended last
  )
  network_honoured = honoured_fraction(network_labels, marks.marks_image)
  honoured = honoured_fraction(labels, marks.marks_image)
  log(
    f"{steps} steps in {refined.seconds:.2f}s ({refined.compile_seconds:.2f}s compiling): "
    + round_line(
      satisfied,
      network_honoured,
      honoured,
      marks.marks_image,
      network_labels,
      request.class_names,
      steps,
      config.max_steps,
      bool(result.nonfinite),
    )
  )
  if satisfied and network_honoured < 1.0:
    log(
      "note: the loop honoured every mark on the model's grid, but the segmentation brought back to the "
      "image's grid misses some marked pixels (they lie between the model's voxels)"
    )
  changed = None if reasons is None else changed_by(Merged(labels, reasons), previous_labels)
  line = changed_line(changed)
  if line:
    log(line)
  return Segmented(labels, honoured, network_honoured, np.asarray(network_labels, np.int32), changed, reasons)


def round_report(
  request: Request, prepared: Prepared, marks: RoundMarks, refined: Refined, segmented: Segmented
) -> dict:
  """The round's report (before the paths written are added)."""
  img, config, result, loop = request.image, prepared.config, refined.result, refined.loop
  doc, num_classes, class_names = request.doc, prepared.num_classes, request.class_names
  steps, satisfied = int(result.num_steps), bool(result.satisfied)
  round_index = len(doc["rounds"]) + 1 if doc is not None else 1
  report = {
    "command": "refine",
    "image": img.path,
    "image_format": img.family,
    "image_shape": list(img.spatial_shape),
    "model": request.model_ref,
    "classes": list(class_names or [str(k) for k in range(num_classes)]),
    "marks_files": [str(m) for m in request.marks_files],
    "round": round_index,
    "new_marked_pixels": int((request.new >= 0).sum()),
    "grown_pixels": marks.grown,
    "marked_pixels": class_counts(marks.marks_image, class_names, num_classes),
    "clashing_marks": marks.clashes,
    "steps": steps,
    "max_steps": config.max_steps,
    "satisfied": satisfied,
    "nonfinite": bool(result.nonfinite),
    "marks_honoured": segmented.honoured,
    "network_marks_honoured": segmented.network_honoured,
    "changed_pixels": int((segmented.labels != refined.before_image).sum()),
    **({"changed_this_round": segmented.changed} if segmented.changed is not None else {}),
    "network_differs": int((segmented.labels != segmented.network_labels).sum()),
    "differences_with": "network",
    "differences": differences_report(
      segmented.labels, segmented.network_labels, class_names or [str(k) for k in range(num_classes)]
    ),
    "seconds": refined.seconds,
    "compile_seconds": refined.compile_seconds,
    "compile_seconds_note": COMPILE_NOTE,
    **device_info(),
    "driver": refined.driver,
    "conv_backend": resolve_conv_backend(config.conv_backend),
    "settings": reported_settings(request.settings, prepared.layers, config, prepared.grow),
    "notes": list(prepared.fitted.notes),
  }
  if request.added:
    report["new_classes"] = list(request.added)
  if refined.joint:
    report["notes"].append(
      "the network's own segmentation (for changed_pixels and the overlay) was computed in "
      "the same pass over the patches as the refined one; seconds includes it"
    )
  if loop.patches:
    report["refined_region"] = [[r.start, r.stop] for r in loop.region]
    report["refined_patches"] = loop.patches
    report["patches_per_call"] = min(loop.per_call, loop.patches)
  if request.session:
    report["session"] = str(request.session)
    report["rounds"] = round_index
    if request.undone is not None:
      report["undone_round"] = request.undone["round"]
  return report


def persist(request: Request, prepared: Prepared, marks: RoundMarks, refined: Refined, segmented: Segmented) -> dict:
  """Writes the segmentation, the overlay and the report, then stores the round in the session (its
  first round also the network's own segmentation and the pipeline's options).

  Returns:
    The round's report.
  """
  report = round_report(request, prepared, marks, refined, segmented)
  img, session, doc = request.image, request.session, request.doc
  title = f"{Path(img.path).name}: round {report['round']}, {report['steps']} steps, satisfied={report['satisfied']}"
  report = write_outputs(
    report,
    request.out,
    img,
    segmented.labels,
    refined.before_image,
    segmented.labels,
    marks.marks_image,
    request.overlay,
    request.log,
    title,
  )
  if not session:
    return report
  if doc is None:
    doc = session_store.new_session(str(Path(img.path).resolve()), request.digest, request.model_ref, img.spatial_shape)
    doc["pipeline"] = request.inference.record()
    if request.added:
      doc["new_classes"] = list(request.added)
  if refined.initial is None:
    session_store.save_initial(session, refined.before_image, refined.unsure_image, refined.sure_image)
  record = {
    "marks_files": [str(Path(m).resolve()) for m in request.marks_files],
    "steps": report["steps"],
    "satisfied": report["satisfied"],
    "settings": report["settings"],
    "out": str(request.out),
  }
  doc = session_store.append_round(
    session,
    doc,
    record,
    marks=marks.marks_image,
    new_marks=marks.new_image,
    labels=segmented.labels,
    tunable=[np.asarray(x) for x in jax.tree.leaves(refined.result.tunable)],
    drawn=marks.drawn_image,
    network_labels=segmented.network_labels,
    taken="merged" if prepared.config.progressive_merge else "network",
    reasons=segmented.reasons,
  )
  if request.undone is not None:
    session_store.remove_round_file(session, doc, request.undone)
  return report
