"""A session folder on disk: the marks and state of earlier refinement rounds, so that a user can
refine again with new marks, or undo.

Layout::

    DIR/session.json     {"format": "scribblejax-session", "version": 1, "image": ..., "image_digest": ...,
                          "model": ..., "spatial_shape": [...], "rounds": [{"file": "round-001.npz", ...}]}
    DIR/round-001.npz    marks (int32, all marks so far, in the image's index space, -1 unmarked),
                         new_marks (this round's marks), drawn (the marks so far that the user
                         drew, without region growing's), labels (int32: the round's segmentation,
                         the one a next round starts from), merged_labels and network_labels (int32:
                         the round's merge and the refined network's own labels, the two a user may
                         take as its segmentation; no merged_labels after a round without the merge,
                         neither in rounds stored before they were kept),
                         taken ("merged" or "network": which of the two labels is),
                         reasons (uint8, after a round with the merge: why each pixel of its merge has
                         its label, an index into scribblejax.refinement.merge.REASONS; not in rounds
                         stored before they were kept),
                         tunable_0 ... tunable_N (the refined weights W_lam, leaves in pytree order)
    DIR/initial.npz      labels: the network's own segmentation (what an undo of every round shows);
                         unsure, sure (bool): where the network was unsure and sure, for the merge

Every write is atomic (temporary file, then rename); ``session.json`` is written last, so a round
that failed half-way leaves the session as it was.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from scribblejax.io import fileio
from scribblejax.refinement.merge import REASONS, take_where

FORMAT = "scribblejax-session"
VERSION = 1
TAKES = ("merged", "network")  # what a round's segmentation may be: its merge, or the refined network's own


def _write_atomic(path: Path, write) -> None:
  """Calls ``write(file)`` on a temporary sibling opened for binary writing, then renames it."""
  with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
    write(f)


def load_session(directory: str | os.PathLike) -> dict | None:
  """The session document, or ``None`` when the folder does not exist or holds no session yet.

  Raises:
    ValueError: the folder holds a ``session.json`` that is not a scribblejax session, or the path is
      a file.
  """
  d = Path(directory)
  if not d.exists():
    return None
  if not d.is_dir():
    raise ValueError(f"session {directory} is not a folder")
  path = d / "session.json"
  if not path.exists():
    # a first round interrupted before its session.json leaves only the session's own files: no session yet
    if any(
      not _ROUND_FILE.fullmatch(p.name) and p.name != "initial.npz" and not p.name.startswith(".") for p in d.iterdir()
    ):
      raise ValueError(f"session folder {directory} is not empty and holds no session.json")
    return None
  try:
    doc = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as err:
    raise ValueError(f"cannot read {path}: {err}") from err
  if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
    raise ValueError(f"{path} is not a {FORMAT} v{VERSION} file")
  missing = [k for k in ("image", "image_digest", "model", "rounds") if k not in doc]
  rounds = doc.get("rounds")
  if missing or not isinstance(rounds, list) or not all(_good_record(r, i) for i, r in enumerate(rounds)):
    raise ValueError(
      f"{path} is damaged: "
      + (
        f"it lacks {missing}"
        if missing
        else "its rounds are not a list of records naming their files (round-NNN.npz in the session folder) and numbers"
      )
    )
  wrong = [k for k in ("image", "image_digest", "model") if not isinstance(doc[k], str)]
  if wrong:
    raise ValueError(f"{path} is damaged: {', '.join(wrong)} must be text")
  added = doc.get("new_classes", [])
  if not isinstance(added, list) or not all(isinstance(name, str) for name in added):
    raise ValueError(f"{path} is damaged: new_classes must be a list of class names")
  if not isinstance(doc.get("pipeline", {}), dict):
    raise ValueError(f"{path} is damaged: pipeline must be an object of options")
  return doc


_ROUND_FILE = re.compile(r"round-\d{3,}\.npz")


def _good_record(record: Any, index: int) -> bool:
  """A round record names a round file of the session folder (never a path out of it) and its number."""
  return (
    isinstance(record, dict)
    and isinstance(record.get("file"), str)
    and _ROUND_FILE.fullmatch(record["file"]) is not None
    and record.get("round") == index + 1
  )


def new_session(image: str, image_digest: str, model: str, spatial_shape: tuple[int, ...]) -> dict:
  """A session document with no rounds."""
  return {
    "format": FORMAT,
    "version": VERSION,
    "image": image,
    "image_digest": image_digest,
    "model": model,
    "spatial_shape": list(spatial_shape),
    "rounds": [],
  }


def save_session(directory: str | os.PathLike, doc: dict) -> None:
  """Writes ``session.json`` atomically (creating the folder)."""
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  text = json.dumps(doc, indent=2).encode()
  _write_atomic(d / "session.json", lambda f: f.write(text))


def round_arrays(directory: str | os.PathLike, record: dict) -> dict[str, np.ndarray]:
  """The arrays of one round (``marks``, ``new_marks``, ``labels``, ``tunable_*``)."""
  path = Path(directory) / record["file"]
  try:
    with np.load(path) as data:
      arrays = {k: data[k] for k in data.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
    raise ValueError(f"cannot read session round {path}: {err}") from err
  missing = [k for k in ("marks", "labels") if k not in arrays]
  if missing:
    raise ValueError(f"session round {path} is damaged: it lacks {', '.join(missing)}")
  return arrays


def tunable_leaves(arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
  """The stored W_lam leaves of a round, in pytree order."""
  count = len([k for k in arrays if k.startswith("tunable_")])
  return [arrays[f"tunable_{i}"] for i in range(count)]


def drawn_marks(arrays: dict[str, np.ndarray]) -> np.ndarray:
  """The marks so far that the user drew (a round stored before ``drawn`` was kept: all its marks)."""
  return arrays["drawn"] if "drawn" in arrays else arrays["marks"]


def append_round(
  directory: str | os.PathLike,
  doc: dict,
  record: dict,
  *,
  marks: np.ndarray,
  new_marks: np.ndarray,
  labels: np.ndarray,
  tunable: list[Any],
  drawn: np.ndarray | None = None,
  network_labels: np.ndarray | None = None,
  taken: str = "merged",
  reasons: np.ndarray | None = None,
) -> dict:
  """Stores a new round; returns the updated document (already saved).

  Args:
    directory, doc: the session folder and its document.
    record: the round's entry in ``session.json`` (``file`` and ``round`` are added).
    marks, new_marks: every mark so far, and this round's.
    labels: the round's segmentation (with the merge, the merged labels).
    tunable: the refined weights' leaves.
    drawn: the marks so far without region growing's (default: ``marks``).
    network_labels: the refined network's own labels (``None``: not kept; :func:`take` then refuses).
    taken: what ``labels`` is: ``"merged"`` (a round with the merge; ``labels`` is kept as
      ``merged_labels`` too) or ``"network"`` (a round without it, whose labels are the network's).
    reasons: with the merge, why each pixel of the merge has its label (``uint8``, an index into
      :data:`scribblejax.refinement.merge.REASONS`; ``None``: not kept).

  Raises:
    ValueError: ``taken`` is neither name, or ``reasons`` is no map of codes of the labels' shape (nothing
      is written).
  """
  _check_taken(taken)
  reasons = None if reasons is None else _reasons(reasons, np.shape(labels))
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  index = len(doc["rounds"]) + 1
  # a file name no saved round uses and no file holds (an undone round's file stays until this round
  # is saved, so an interruption leaves the session as it was)
  used = {r["file"] for r in doc["rounds"]}
  number = index
  while f"round-{number:03d}.npz" in used or (d / f"round-{number:03d}.npz").exists():
    number += 1
  name = f"round-{number:03d}.npz"
  arrays = {
    "marks": np.asarray(marks, np.int32),
    "new_marks": np.asarray(new_marks, np.int32),
    "drawn": np.asarray(marks if drawn is None else drawn, np.int32),
    "labels": np.asarray(labels, np.int32),
  }
  if network_labels is not None:
    arrays.update(network_labels=np.asarray(network_labels, np.int32), taken=np.array(taken))
    if taken == "merged":  # a round without the merge has one segmentation: the refined network's
      arrays["merged_labels"] = arrays["labels"]
  if reasons is not None:
    arrays["reasons"] = reasons
  arrays.update({f"tunable_{i}": np.asarray(leaf) for i, leaf in enumerate(tunable)})
  _write_atomic(d / name, lambda f: np.savez_compressed(f, **arrays))
  doc = dict(doc, rounds=doc["rounds"] + [dict(record, file=name, round=index)])
  save_session(d, doc)
  return doc


def _reasons(reasons: Any, shape: tuple[int, ...]) -> np.ndarray:
  """``reasons`` as stored: ``uint8`` codes of :data:`scribblejax.refinement.merge.REASONS`, of the labels' shape."""
  reasons = np.asarray(reasons)
  if reasons.shape != shape or not np.issubdtype(reasons.dtype, np.integer):
    raise ValueError(
      f"a round's reasons are an integer map of its labels' shape {shape}, got {reasons.dtype}{list(reasons.shape)}"
    )
  if reasons.size and not 0 <= reasons.min() <= reasons.max() < len(REASONS):
    raise ValueError(
      f"a round's reasons are codes 0 to {len(REASONS) - 1} (merge.REASONS), got {reasons.min()} to {reasons.max()}"
    )
  return reasons.astype(np.uint8)


