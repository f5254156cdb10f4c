"""Read the files users draw marks in, as mark maps in an image's index space.

Three kinds of file (:func:`read_marks_file` picks by name and content):

* **a label map** (any format :func:`scribblejax.io.read_image` reads) in the image's geometry. By
  default value ``0`` means unmarked, ``k >= 1`` marks class ``k`` and ``255`` marks class ``0``
  (background); ``unmarked_value`` and ``background_value`` change that (e.g. ``-1`` and ``0`` for a
  map that stores class indices directly, unmarked as ``-1``).
* **LabelMe JSON** (``.json``), for 2-D PNG, JPEG and TIFF images: shapes ``point``, ``points``,
  ``line``, ``linestrip``, ``circle``, ``rectangle``, ``polygon`` and ``mask``. Coordinates are
  LabelMe's ``(x, y)``: x the column, y the row, pixel ``(r, c)`` covering ``[c, c+1) x [r, r+1)``.
  Points, lines and circles mark the pixels they fall in (thickened by ``radius``); polygons mark the
  pixels whose centres lie inside. A rectangle is a bounding box by default
  (:class:`scribblejax.Box`: its core marked as the label, a ring just outside as class 0), or
  filled with ``rectangle="fill"``; a rectangle of class 0 is always filled. Label names become class
  indices through ``class_names`` (exact match first, then case-insensitive); a name that is not a
  class is an error. Without class names, labels must be class indices ("0", "1", ...).
* **a 3D Slicer segmentation** (``.seg.nrrd``): each segment (``SegmentN_Name``,
  ``SegmentN_LabelValue``, ``SegmentN_Layer``) marks the voxels of its layer holding its label value.
  A segment whose name is a class gets that class, otherwise its label value is the class index.
  Slicer crops the stored volume to the segments' extent; its ``space origin`` (world coordinates)
  places it in the image, and ``Segmentation_ReferenceImageExtentOffset`` does where the image has no
  world frame.

Medical marks files (NIfTI, NRRD) are placed in the image's voxel grid through the two affines:
any axis permutation, flip or whole-voxel shift is undone exactly; a different spacing, rotation or
a fraction-of-a-voxel shift is a geometry mismatch (``ValueError`` stating both geometries). Between a
medical file and a raster image (or the reverse) the axes are reversed (ITK-style tools store
``(x, y[, z])`` while raster arrays are ``(y, x)`` / ``(z, y, x)``) and the shapes must then agree.

Several files accumulate in order: a later file's marks override earlier ones where both mark.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scribblejax import marks as marks_lib
from scribblejax.io.images import MEDICAL, Geometry, nrrd_geometry, read_image, spacing_of

UNMARKED = marks_lib.UNMARKED
RECTANGLE_MODES = ("box", "fill")


# ----------------------------------------------------------------------------------------------
# Class names.


def class_index(name: Any, class_names: Sequence[str] | None, num_classes: int | None, what: str) -> int:
  """The class index of a label name.

  Args:
    name: a class name, or a class index written as text ("2") when it names no class.
    class_names: the classes in index order, or ``None``.
    num_classes: the number of classes, to check an index (``None``: unchecked).
    what: what the name belongs to, for the error message (e.g. the file and shape).

  Raises:
    ValueError: the name is not a class (the message lists the classes).
  """
  text = str(name).strip()
  names = [str(n) for n in class_names] if class_names else []
  if text in names:
    return names.index(text)
  folded = [n for n in names if n.lower() == text.lower()]
  if len(folded) == 1:
    return names.index(folded[0])
  if re.fullmatch(r"\d+", text):
    index = int(text)
    if num_classes is None or index < num_classes:
      return index
  known = f"classes: {', '.join(names)}" if names else "no class names are known; pass --classes"
  raise ValueError(f"{what}: label {text!r} is not a class ({known})")


# ----------------------------------------------------------------------------------------------
# Placing marks in the image's index space.


def _place(marks: np.ndarray, matrix: np.ndarray, shift: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
  """Maps every marked index ``s`` of ``marks`` to ``matrix @ s + shift`` in a new map of ``shape``."""
  out = np.full(shape, UNMARKED, np.int32)
  src = np.argwhere(marks >= 0)
  if src.size == 0:
    return out
  dst = src @ matrix.T + shift
  inside = np.all((dst >= 0) & (dst < np.array(shape)), axis=1)
  if not inside.all():
    raise ValueError(
      f"{what}: {int((~inside).sum())} of its {len(src)} marked pixels fall outside the image of shape {shape}"
    )
  out[tuple(dst.T)] = marks[tuple(src.T)]
  return out


def _grid_map(source: Geometry, target: Geometry, what: str) -> tuple[np.ndarray, np.ndarray]:
  """The integer map ``s -> M s + t`` from the source's voxel indices to the target's."""
  transform = np.linalg.solve(target.affine, source.affine)
  linear, shift = transform[:3, :3], transform[:3, 3]
  rounded = np.round(linear)
  permutation = (np.abs(rounded).sum(axis=0) == 1).all() and (np.abs(rounded).sum(axis=1) == 1).all()
  if not permutation or np.abs(linear - rounded).max() > 1e-3 or np.abs(shift - np.round(shift)).max() > 1e-2:
    raise ValueError(
      f"{what} does not lie on the image's voxel grid: marks have {source.describe()}; the image "
      f"has {target.describe()}"
    )
  return rounded.astype(np.int64), np.round(shift).astype(np.int64)


def _reverse_to(
  marks: np.ndarray,
  offset: np.ndarray,
  source_medical: bool,
  target: Geometry,
  what: str,
  source_shape: tuple[int, ...],
) -> np.ndarray:
  """Places marks whose axes run opposite to the image's (medical file <-> raster image)."""
  ndim = marks.ndim
  matrix = np.eye(ndim, dtype=np.int64)[::-1]
  shift = offset[::-1]
  shape = tuple(target.shape)
  if source_medical and len(shape) == 2 and ndim == 3:  # (x, y, 1) -> (y, x)
    if marks.shape[2] != 1 or offset[2] != 0:
      raise ValueError(f"{what} has shape {source_shape}, but the image has shape {shape}")
    return _reverse_to(marks[:, :, 0], offset[:2], source_medical, target, what, source_shape)
  if not source_medical and len(shape) == 3 and ndim == 2:  # (y, x) -> (x, y, 1)
    return _reverse_to(marks[None], np.concatenate([[0], offset]), source_medical, target, what, source_shape)
  if ndim != len(shape) or (not offset.any() and tuple(marks.shape[::-1]) != shape):
    raise ValueError(
      f"{what} has shape {source_shape} (axes {'x, y, z' if source_medical else 'z, y, x'}), "
      f"but the image has shape {shape}"
    )
  return _place(marks, matrix, shift, shape, what)


