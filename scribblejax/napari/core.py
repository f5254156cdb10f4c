"""What the napari widget does, without napari or Qt: open an image with a model and a session folder,
run a refinement round on the scribble layer's values, undo, reset, save.

A round is exactly a ``scribblejax refine --session`` round: the new marks are written as a label map
in the image's geometry (in the session folder's hidden ``.napari/``), and
:func:`scribblejax.app.run_refine` reads them, runs the pipeline (crop, spacing, patches),
refines and stores the round. So a session started here continues with
``scribblejax refine --session DIR``, and one started there opens here.

Scribble layer values: ``0`` unmarked, ``k + 1`` class ``k`` (napari's label 0 is "nothing", and class 0,
the background, is a class a user marks).

Example:
  >>> it = open_interaction("cells.png", "nuclei2d")
  >>> values = scribble_values(it)                 # what the scribble layer starts with
  >>> values[10, 5:20] = 2                         # "this is nucleus"
  >>> it, report = refine_round(it, values, RefineSettings(max_steps=50))
  >>> it.labels                                    # the refined segmentation
  >>> it = undo_round(it)
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from scribblejax.app import Log, RefineSettings, check_outputs, load_network, model_ref, run_refine, silent, taken_words
from scribblejax.app.report import changed_line
from scribblejax.app.settings import with_new_classes
from scribblejax.io import session_store
from scribblejax.io.images import OUTPUTS, SUFFIXES, Image, image_digest, read_image, suffix_of, write_label_map
from scribblejax.models.store import read_info
from scribblejax.models.surgery import add_classes
from scribblejax.pipeline import InferenceOptions, labels_from_logits, network_logits, prepare, spec_from_info
from scribblejax.refinement.merge import REASONS, Difference, differences

WORK_FOLDER = ".napari"  # inside a session folder: the marks files and outputs of the widget's rounds
UNMARKED_VALUE = 0  # scribble layer value meaning "no mark"
_FILE_BACKGROUND = 255  # marks files: the CLI's defaults (0 unmarked, 255 background, k class k)

Progress = Callable[[int, int], None] | None


class Interaction(NamedTuple):
  """An image opened with a model and a session folder (every operation returns a new one)."""

  model: str  # a built-in model name or a model folder, as the session states it
  image: Image  # the image as read (array [*spatial, C], geometry)
  class_names: tuple[str, ...]  # the model's classes, then the session's new classes
  new_classes: tuple[str, ...]  # classes appended to the network's head (fixed by the first round)
  session: Path  # the session folder (a temporary one unless named)
  inference: InferenceOptions  # crop, spacing, patches, mirroring: the session's
  labels: np.ndarray  # int32[*spatial]: the current segmentation
  initial: np.ndarray  # int32[*spatial]: the network's own segmentation
  drawn: np.ndarray  # int32[*spatial]: the marks the session's rounds hold that the user drew, -1 unmarked
  rounds: int  # rounds in the session
  # the latest round's refined network's own labels, when the round offers a choice (it ran with the merge)
  network: np.ndarray | None = None  # int32[*spatial]
  # which of the two the latest round shows: "merged", "network" or "mixed" (some regions each; None: no choice)
  taken: str | None = None
  merged: np.ndarray | None = None  # int32[*spatial]: the latest round's merge, when it offers a choice
  # uint8[*spatial]: why each pixel of the latest round's merge has its label (merge.REASONS), while the
  # round shows its merge whole (None: no round, no merge, a take, or a round stored before they were kept)
  reasons: np.ndarray | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


# ----------------------------------------------------------------------------------------------
# Opening.


def open_interaction(
  image: str | None,
  model: str | None = None,
  session: str | None = None,
  inference: InferenceOptions | None = None,
  new_classes: Sequence[str] = (),
  log: Log = silent,
) -> Interaction:
  """Reads the image and the model, and the session's state or the network's own segmentation.

  Args:
    image: an image file or DICOM folder (``None``: the session's).
    model: a built-in model name or a model folder (``None``: the session's).
    session: a session folder to continue (or to create on the first round); ``None``: a new temporary one.
    inference: the pipeline options (default: the session's, else the CLI's defaults).
    new_classes: names of classes to append to the network's head (only before a session's first round).
    log: progress messages.

  Returns:
    The opened :class:`Interaction`.

  Raises:
    ValueError: the image or model cannot be read, the model cannot read the image (channels,
      dimensions), or the session belongs to another image or model.
  """
  doc = session_store.load_session(session) if session else None
  if doc is not None:
    model, image = model or doc["model"], image or doc["image"]
    inference = inference or InferenceOptions.from_record(doc.get("pipeline"))
    new_classes = _session_classes(doc, new_classes, session)
  if model is None or image is None:
    raise ValueError(f"name {'a model' if model is None else 'an image'} (no session to take it from)")
  inference = inference or InferenceOptions()
  info = read_info(model)
  log(f"reading {image}")
  img = read_image(image)
  if doc is not None:
    _check_session(doc, img, model, session)
  names = class_names_of(info, tuple(new_classes))
  folder = Path(session) if session else Path(tempfile.mkdtemp(prefix="scribblejax-napari-"))
  blank = np.full(img.spatial_shape, -1, np.int32)
  it = Interaction(str(model), img, names, tuple(new_classes), folder, inference, blank, blank, blank, 0)
  if doc is not None and session_store.load_initial(folder) is not None:
    return reload(it)
  labels = network_labels(it, log)
  return it._replace(labels=labels, initial=labels)


def _session_classes(doc: dict, given: Sequence[str], session: str) -> tuple[str, ...]:
  stored = tuple(doc.get("new_classes", ()))
  if given and tuple(given) != stored and doc["rounds"]:
    raise ValueError(f"session {session} keeps the classes it started with ({list(stored) or 'no new classes'})")
  return stored or tuple(given)


def _check_session(doc: dict, img: Image, model: str, session: str) -> None:
  if doc["image_digest"] != image_digest(img):
    raise ValueError(f"image {img.path} is not the image of session {session} ({doc['image']})")
  if doc["model"] != model_ref(model):
    raise ValueError(f"model {model} is not the model of session {session} ({doc['model']})")


def class_names_of(info: Any, added: tuple[str, ...]) -> tuple[str, ...]:
  """The model's class names (or their numbers), then ``added``, checked as ``--new-class`` is.

  Raises:
    ValueError: the model states neither names nor a class count, an added name a marks file would take
      for another class, or more classes than the scribble layer's values can hold.
  """
  count = spec_from_info(info).num_classes
  names = tuple(info.class_names or (str(k) for k in range(count or 0)))
  if not names:
    raise ValueError("the model states neither its class names nor how many classes it predicts")
  names = with_new_classes(names, added) if added else names
  if len(names) >= _FILE_BACKGROUND:
    raise ValueError(f"the model has {len(names)} classes; the widget handles at most {_FILE_BACKGROUND - 1}")
  return names


def network_labels(it: Interaction, log: Log = silent) -> np.ndarray:
  """The network's own segmentation of the image on the image's grid, by ``scribblejax predict``'s
  pipeline (with the new classes' head, whose first segmentation is the network's own)."""
  network = load_network(it.model, log)
  if it.new_classes:
    try:
      network = network._replace(
        model=add_classes(network.model, len(it.new_classes)), spec=network.spec._replace(num_classes=it.num_classes)
      )
    except ValueError as err:
      raise ValueError(f"a new class cannot extend this model's head: {err}") from None
  _, split, fitted, _ = prepare(network, it.image, network.info, 1, it.inference)
  logits = network_logits(split, fitted, step=it.inference.step)
  return labels_from_logits(logits, fitted).astype(np.int32)


def reload(it: Interaction) -> Interaction:
  """The interaction with the session folder's state: its latest round's segmentation and drawn marks."""
  doc = session_store.load_session(it.session)
  initial = session_store.load_initial(it.session)
  if initial is None:
    initial = it.initial
  if doc is None or not doc["rounds"]:
    blank = np.full(it.image.spatial_shape, -1, np.int32)
    return it._replace(
      labels=np.asarray(initial, np.int32),
      initial=np.asarray(initial, np.int32),
      drawn=blank,
      rounds=0,
      network=None,
      taken=None,
      merged=None,
      reasons=None,
    )
  arrays = session_store.round_arrays(it.session, doc["rounds"][-1])
  network = arrays.get("network_labels") if session_store.choices(arrays) else None
  taken = session_store.taken_of(arrays) if network is not None else None
  reasons = session_store.reasons_of(arrays) if taken == "merged" else None
  return it._replace(
    labels=np.asarray(arrays["labels"], np.int32),
    initial=np.asarray(initial, np.int32),
    drawn=np.asarray(session_store.drawn_marks(arrays), np.int32),
    rounds=len(doc["rounds"]),
    network=None if network is None else np.asarray(network, np.int32),
    taken=taken,
    merged=None if network is None else np.asarray(arrays["merged_labels"], np.int32),
    reasons=reasons,  # uint8 (session_store.reasons_of), or None
  )


# ----------------------------------------------------------------------------------------------
# Why the latest round's merge gave each pixel its label.

# the "why" layer's colour for each reason of merge.REASONS: a pixel the round changed, by why, and every marked
# pixel ("mark"); "kept" (the round changed nothing there) shows as nothing
WHY_COLOURS = {"kept": "transparent", "mark": "white", "new_marks": "lime", "sure": "orange", "image": "magenta"}


def why_values(it: Interaction) -> np.ndarray | None:
  """The ``why`` layer's values: at each pixel the code of :data:`scribblejax.refinement.merge.REASONS` that
  gave the latest round's merge its label there: ``mark`` at every marked pixel of every round so far (changed
  or not), the reason the round changed the pixel elsewhere, and 0 (``kept``) where it changed nothing;
  ``None`` when the round does not show its merge whole (no round, no merge, a take) or was stored before the
  reasons were kept."""
  return None if it.reasons is None else np.asarray(it.reasons, np.int32)


def why_legend() -> str:
  """What the ``why`` layer's colours mean, in one line."""
  words = {
    "mark": "marked",
    "new_marks": "at a new mark",
    "sure": "refined network sure",
    "image": "like the new class",
  }
  return ", ".join(f"{WHY_COLOURS[reason]}: {words[reason]}" for reason in REASONS[1:])