def reasons_of(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
  """Why each pixel of a round's merge has its label (codes of :data:`scribblejax.refinement.merge.REASONS`);
  ``None`` after a round without the merge, or one stored before they were kept.

  Raises:
    ValueError: the stored map is damaged (not codes of the round's labels' shape).
  """
  if "reasons" not in arrays:
    return None
  try:
    return _reasons(arrays["reasons"], np.shape(arrays["labels"]))
  except ValueError as err:
    raise ValueError(f"a session round's stored reasons are damaged: {err}") from None


def _check_taken(which: str) -> None:
  """Refuses a name that is none of :data:`TAKES`."""
  if which not in TAKES:
    raise ValueError(f"a round's segmentation is one of {', '.join(TAKES)}, got {which!r}")


def taken_of(arrays: dict[str, np.ndarray]) -> str | None:
  """Which segmentation a round's ``labels`` is (``"merged"``, ``"network"``, or ``"mixed"``: the merge with
  the refined network's own labels in some regions); ``None`` for a round stored before a round kept the
  refined network's own labels."""
  return str(arrays["taken"]) if "taken" in arrays else None


def shown_name(arrays: dict[str, np.ndarray], labels: np.ndarray) -> str:
  """What ``labels`` would be as a round's segmentation: ``"merged"`` or ``"network"`` when it is one of
  the round's two whole, else ``"mixed"``."""
  same = [which for which in TAKES if f"{which}_labels" in arrays and np.array_equal(arrays[f"{which}_labels"], labels)]
  return same[0] if same else "mixed"


def choices(arrays: dict[str, np.ndarray]) -> tuple[str, ...]:
  """The segmentations a round offers to :func:`take`: both after a round with the merge, none after a
  round without it (its segmentation is the refined network's own) or one stored before they were kept."""
  return TAKES if all(f"{which}_labels" in arrays for which in TAKES) else ()


def labels_to_take(
  directory: str | os.PathLike, doc: dict, which: str, where: np.ndarray | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The latest round's arrays and the labels :func:`take` would make its segmentation (nothing is written).

  Args:
    directory: the session folder.
    doc: its document.
    which: ``"merged"`` or ``"network"``.
    where: ``bool[*spatial]`` (``None``: everywhere): only the connected regions where the segmentation
      shown and ``which`` differ that these pixels touch take ``which``
      (:func:`scribblejax.refinement.merge.take_where`).

  Returns:
    ``(arrays, labels)``: the round's arrays as stored, and its ``which`` labels (with ``where``: the
    segmentation shown with ``which``'s labels in the regions pointed at).

  Raises:
    ValueError: no round, an unknown ``which``, a round refined without the merge (it has one
      segmentation), one stored before both were kept, a damaged round file, or ``where`` of another
      shape or touching no region where the two differ.
  """
  arrays, labels = _labels_of(directory, doc, which)
  if where is not None:
    if not choices(arrays):
      raise ValueError(
        f"round {doc['rounds'][-1]['round']} of session {directory} was refined without the merge: it has one "
        "segmentation, none to mix with"
      )
    labels = take_where(arrays["labels"], labels, where)
  return arrays, labels


def _labels_of(directory: str | os.PathLike, doc: dict, which: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """The latest round's arrays and its ``which`` labels (:func:`labels_to_take` without ``where``)."""
  _check_taken(which)
  if not doc["rounds"]:
    raise ValueError(f"nothing to take: session {directory} has no rounds")
  record = doc["rounds"][-1]
  arrays = round_arrays(directory, record)
  shown = taken_of(arrays)
  if shown is None:
    raise ValueError(
      f"round {record['round']} of session {directory} was stored by an older scribblejax, which kept only the "
      "segmentation it showed; refine a new round (or --undo and refine again) to choose between the two"
    )
  if shown == "network" and "merged_labels" not in arrays and "network_labels" in arrays:  # no merge
    if which == "merged":
      raise ValueError(
        f"round {record['round']} of session {directory} was refined without the merge (--no-progressive-merge): "
        "its segmentation is the refined network's own, and there is no merge to take"
      )
    return arrays, arrays["network_labels"]
  missing = [f"{w}_labels" for w in TAKES if f"{w}_labels" not in arrays]
  if missing:
    raise ValueError(f"session round {Path(directory) / record['file']} is damaged: it lacks {', '.join(missing)}")
  return arrays, arrays[f"{which}_labels"]


def take(directory: str | os.PathLike, doc: dict, which: str, where: np.ndarray | None = None) -> np.ndarray:
  """Makes the latest round's segmentation its merged labels or the refined network's own labels, whole or
  in the regions ``where`` points at.

  A round with the merge keeps both; the one taken becomes ``labels``, which the next round starts from,
  an undo of a later round comes back to, and the command line and the viewer show. With ``where`` the
  segmentation becomes a mix of the two (``taken`` is then ``"mixed"``, unless the mix is one of them
  whole). The round's file is rewritten atomically and only ``labels`` and ``taken`` change, so taking
  the other one back restores the file's arrays exactly.

  Args:
    directory: the session folder.
    doc: its document.
    which: ``"merged"`` or ``"network"``.
    where: as :func:`labels_to_take`'s.

  Returns:
    The labels now taken.

  Raises:
    ValueError: as :func:`labels_to_take`.
  """
  arrays, labels = labels_to_take(directory, doc, which, where)
  store_take(directory, doc, arrays, labels, which if where is None else shown_name(arrays, labels))
  return labels


def store_take(directory: str | os.PathLike, doc: dict, arrays: dict[str, np.ndarray], labels: Any, shown: str) -> None:
  """Writes the latest round's file with ``labels`` as its segmentation, named ``shown``: :func:`take`'s
  write, for a caller that already holds the round's ``arrays`` and the ``labels`` :func:`labels_to_take`
  gave for them (read once, written once, atomically). ``shown`` must name ``labels`` as :func:`take`
  does (``which`` for a whole take, else :func:`shown_name`), or taking the other back no longer
  restores the file exactly.

  Raises:
    ValueError: ``shown`` is none of ``"merged"``, ``"network"``, ``"mixed"``, or ``labels`` has another
      shape than the round's.
  """
  if shown not in (*TAKES, "mixed"):
    raise ValueError(f"a round shows one of {', '.join(TAKES)}, mixed, got {shown!r}")
  if np.shape(labels) != arrays["labels"].shape:
    raise ValueError(f"labels of shape {np.shape(labels)} for a round of shape {arrays['labels'].shape}")
  new = dict(arrays, labels=np.asarray(labels, np.int32), taken=np.array(shown))
  _write_atomic(Path(directory) / doc["rounds"][-1]["file"], lambda f: np.savez_compressed(f, **new))


def without_last_round(doc: dict, directory: str | os.PathLike = "") -> tuple[dict, dict]:
  """The document with its latest round dropped (nothing is written), and that round's record.

  Raises:
    ValueError: the session has no rounds.
  """
  if not doc["rounds"]:
    raise ValueError(f"nothing to undo: session {directory} has no rounds")
  return dict(doc, rounds=doc["rounds"][:-1]), doc["rounds"][-1]


def remove_round_file(directory: str | os.PathLike, doc: dict, record: dict) -> None:
  """Deletes an undone round's file unless ``doc`` (already saved) still uses that name."""
  if any(r["file"] == record["file"] for r in doc["rounds"]):
    return
  stale = Path(directory) / record["file"]
  if stale.exists():
    stale.unlink()


def save_initial(
  directory: str | os.PathLike, labels: np.ndarray, unsure: np.ndarray | None = None, sure: np.ndarray | None = None
) -> None:
  """Stores the network's own segmentation (``initial.npz``), shown before any round, and where the
  network was unsure and sure (``scribblejax.refinement.merge.unsure``, ``sure``), when known."""
  d = Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  arrays = {"labels": np.asarray(labels, np.int32)}
  if unsure is not None:
    arrays["unsure"] = np.asarray(unsure, bool)
  if sure is not None:
    arrays["sure"] = np.asarray(sure, bool)
  _write_atomic(d / "initial.npz", lambda f: np.savez_compressed(f, **arrays))


def _read_initial(directory: str | os.PathLike) -> dict[str, np.ndarray] | None:
  """The arrays of ``initial.npz``, or ``None`` when the session has none."""
  path = Path(directory) / "initial.npz"
  if not path.exists():
    return None
  try:
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
    raise ValueError(f"cannot read {path}: {err}") from err


def load_unsure(directory: str | os.PathLike) -> np.ndarray | None:
  """Where the network was unsure, as stored beside its segmentation; ``None`` if not stored."""
  arrays = _read_initial(directory)
  return None if arrays is None else arrays.get("unsure")


def load_sure(directory: str | os.PathLike) -> np.ndarray | None:
  """Where the network was sure (the merge's protected pixels), as stored beside its segmentation;
  ``None`` if not stored (a session started before they were)."""
  arrays = _read_initial(directory)
  return None if arrays is None else arrays.get("sure")


def load_initial(directory: str | os.PathLike) -> np.ndarray | None:
  """The stored network segmentation, or ``None``."""
  arrays = _read_initial(directory)
  if arrays is None:
    return None
  if "labels" not in arrays:
    raise ValueError(f"cannot read {Path(directory) / 'initial.npz'}: 'labels is not a file in the archive'")
  return arrays["labels"]