def align_to_grid(
  marks: Any, source: Geometry, target: Geometry, what: str, *, offset: Sequence[int] | None = None
) -> np.ndarray:
  """Puts a mark map read from a file with geometry ``source`` into the image's index space.

  Args:
    marks: ``int[*source.shape]``, ``-1`` unmarked.
    source: the marks file's geometry.
    target: the image's geometry.
    what: names the marks file in error messages.
    offset: index of the marks' first voxel in the image, for files that state it (Slicer's extent
      offset), used when the image has no world frame. ``None``: ``0``.

  Returns:
    ``int32[*target.shape]``.

  Raises:
    ValueError: the geometries do not match (the message states both), or marked pixels fall
      outside the image.
  """
  marks = np.asarray(marks, np.int32)
  shift = np.zeros(marks.ndim, np.int64) if offset is None else np.asarray(offset, np.int64)
  if source.affine is not None and target.affine is not None:
    if marks.shape == tuple(target.shape) and np.allclose(
      source.affine, target.affine, atol=1e-4 * min(min(target.spacing), 1.0), rtol=1e-5
    ):
      return marks.copy()
    matrix, shift = _grid_map(source, target, what)
    return _place(marks, matrix, shift, tuple(target.shape), what)
  source_medical = source.family in MEDICAL
  target_medical = target.family in MEDICAL
  if source_medical != target_medical:
    return _reverse_to(marks, shift, source_medical, target, what, marks.shape)
  if shift.any():
    return _place(marks, np.eye(marks.ndim, dtype=np.int64), shift, tuple(target.shape), what)
  if marks.shape != tuple(target.shape):
    raise ValueError(f"{what} has shape {marks.shape}, but the image has shape {tuple(target.shape)}")
  return marks.copy()