# ----------------------------------------------------------------------------------------------
# The scribble layer.


def scribble_values(it: Interaction) -> np.ndarray:
  """The scribble layer for the session's drawn marks: ``0`` unmarked, ``k + 1`` class ``k``."""
  return values_of(it.drawn)


def values_of(marks: np.ndarray) -> np.ndarray:
  """A mark map (``-1`` unmarked, ``k`` class ``k``) as scribble layer values."""
  return (np.asarray(marks, np.int32) + 1).astype(np.int32)


def marks_of(values: Any, class_names: Sequence[str]) -> np.ndarray:
  """Scribble layer values as a mark map (``-1`` unmarked).

  Raises:
    ValueError: naming a value that is no class (and what the values mean).
  """
  values = np.asarray(values)
  if values.dtype.kind not in "iub":
    raise ValueError(f"the scribble layer must hold integers, got {values.dtype}")
  values = values.astype(np.int64)
  bad = (values < 0) | (values > len(class_names))
  if bad.any():
    value = int(values[bad].flat[0])
    raise ValueError(
      f"the scribble layer holds value {value} at {int(bad.sum())} pixel(s), which is no class: {legend(class_names)}"
    )
  return (values - 1).astype(np.int32)


def legend(class_names: Sequence[str]) -> str:
  """The scribble values in words: ``0 = unmarked, 1 = background, 2 = nucleus``."""
  return ", ".join([f"{UNMARKED_VALUE} = unmarked"] + [f"{k + 1} = {n}" for k, n in enumerate(class_names)])