# ----------------------------------------------------------------------------------------------
# Label maps.


def values_to_marks(
  values: Any, *, num_classes: int | None, background_value: int = 255, unmarked_value: int = 0, what: str = "marks"
) -> np.ndarray:
  """Converts stored label values to a mark map: ``unmarked_value`` -> -1, ``background_value`` -> 0.

  Raises:
    ValueError: non-integer values, or a value that is neither unmarked, background nor a class index.
  """
  values = np.asarray(values)
  if background_value == unmarked_value:
    raise ValueError(f"the background value and the unmarked value are both {background_value}")
  if values.dtype.kind == "f":
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
      raise ValueError(f"{what} holds values that are not whole numbers; a label map holds integers")
    values = values.astype(np.int64)
  elif values.dtype.kind == "b":
    values = values.astype(np.int64)
  elif values.dtype.kind not in "iu":
    raise ValueError(f"{what} must hold integers, got dtype {values.dtype}")
  values = values.astype(np.int64)
  out = np.where(values == unmarked_value, UNMARKED, np.where(values == background_value, 0, values))
  marked = out != UNMARKED
  bad = marked & (out < 0)
  if num_classes is not None:
    bad |= marked & (out >= num_classes)
  if bad.any():
    value = int(values[bad].flat[0])
    classes = f"{num_classes} classes" if num_classes is not None else "class indices are >= 0"
    raise ValueError(
      f"{what} holds value {value}, which is not a class ({classes}; {unmarked_value} = unmarked, "
      f"{background_value} = background)"
    )
  return out.astype(np.int32)


def read_label_map_marks(
  path: str | os.PathLike,
  target: Geometry,
  *,
  num_classes: int | None,
  background_value: int = 255,
  unmarked_value: int = 0,
) -> np.ndarray:
  """Reads a label map file as marks in the image's index space (see the module docstring).

  Returns:
    ``int32[*target.shape]``, ``-1`` unmarked.

  Raises:
    ValueError: the file cannot be read, has several channels, holds values that are not classes, or
      lies on another grid than the image.
  """
  image = read_image(path, labels=True)
  what = f"marks file {path}"
  if image.array.shape[-1] != 1:
    raise ValueError(f"{what} has {image.array.shape[-1]} channels; a label map has one")
  marks = values_to_marks(
    image.array[..., 0],
    num_classes=num_classes,
    background_value=background_value,
    unmarked_value=unmarked_value,
    what=what,
  )
  return align_to_grid(marks, image.geometry, target, what)


# ----------------------------------------------------------------------------------------------
# LabelMe.


def _pixel(x: float, y: float, height: int, width: int) -> tuple[int, int]:
  """The pixel a LabelMe point falls in; a point on the far border belongs to the last pixel."""
  row, col = int(np.floor(y)), int(np.floor(x))
  if row == height and y <= height:
    row -= 1
  if col == width and x <= width:
    col -= 1
  return row, col


def _shape_marks(shape: dict, label: int, height: int, width: int, radius: float, rectangle: str, what: str) -> list:
  kind = shape.get("shape_type") or "polygon"
  try:
    points = np.asarray(shape.get("points") or [], np.float64).reshape(-1, 2)
  except (TypeError, ValueError):
    raise ValueError(f"{what}: points must be a list of [x, y] pairs") from None
  if not np.all(np.isfinite(points)):
    raise ValueError(f"{what}: points must be finite numbers")
  need = {"point": 1, "points": 1, "line": 2, "linestrip": 2, "circle": 2, "rectangle": 2, "polygon": 3, "mask": 2}
  if kind not in need:
    raise ValueError(f"{what}: shape_type {kind!r} is not supported (supported: {', '.join(sorted(need))})")
  if len(points) < need[kind]:
    raise ValueError(f"{what}: a {kind} needs at least {need[kind]} points, got {len(points)}")
  pixels = [_pixel(x, y, height, width) for x, y in points]
  if kind in ("point", "points"):
    return [marks_lib.Point(p, label, radius) for p in pixels]
  if kind in ("line", "linestrip"):
    return [marks_lib.Scribble(pixels, label, radius)]
  if kind == "circle":
    (x0, y0), (x1, y1) = points[:2]
    return [marks_lib.Point(pixels[0], label, float(np.hypot(x1 - x0, y1 - y0)))]
  if kind == "polygon":
    return [marks_lib.Polygon([(y - 0.5, x - 0.5) for x, y in points], label)]
  if kind == "mask":
    try:
      from PIL import Image as PILImage

      with PILImage.open(io.BytesIO(base64.b64decode(shape.get("mask") or ""))) as im:
        mask = np.array(im.convert("L")) > 0
    except Exception as err:  # bad base64 or image data
      raise ValueError(f"{what}: its mask is not a base64 PNG: {err}") from err
    top, left = pixels[0]
    labels = np.full((height, width), UNMARKED, np.int32)
    rows = slice(max(top, 0), max(min(top + mask.shape[0], height), 0))
    cols = slice(max(left, 0), max(min(left + mask.shape[1], width), 0))
    part = mask[rows.start - top : max(rows.stop - top, 0), cols.start - left : max(cols.stop - left, 0)]
    if not part.any():
      raise ValueError(
        f"{what}: its mask ({mask.shape[0]} x {mask.shape[1]} pixels from x={points[0][0]:g}, "
        f"y={points[0][1]:g}) marks no pixel of the {height} x {width} image"
      )
    labels[rows, cols][part] = label
    return [marks_lib.LabelMap(labels)]
  # rectangle: LabelMe corners (x0, y0), (x1, y1) in any order
  xs, ys = sorted(points[:2, 0]), sorted(points[:2, 1])
  lo = (int(np.floor(ys[0])), int(np.floor(xs[0])))
  hi = (max(int(np.ceil(ys[1])) - 1, lo[0]), max(int(np.ceil(xs[1])) - 1, lo[1]))
  if rectangle == "box" and label != 0:
    return [marks_lib.Box(lo, hi, label, background=0)]
  return [
    marks_lib.Polygon(
      [(lo[0] - 0.5, lo[1] - 0.5), (lo[0] - 0.5, hi[1] + 0.5), (hi[0] + 0.5, hi[1] + 0.5), (hi[0] + 0.5, lo[1] - 0.5)],
      label,
    )
  ]