def pending_marks(marks: np.ndarray, drawn: np.ndarray) -> tuple[np.ndarray, int]:
  """The marks not yet in the session (new pixels, or a class changed), and how many drawn pixels were
  erased (marks accumulate over a session's rounds: an erased mark stays; Undo drops a round)."""
  new = np.where((marks >= 0) & (marks != drawn), marks, -1).astype(np.int32)
  return new, int(((drawn >= 0) & (marks < 0)).sum())


# ----------------------------------------------------------------------------------------------
# Rounds.


class Cancelled(Exception):
  """Raised by a progress callback to stop a round; the session stays as it was."""


def refine_round(
  it: Interaction,
  values: Any,
  settings: RefineSettings = RefineSettings(),
  *,
  progress: Progress = None,
  patch_progress: Progress = None,
  log: Log = silent,
) -> tuple[Interaction, dict]:
  """One ``scribblejax refine --session`` round on the scribble layer's values.

  Args:
    it: the interaction.
    values: the scribble layer (``0`` unmarked, ``k + 1`` class ``k``), the image's spatial shape.
    settings: the round's knobs, as the CLI's (``--layers``, ``--steps``, ``--region-growing`` ...).
    progress: ``progress(steps, max_steps)`` during the loop; it may raise :class:`Cancelled`.
    patch_progress: ``patch_progress(done, total)`` after each patch of a sliding-window segmentation.
    log: progress messages.

  Returns:
    The interaction after the round, and the CLI's report (``steps``, ``satisfied``, ``marks_honoured``,
    ``seconds`` ...; ``erased_marks`` added: drawn pixels erased, which the session keeps).

  Raises:
    ValueError: no new marks, a value that is no class, or the CLI's own refusals. The session is then
      as it was.
  """
  values = np.asarray(values)
  if values.shape != it.image.spatial_shape:
    raise ValueError(f"the scribble layer has shape {values.shape}, the image {it.image.spatial_shape}")
  new, erased = pending_marks(marks_of(values, it.class_names), it.drawn)
  if not (new >= 0).any():
    raise ValueError("no new marks: paint a class into the scribble layer first")
  work = it.session / WORK_FOLDER
  work.mkdir(parents=True, exist_ok=True)
  marks_path, out = _round_paths(work, _label_suffix(it.image))
  file_values = np.where(new < 0, 0, np.where(new == 0, _FILE_BACKGROUND, new))
  write_label_map(marks_path, file_values, it.image.geometry)
  settings = dataclasses.replace(settings, new_classes=it.new_classes)
  report = run_refine(
    model=it.model,
    image=it.image.path,
    marks=[str(marks_path)],
    out=str(out),
    session=str(it.session),
    settings=settings,
    overlay=False,
    log=log,
    progress=progress,
    inference=it.inference,
    patch_progress=patch_progress,
  )
  report["erased_marks"] = erased
  return reload(it), report