def read_labelme(
  path: str | os.PathLike,
  target: Geometry,
  *,
  num_classes: int | None,
  class_names: Sequence[str] | None = None,
  radius: float = 1.0,
  rectangle: str = "box",
) -> np.ndarray:
  """Reads a LabelMe JSON file as marks on a 2-D image (see the module docstring).

  Args:
    path: the ``.json`` file.
    target: the image's geometry: 2-D (a PNG, JPEG or 2-D TIFF image).
    num_classes: number of classes (``None``: unchecked).
    class_names: class names in index order, to map label names.
    radius: thickness of points and lines, in pixels.
    rectangle: ``"box"`` (bounding box: core and background ring) or ``"fill"``.

  Returns:
    ``int32[*target.shape]``, ``-1`` unmarked.

  Raises:
    ValueError: unreadable JSON, a label that is not a class, an unsupported shape, an image size that
      differs from the image's, or a 3-D image.
  """
  if rectangle not in RECTANGLE_MODES:
    raise ValueError(f"rectangle must be one of {RECTANGLE_MODES}, got {rectangle!r}")
  try:
    doc = json.loads(Path(path).read_text())
  except FileNotFoundError:
    raise ValueError(f"cannot read {path}: no such file") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise ValueError(f"cannot read {path} as LabelMe JSON: {err}") from None
  if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
    raise ValueError(f"{path} is not a LabelMe file (no list of 'shapes')")
  shape = tuple(target.shape)
  if len(shape) != 2:
    raise ValueError(
      f"LabelMe marks {path} are 2-D, but the image has spatial shape {shape} (LabelMe files "
      "go with 2-D PNG, JPEG or TIFF images)"
    )
  height, width = shape
  drawn = (doc.get("imageHeight"), doc.get("imageWidth"))
  if None not in drawn and (int(drawn[0]), int(drawn[1])) != (height, width):
    raise ValueError(
      f"LabelMe marks {path} were drawn on an image of {drawn[0]} x {drawn[1]} pixels (height x "
      f"width), but the image is {height} x {width}"
    )
  marks: list = []
  shapes: list = []  # per shape: what to call it, and its marks
  for n, item in enumerate(doc["shapes"]):
    what = f"{path}: shapes[{n}]"
    if not isinstance(item, dict) or "label" not in item:
      raise ValueError(f"{what} has no label")
    label = class_index(item["label"], class_names, num_classes, what)
    shapes.append((what, item, _shape_marks(item, label, height, width, radius, rectangle, what)))
    marks += shapes[-1][2]
  if not marks:
    return np.full(shape, UNMARKED, np.int32)
  try:
    return marks_lib.encode_marks(shape, marks, num_classes=num_classes)
  except ValueError:
    # name the file's shape, in the file's coordinates, not the position in the list of marks
    for what, item, group in shapes:
      try:
        marks_lib.encode_marks(shape, group, num_classes=num_classes)
      except ValueError as err:
        kind = item.get("shape_type") or "polygon"
        described = f"{what} (a {kind} labelled {item['label']!r}, points [x, y] {np.asarray(item['points']).tolist()})"
        if " marks no pixel" not in str(err) and " lies entirely outside" not in str(err):
          raise ValueError(f"{described}: {err}") from None
        raise ValueError(
          f"{described} marks no pixel of the {height} x {width} image"
          + (" (no pixel centre lies inside it)" if kind == "polygon" else "")
        ) from None
    raise


# ----------------------------------------------------------------------------------------------
# 3D Slicer segmentations.


def _segments(header: dict) -> list[int]:
  found = {int(m.group(1)) for key in header for m in [re.fullmatch(r"Segment(\d+)_(ID|Name|LabelValue)", key)] if m}
  return sorted(found)


def is_slicer_segmentation(path: str | os.PathLike) -> bool:
  """True for a ``.seg.nrrd`` name, or an NRRD file whose header has ``SegmentN_`` keys."""
  p = Path(path)
  name = p.name.lower()
  if name.endswith(".seg.nrrd"):
    return True
  if not name.endswith((".nrrd", ".nhdr")) or not p.is_file():
    return False
  import nrrd

  try:
    return bool(_segments(nrrd.read_header(str(p))))
  except Exception:  # not a readable NRRD header: let the label-map reader report it
    return False


def read_slicer_segmentation(
  path: str | os.PathLike, target: Geometry, *, num_classes: int | None, class_names: Sequence[str] | None = None
) -> np.ndarray:
  """Reads a 3D Slicer ``.seg.nrrd`` as marks in the image's index space (see the module docstring).

  Returns:
    ``int32[*target.shape]``, ``-1`` unmarked; where segments overlap, the later segment wins.

  Raises:
    ValueError: an unreadable file, no segments, a segment that maps to no class, or a geometry that
      does not match the image's.
  """
  import nrrd

  p = Path(path)
  if not p.exists():
    raise ValueError(f"cannot read {path}: no such file")
  try:
    data, header = nrrd.read(str(p), index_order="F")
  except Exception as err:  # pynrrd raises NRRDError, OSError, ValueError ...
    raise ValueError(f"cannot read {path} as a 3D Slicer segmentation: {err}") from err
  numbers = _segments(header)
  if not numbers:
    raise ValueError(f"{path} is not a 3D Slicer segmentation (no Segment0_* keys in its header)")
  spatial, affine = nrrd_geometry(header, p)
  others = [a for a in range(data.ndim) if a not in spatial]
  if len(others) > 1:
    raise ValueError(f"cannot read {path}: a segmentation has at most one layer axis, found {len(others)}")
  layers = np.transpose(data, others + spatial)
  if not others:
    layers = layers[None]
  if len(spatial) == 2:
    layers = layers[..., None]
  marks = np.full(layers.shape[1:], UNMARKED, np.int32)
  for n in numbers:
    name = header.get(f"Segment{n}_Name", header.get(f"Segment{n}_ID", f"Segment_{n}"))
    what = f"{path}: segment {name!r}"
    try:
      value = int(header.get(f"Segment{n}_LabelValue", 1))
      layer = int(header.get(f"Segment{n}_Layer", 0 if layers.shape[0] == 1 else n))
    except ValueError:
      raise ValueError(f"{what} has a LabelValue or Layer that is not an integer") from None
    if not 0 <= layer < layers.shape[0]:
      raise ValueError(f"{what} is on layer {layer}, but the file has {layers.shape[0]} layers")
    names = [str(c).strip().lower() for c in class_names] if class_names else []
    if str(name).strip().lower() in names:
      label = names.index(str(name).strip().lower())
    elif value >= 0 and (num_classes is None or value < num_classes):
      label = value
    else:
      known = f"classes: {', '.join(class_names)}" if class_names else f"{num_classes} classes"
      raise ValueError(f"{what} (label value {value}) is not a class ({known})")
    marks[layers[layer] == value] = label
  offset = header.get("Segmentation_ReferenceImageExtentOffset")
  try:
    offset = [int(v) for v in str(offset).split()] if offset is not None else None
  except ValueError:
    offset = None
  if offset is not None:
    offset = (offset + [0, 0, 0])[:3]
  source = Geometry("nrrd", tuple(int(s) for s in marks.shape), "ijk", spacing_of(affine), affine, {})
  return align_to_grid(marks, source, target, f"segmentation {path}", offset=offset)


# ----------------------------------------------------------------------------------------------
# Any marks file.


def read_marks_file(
  path: str | os.PathLike,
  target: Geometry,
  *,
  num_classes: int | None,
  class_names: Sequence[str] | None = None,
  background_value: int = 255,
  unmarked_value: int = 0,
  radius: float = 1.0,
  rectangle: str = "box",
) -> np.ndarray:
  """Reads one marks file of any kind (LabelMe ``.json``, Slicer ``.seg.nrrd``, else a label map).

  Returns:
    ``int32[*target.shape]``, ``-1`` unmarked.
  """
  name = Path(path).name.lower()
  if name.endswith(".json"):
    return read_labelme(
      path, target, num_classes=num_classes, class_names=class_names, radius=radius, rectangle=rectangle
    )
  if is_slicer_segmentation(path):
    return read_slicer_segmentation(path, target, num_classes=num_classes, class_names=class_names)
  return read_label_map_marks(
    path, target, num_classes=num_classes, background_value=background_value, unmarked_value=unmarked_value
  )


def read_marks(paths: Sequence[str | os.PathLike], target: Geometry, **options: Any) -> np.ndarray:
  """Reads several marks files and accumulates them in order (later files override earlier ones).

  Args:
    paths: marks files.
    target: the image's geometry.
    **options: passed to :func:`read_marks_file`.

  Returns:
    ``int32[*target.shape]``, ``-1`` unmarked.

  Raises:
    ValueError: a file cannot be read or holds bad marks; the message names the file.
  """
  out = np.full(tuple(target.shape), UNMARKED, np.int32)
  for path in paths:
    try:
      marks = read_marks_file(path, target, **options)
    except ValueError as err:
      if str(path) in str(err) or Path(path).name in str(err):
        raise
      raise ValueError(f"marks file {path}: {err}") from err
    out = marks_lib.accumulate(out, marks)
  return out