def _label_suffix(img: Image) -> str:
  """The suffix of a label map in the image's format family (DICOM -> NIfTI, JPEG -> PNG)."""
  return SUFFIXES[OUTPUTS[img.family][0]][0]


def _round_paths(work: Path, suffix: str) -> tuple[Path, Path]:
  """Unused marks and segmentation paths in the work folder."""
  number = 1
  while (work / f"marks-{number:03d}{suffix}").exists() or (work / f"segmentation-{number:03d}{suffix}").exists():
    number += 1
  return work / f"marks-{number:03d}{suffix}", work / f"segmentation-{number:03d}{suffix}"


def warm_up(it: Interaction, settings: RefineSettings = RefineSettings()) -> float:
  """Compiles a round's programs before the first Refine: a throwaway one-step round, without a
  session, in a temporary folder (the session is untouched).

  One pixel is marked with the network's own class, where the image is brightest (inside a model's
  crop). ``max_steps`` is traced, so the first real round with the same settings reuses the compiled
  loop; with patches, only when its marks round up to the same counts (one patch, 64 voxels).

  Returns:
    The seconds it took.
  """
  start = time.perf_counter()
  brightest = np.unravel_index(int(np.argmax(it.image.array.max(axis=-1))), it.image.spatial_shape)
  label = int(it.labels[brightest])
  values = np.zeros(it.image.spatial_shape, np.uint8)
  values[brightest] = _FILE_BACKGROUND if label == 0 else label
  suffix = _label_suffix(it.image)
  with tempfile.TemporaryDirectory(prefix="scribblejax-warm-up-") as folder:
    marks = Path(folder) / f"marks{suffix}"
    write_label_map(marks, values, it.image.geometry)
    run_refine(
      model=it.model,
      image=it.image.path,
      marks=[str(marks)],
      out=str(Path(folder) / f"seg{suffix}"),
      settings=dataclasses.replace(settings, max_steps=1, new_classes=it.new_classes, continue_weights=False),
      overlay=False,
      inference=it.inference,
    )
  return time.perf_counter() - start


def undo_round(it: Interaction, log: Log = silent) -> Interaction:
  """Drops the session's latest round (``scribblejax refine --session DIR --undo``).

  Raises:
    ValueError: the session has no rounds.
  """
  if it.rounds == 0:
    raise ValueError("nothing to undo: no round yet")
  run_refine(
    model=None,
    image=None,
    marks=[],
    out=None,
    session=str(it.session),
    undo=True,
    overlay=False,
    log=log,
    inference=it.inference,
  )
  return reload(it)


def take(it: Interaction, which: str, log: Log = silent, *, where: np.ndarray | None = None) -> Interaction:
  """Shows the latest round's refined network's own labels (``"network"``) or its merge (``"merged"``),
  whole or in the regions of difference ``where`` points at, and starts the next round from them
  (``scribblejax refine --session DIR --take network [--where FILE]``).

  Args:
    it: the interaction.
    which: ``"network"`` or ``"merged"``.
    log: progress messages.
    where: ``bool[*spatial]`` on the image's grid (:func:`points_mask`), or ``None``: the whole segmentation.

  Raises:
    ValueError: no round, ``"merged"`` after a round refined without the merge, a round stored before
      both were kept, or ``where`` touching no region where the two differ.
  """
  if it.rounds == 0:
    raise ValueError("nothing to take: no round yet")
  doc = session_store.load_session(it.session)
  if doc is None:
    raise ValueError(f"session {it.session} is gone")
  session_store.take(it.session, doc, which, where)
  what = taken_words(which, where is not None)
  log(f"round {it.rounds} of session {it.session} now takes {what}")
  return reload(it)


def other_of(taken: str | None) -> str:
  """What a take gives a round that shows ``taken`` (:attr:`Interaction.taken`): the merge when the refined
  network's own labels are shown whole, else the refined network's own labels."""
  return "merged" if taken == "network" else "network"


def largest_differences(it: Interaction, limit: int = 3) -> tuple[Difference, ...]:
  """The ``limit`` largest regions where the segmentation shown and the other of the latest round's two
  (:func:`other_of`) differ, each with a point inside it (:func:`scribblejax.refinement.merge.differences`):
  the regions worth a look before taking the other at points.

  Raises:
    ValueError: the latest round offers no choice (no round, or one refined without the merge).
  """
  if it.network is None or it.merged is None:
    raise ValueError("the latest round offers no choice: no round, one without the merge, or an older one")
  return differences(it.labels, it.network if other_of(it.taken) == "network" else it.merged, limit)


def describe_differences(found: Sequence[Difference], class_names: Sequence[str], which: str = "network") -> str:
  """The regions of :func:`largest_differences` in words: the size, the point (the image's index) and the
  change of class of each; ``which``: what they differ from (:func:`other_of`)."""
  if not found:
    return f"the segmentation shown and {taken_words(which)} are the same"
  parts = [
    f"{d.size} px at ({', '.join(str(i) for i in d.point)}), {class_names[d.shown]} -> {class_names[d.other]}"
    for d in found
  ]
  where = f"the {len(found)} largest region(s) where the segmentation and {taken_words(which)} differ"
  return f"{where}: " + "; ".join(parts)


def points_mask(points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """``bool[*shape]``: the pixels nearest ``points`` (``float[n, len(shape)]``, in the image's index
  coordinates, as a napari Points layer on the image's grid holds them).

  Raises:
    ValueError: no point, points of another dimension, or a point outside the image.
  """
  points = np.asarray(points, float)
  if not points.size:
    raise ValueError("no point: put one in each region to take")
  if points.ndim != 2 or points.shape[1] != len(shape):
    raise ValueError(f"points of shape {points.shape} on a {len(shape)}-D image: each needs {len(shape)} coordinates")
  index = np.round(points).astype(int)
  outside = (index < 0) | (index >= np.asarray(shape))
  if outside.any():
    raise ValueError(f"point {points[outside.any(axis=1)][0].round(1).tolist()} lies outside the image {shape}")
  mask = np.zeros(shape, bool)
  mask[tuple(index.T)] = True
  return mask


def reset(it: Interaction, log: Log = silent) -> Interaction:
  """Undoes every round: the network's own segmentation, no marks."""
  while it.rounds:
    it = undo_round(it, log)
  return it


# ----------------------------------------------------------------------------------------------
# Saving.


def save_segmentation(it: Interaction, path: str) -> str:
  """Writes the current segmentation in the image's format family and geometry; returns the family.

  Raises:
    ValueError: the path is the image, or its suffix is not a format the image's family may be written as.
  """
  check_outputs([path], [it.image.path])
  return write_label_map(path, it.labels, it.image.geometry)


def default_output(it: Interaction) -> str:
  """A segmentation path beside the image, in its format family: ``cells.png`` -> ``cells.seg.png``."""
  path = Path(it.image.path)
  stem = path.name[: len(path.name) - len(suffix_of(path))] if path.is_file() else path.name
  return str(path.with_name(f"{stem}.seg{_label_suffix(it.image)}"))


def save_session(it: Interaction, folder: str) -> Interaction:
  """Copies the session folder to ``folder`` (new or empty) and goes on there.

  Raises:
    ValueError: ``folder`` is a file, or a folder that is not empty.
  """
  dest = Path(folder)
  if dest.exists() and dest.resolve() == it.session.resolve():
    return it
  if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
    raise ValueError(f"save the session into a new or empty folder; {folder} is not one")
  if it.session.exists():
    shutil.copytree(it.session, dest, dirs_exist_ok=True)
  else:  # a named session folder before its first round
    dest.mkdir(parents=True, exist_ok=True)
  return it._replace(session=dest)


def summary(report: dict) -> str:
  """A round's report in one line, as ``scribblejax refine`` prints it."""
  state = (
    "every mark honoured"
    if report["satisfied"] and report["marks_honoured"] == 1.0
    else (f"{report['marks_honoured']:.1%} of marks honoured")
  )
  changed = changed_line(report.get("changed_this_round"))
  why = f"; {changed}" if changed else ""
  return (
    f"round {report['round']}: {report['steps']} steps (of {report['max_steps']}), {state}, "
    f"satisfied={report['satisfied']}, {report['seconds']:.2f}s ({report['compile_seconds']:.2f}s "
    f"compiling) on {report['device']}{why}"
  )
