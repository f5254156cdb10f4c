"""User marks (the corrections a user draws), host-side, in 2D and 3D.

Every kind of mark encodes to one *mark map* ``int32[*spatial]``: ``-1`` where the user marked
nothing and ``k >= 0`` where the user said "this pixel is class ``k``". The refinement asks the
network to predict every marked pixel as its label.

Kinds of mark (immutable NamedTuples, so they serialise with ``_asdict()``):

* :class:`Point`: one pixel, or a Euclidean disk / ball around it.
* :class:`Scribble`: a polyline, thickened to a given radius.
* :class:`Box`: "the object is in this box": marks a background ring just outside the box and the
  box's central core as the object; the rest of the box is left unmarked.
* :class:`Polygon`: a filled polygon (lasso); in 3D it lies on one slice.
* :class:`LabelMap`: a whole array of labels, e.g. a previous segmentation or a painted layer.

:func:`encode_marks` rasterises marks into a mark map, :func:`accumulate` merges the marks of a new
interaction round into the previous ones, :func:`validate_mark_map` checks an encoded map, and
:func:`grow_marks` grows marks into similar neighbouring pixels (the region growing of Sambaturu et
al., MICCAI 2021).

Example::

    >>> import numpy as np
    >>> from scribblejax.marks import Box, Point, Scribble, encode_marks, grow_marks
    >>> marks = encode_marks((32, 32), [
    ...     Scribble([(4, 2), (4, 20)], label=1, radius=0),   # 19 pixels of class 1
    ...     Point((28, 28), label=0, radius=1),                # 5 pixels of class 0
    ... ], num_classes=2)
    >>> marks.dtype, int((marks == 1).sum()), int((marks == 0).sum())
    (dtype('int32'), 19, 5)
    >>> image = np.zeros((32, 32), np.float32)
    >>> image[16:] = 1.0                                       # a step between two flat regions
    >>> grown = grow_marks(marks, image, threshold=0.5)
    >>> int((grown == 1).sum()), int((grown == 0).sum())      # each label fills its own region
    (512, 512)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Union

import numpy as np
import skimage.draw

from scribblejax._checks import INT32_MAX

UNMARKED = -1
_WALL = -2                                 # label of the padding around the image in grow_marks
_NO_LABEL = np.iinfo(np.int32).max         # "no candidate yet" in grow_marks
_CHUNK = 1 << 20                           # coordinates per chunk when thickening lines


class Point(NamedTuple):
  """One marked pixel, or a Euclidean disk (2D) / ball (3D) around it.

  Attributes:
    coord: the pixel, one integer per image axis.
    label: class index (``>= 0``).
    radius: pixels within this Euclidean distance of ``coord`` are marked; ``0`` marks ``coord``
      only.
  """
  coord: Sequence[int]
  label: int
  radius: float = 0


class Scribble(NamedTuple):
  """A polyline through ``points``, thickened to ``radius``.

  Each segment is rasterised with :func:`skimage.draw.line_nd` (end points included), then every
  pixel within Euclidean distance ``radius`` of the line is marked.

  Attributes:
    points: ``N x ndim`` integer coordinates, ``N >= 1`` (one point marks a disk / ball).
    label: class index (``>= 0``).
    radius: thickness; ``0`` gives the 1-pixel line.
  """
  points: Sequence[Sequence[int]]
  label: int
  radius: float = 1


class Box(NamedTuple):
  """"The object of class ``label`` lies inside this box" (a bounding-box interaction).

  The box spans ``lo[i] <= x[i] <= hi[i]`` on every axis ``i`` (corners included). Encoding marks:

  * a ring ``ring`` pixels wide just *outside* the box (the pixels within Chebyshev distance
    ``ring`` of the box but not in it) as class ``background``, the class that means "not this
    object". ``background=None`` (or ``ring=0``) marks no ring. Ring pixels outside the image are
    dropped.
  * the box's central core as class ``label``: each axis shrunk to the fraction ``core`` of the
    box's extent (rounded, at least one pixel), centred in the box.

  The rest of the box stays unmarked (earlier marks there are left as they were): the network
  decides where in the box the object ends.

  Attributes:
    lo: the low corner, one integer per image axis.
    hi: the high corner (inclusive), ``hi >= lo`` on every axis.
    label: class index of the object (``>= 0``).
    background: class index of "not this object", or ``None`` for no ring.
    ring: width of the background ring in pixels (``>= 0``).
    core: fraction of the box's extent, per axis, marked as ``label`` (``0 <= core <= 1``).
  """
  lo: Sequence[int]
  hi: Sequence[int]
  label: int
  background: int | None = 0
  ring: int = 2
  core: float = 0.5


class Polygon(NamedTuple):
  """A filled polygon (lasso), rasterised with :func:`skimage.draw.polygon`.

  In 2D the vertices are ``(row, col)``. In 3D the polygon lies on slice ``index`` of axis ``axis``
  and the vertices are its two in-plane coordinates, in increasing axis order (for ``axis=1``:
  ``(axis-0 coord, axis-2 coord)``). Vertices may be fractional: a pixel is marked when its centre
  lies inside the polygon.

  Attributes:
    vertices: ``N x 2`` coordinates, ``N >= 3``.
    label: class index (``>= 0``).
    axis: 3D only: the axis normal to the polygon's plane.
    index: 3D only (required there; must be ``None`` in 2D): the slice along ``axis``.
  """
  vertices: Sequence[Sequence[float]]
  label: int
  axis: int = 0
  index: int | None = None


class LabelMap(NamedTuple):
  """A whole array of marks the shape of the image (e.g. a painted layer or an earlier result).

  Attributes:
    labels: integer array, shape equal to the image's spatial shape. Values equal to ``unmarked``
      mean "no mark"; every other value is a class index (``>= 0``).
    unmarked: the value that means "no mark" (e.g. ``255`` for an 8-bit label image).
  """
  labels: Any
  unmarked: int = UNMARKED


Mark = Union[Point, Scribble, Box, Polygon, LabelMap]
_MARK_TYPES = (Point, Scribble, Box, Polygon, LabelMap)


# ----------------------------------------------------------------------------------------------
# Small checks shared by the public functions.

def _describe(mark: Any) -> str:
  if isinstance(mark, LabelMap):
    labels = np.asarray(mark.labels)
    return f"LabelMap(labels=<{labels.dtype} array of shape {labels.shape}>, unmarked={mark.unmarked!r})"
  text = repr(mark)
  return text if len(text) <= 200 else text[:197] + "..."


def _index(value: Any, what: str) -> int:
  """``value`` as a Python int; bools and non-integers are rejected."""
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{what} must be an integer, got {value!r}")
  try:
    return operator.index(value)
  except TypeError:
    raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _label(value: Any, what: str, num_classes: int | None) -> int:
  label = _index(value, what)
  if label < 0:
    raise ValueError(f"{what} must be >= 0, got {label}")
  if num_classes is not None and label >= num_classes:
    raise ValueError(f"{what} is {label}, but num_classes is {num_classes}")
  return label


def _real(value: Any, what: str, lo: float = 0.0, hi: float = math.inf) -> float:
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{what} must be a real number, got {value!r}")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{what} must be a real number, got {value!r}") from None
  if not math.isfinite(number) or not lo <= number <= hi:
    raise ValueError(f"{what} must be finite and in [{lo}, {hi}], got {value!r}")
  return number


def _int_coords(value: Any, what: str, ndim: int, rows: bool) -> np.ndarray:
  """Integer coordinates: shape ``(ndim,)``, or ``(N, ndim)`` with ``N >= 1`` when ``rows``."""
  try:
    arr = np.array(value)                  # a copy: never alias the caller's array
  except ValueError:                       # ragged nested sequences
    raise ValueError(f"{what} must be {'an N x ' + str(ndim) + ' array' if rows else str(ndim) + ' integers'}, "
                     f"got the ragged {value!r}") from None
  if arr.dtype == object or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f"{what} must be integers, got {value!r}")
  if rows:
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != ndim:
      raise ValueError(
          f"{what} must be an N x {ndim} array (N >= 1) for a {ndim}-D image, got shape {arr.shape}")
  elif arr.shape != (ndim,):
    raise ValueError(f"{what} has {arr.size if arr.ndim == 1 else arr.shape} entries, but the image "
                     f"has {ndim} dimensions")
  return arr.astype(np.int64)


def _check_shape(shape: Any) -> tuple[int, ...]:
  try:
    dims = tuple(_index(s, "shape entry") for s in shape)
  except TypeError:
    raise ValueError(f"shape must be a sequence of integers, got {shape!r}") from None
  if not dims or any(s < 1 for s in dims):
    raise ValueError(f"shape must be a non-empty sequence of positive integers, got {shape!r}")
  return dims


def _integer_array(value: Any, what: str) -> np.ndarray:
  arr = np.asarray(value)
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{what} must be an integer array, got dtype {arr.dtype}")
  return arr


def _check_range(arr: np.ndarray, what: str, num_classes: int | None) -> None:
  if not arr.size:
    return
  lo, hi = int(arr.min()), int(arr.max())
  if lo < UNMARKED:
    raise ValueError(f"{what} hold value {lo}; values must be -1 (unmarked) or a class index >= 0")
  if num_classes is not None and hi >= num_classes:
    raise ValueError(f"{what} hold value {hi}, outside [-1, num_classes) with num_classes={num_classes}")
  if hi > INT32_MAX:
    raise ValueError(f"{what} hold value {hi}, too large for a class index (marks are stored as int32)")


def _num_classes(num_classes: Any) -> int | None:
  if num_classes is None:
    return None
  n = _index(num_classes, "num_classes")
  if n < 1:
    raise ValueError(f"num_classes must be >= 1, got {n}")
  return n


# ----------------------------------------------------------------------------------------------
# Rasterisers. Each writes one mark into `out` and returns how many pixels it wrote.

def _ball_offsets(radius: float, ndim: int) -> np.ndarray:
  """Integer offsets ``d`` with ``|d| <= radius`` (Euclidean), ``int64[K, ndim]``."""
  r = int(math.floor(radius))
  grid = np.indices((2 * r + 1,) * ndim).reshape(ndim, -1).T - r
  return grid[(grid**2).sum(axis=1) <= radius * radius].astype(np.int64)


def _write_thick(out: np.ndarray, centres: np.ndarray, radius: float, label: int) -> int:
  """Marks every in-image pixel within ``radius`` of any of ``centres`` (``int64[N, ndim]``)."""
  shape = np.array(out.shape)
  # Centres further than `radius` outside the image cannot reach it.
  near = np.all((centres >= -radius) & (centres <= shape - 1 + radius), axis=1)
  centres = np.unique(centres[near], axis=0)
  written = np.zeros(out.shape, bool)
  if (2 * math.floor(radius) + 1) ** out.ndim > out.size:
    # A ball larger than the image: test the image's pixels instead of listing the ball's offsets.
    grid = np.indices(out.shape).reshape(out.ndim, -1).T
    flat = written.reshape(-1)
    for centre in centres:
      flat |= ((grid - centre) ** 2).sum(axis=1) <= radius * radius
    out[written] = label
    return int(written.sum())
  offsets = _ball_offsets(radius, out.ndim)
  step = max(1, _CHUNK // len(offsets))
  for start in range(0, len(centres), step):
    coords = (centres[start:start + step, None, :] + offsets[None]).reshape(-1, out.ndim)
    coords = coords[np.all((coords >= 0) & (coords < shape), axis=1)]
    written[tuple(coords.T)] = True
  out[written] = label
  return int(written.sum())


def _draw_point(out: np.ndarray, mark: Point, what: str, num_classes: int | None) -> int:
  label = _label(mark.label, f"{what}: label", num_classes)
  coord = _int_coords(mark.coord, f"{what}: coord", out.ndim, rows=False)
  radius = _real(mark.radius, f"{what}: radius")
  return _write_thick(out, coord[None], radius, label)


def _clip_segment(start: np.ndarray, stop: np.ndarray, lo: np.ndarray,
                  hi: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
  """The part of the segment ``start..stop`` inside the box ``lo..hi`` (Liang-Barsky); ``None`` if none."""
  start, delta = start.astype(np.float64), (stop - start).astype(np.float64)
  t0, t1 = 0.0, 1.0
  for axis in range(len(start)):
    if delta[axis] == 0:
      if not lo[axis] <= start[axis] <= hi[axis]:
        return None
      continue
    a, b = (lo[axis] - start[axis]) / delta[axis], (hi[axis] - start[axis]) / delta[axis]
    t0, t1 = max(t0, min(a, b)), min(t1, max(a, b))
  if t0 > t1:
    return None
  return start + t0 * delta, start + t1 * delta


def _segment_pixels(start: np.ndarray, stop: np.ndarray, shape: tuple[int, ...], radius: float) -> np.ndarray:
  """The pixels of the straight line ``start..stop`` (both ends included), ``int64[N, ndim]``.

  A segment with an end far outside the image (further than the image's largest side beyond its
  ``radius``-wide margin) is first cut to that wider box, so that only pixels near the image are
  listed (a stray coordinate would otherwise list millions); its pixels in the image may then lie one
  pixel off the uncut line's.
  """
  margin = radius + max(shape)
  lo, hi = np.full(len(shape), -margin), np.array(shape) - 1 + margin
  if np.all((start >= lo) & (start <= hi) & (stop >= lo) & (stop <= hi)):
    return np.stack(skimage.draw.line_nd(start, stop, endpoint=True), axis=1)
  part = _clip_segment(start, stop, lo, hi)
  if part is None:
    return np.zeros((0, len(shape)), np.int64)
  return np.stack(skimage.draw.line_nd(*part, endpoint=True), axis=1)


def _draw_scribble(out: np.ndarray, mark: Scribble, what: str, num_classes: int | None) -> int:
  label = _label(mark.label, f"{what}: label", num_classes)
  points = _int_coords(mark.points, f"{what}: points", out.ndim, rows=True)
  radius = _real(mark.radius, f"{what}: radius")
  pieces = [points]
  for start, stop in zip(points[:-1], points[1:]):
    pieces.append(_segment_pixels(start, stop, out.shape, radius))
  return _write_thick(out, np.concatenate(pieces).astype(np.int64), radius, label)


def _clipped_slices(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
  """Slices for the inclusive box ``lo..hi`` clipped to the image; ``None`` when empty."""
  lo = np.maximum(lo, 0)
  hi = np.minimum(hi, np.array(shape) - 1)
  if np.any(lo > hi):
    return None
  return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))


def _draw_box(out: np.ndarray, mark: Box, what: str, num_classes: int | None) -> int:
  label = _label(mark.label, f"{what}: label", num_classes)
  background = None if mark.background is None else _label(mark.background, f"{what}: background",
                                                            num_classes)
  if background is not None and background == label:
    raise ValueError(f"{what}: background and label are both {label}; the ring must be another class")
  lo = _int_coords(mark.lo, f"{what}: lo", out.ndim, rows=False)
  hi = _int_coords(mark.hi, f"{what}: hi", out.ndim, rows=False)
  if np.any(lo > hi):
    raise ValueError(f"{what}: lo {lo.tolist()} exceeds hi {hi.tolist()} on some axis")
  ring = _index(mark.ring, f"{what}: ring")
  if ring < 0:
    raise ValueError(f"{what}: ring must be >= 0, got {ring}")
  core = _real(mark.core, f"{what}: core", 0.0, 1.0)
  if _clipped_slices(lo, hi, out.shape) is None:
    raise ValueError(f"{what} lies entirely outside the image of shape {out.shape}")
  count = 0
  if background is not None and ring > 0:
    outer = _clipped_slices(lo - ring, hi + ring, out.shape)
    region = out[outer]                    # a view: writing to it writes to `out`
    is_ring = np.ones(region.shape, bool)
    start = np.array([s.start for s in outer])
    inner = _clipped_slices(lo - start, hi - start, region.shape)
    if inner is not None:
      is_ring[inner] = False
    region[is_ring] = background
    count += int(is_ring.sum())
  extent = hi - lo + 1
  size = np.clip(np.floor(core * extent + 0.5).astype(np.int64), 1, extent)
  core_lo = lo + (extent - size) // 2
  inside = _clipped_slices(core_lo, core_lo + size - 1, out.shape)
  if inside is not None:
    out[inside] = label
    count += int(np.prod([s.stop - s.start for s in inside]))
  return count


def _draw_polygon(out: np.ndarray, mark: Polygon, what: str, num_classes: int | None) -> int:
  label = _label(mark.label, f"{what}: label", num_classes)
  vertices = np.array(mark.vertices)
  if vertices.dtype == object or not (np.issubdtype(vertices.dtype, np.integer)
                                      or np.issubdtype(vertices.dtype, np.floating)):
    raise ValueError(f"{what}: vertices must be real numbers")
  if vertices.ndim != 2 or vertices.shape[1] != 2 or vertices.shape[0] < 3:
    raise ValueError(f"{what}: vertices must be an N x 2 array with N >= 3, got shape {vertices.shape}")
  if not np.all(np.isfinite(vertices)):
    raise ValueError(f"{what}: vertices must be finite")
  if out.ndim == 2:
    if mark.index is not None:
      raise ValueError(f"{what}: index must be None for a 2-D image, got {mark.index!r}")
    if mark.axis != 0:
      raise ValueError(f"{what}: axis applies to 3-D images only; leave it at 0 for a 2-D image, got {mark.axis!r}")
    plane = out
  elif out.ndim == 3:
    axis = _index(mark.axis, f"{what}: axis")
    if not 0 <= axis < 3:
      raise ValueError(f"{what}: axis must be 0, 1 or 2 for a 3-D image, got {axis}")
    if mark.index is None:
      raise ValueError(f"{what}: a polygon in a 3-D image needs the slice index along axis {axis}")
    index = _index(mark.index, f"{what}: index")
    if not 0 <= index < out.shape[axis]:
      raise ValueError(f"{what}: slice index {index} lies outside the image (axis {axis} has "
                       f"{out.shape[axis]} slices)")
    plane = np.moveaxis(out, axis, 0)[index]   # a view, in-plane axes in increasing order
  else:
    raise ValueError(f"{what}: polygons need a 2-D or 3-D image, got {out.ndim} dimensions")
  rows, cols = skimage.draw.polygon(vertices[:, 0], vertices[:, 1], shape=plane.shape)
  plane[rows, cols] = label
  return len(np.unique(rows * plane.shape[1] + cols))


def _draw_label_map(out: np.ndarray, mark: LabelMap, what: str, num_classes: int | None) -> int:
  labels = np.asarray(mark.labels)
  if labels.shape != out.shape:
    raise ValueError(f"{what}: labels have shape {labels.shape}, but the image has shape {out.shape}")
  labels = _integer_array(labels, f"{what}: labels")
  unmarked = _index(mark.unmarked, f"{what}: unmarked")
  marked = labels != unmarked
  values = labels[marked]
  if values.size:
    lo, hi = int(values.min()), int(values.max())
    if lo < 0:
      raise ValueError(f"{what}: labels hold value {lo}, which is neither unmarked ({unmarked}) nor a "
                       "class index >= 0")
    if num_classes is not None and hi >= num_classes:
      raise ValueError(f"{what}: labels hold value {hi}, but num_classes is {num_classes}")
    if hi > INT32_MAX:
      raise ValueError(f"{what}: labels hold value {hi}, too large for a class index (marks are stored as int32)")
  out[marked] = values
  return -1                                # a label map may legitimately mark nothing


_DRAW = {Point: _draw_point, Scribble: _draw_scribble, Box: _draw_box, Polygon: _draw_polygon,
         LabelMap: _draw_label_map}


# ----------------------------------------------------------------------------------------------
# Public functions.

def encode_marks(shape: Sequence[int], marks: Sequence[Mark] | Mark, *,
                 num_classes: int | None = None) -> np.ndarray:
  """Rasterises marks into one mark map.

  Marks are drawn in order; where they overlap, later marks overwrite earlier ones (a
  :class:`LabelMap` overwrites only where it is marked, a :class:`Box` only on its ring and core).
  Marks partly outside the image are clipped.

  Args:
    shape: the image's spatial shape, e.g. ``(H, W)`` or ``(D, H, W)``.
    marks: a sequence of marks (a single mark is accepted too).
    num_classes: when given, every label must be ``< num_classes``.

  Returns:
    ``int32[*shape]``: ``-1`` where unmarked, the class index elsewhere.

  Raises:
    ValueError: a mark is of an unknown kind, has a coordinate with the wrong number of entries, a
      label that is not an integer in ``[0, num_classes)``, marks no pixel of the image (lies
      outside it; a polygon: holds no pixel centre), or a :class:`LabelMap` whose shape or values are wrong. The message names the
      mark (its position in ``marks``) and the offending value.
  """
  shape = _check_shape(shape)
  num_classes = _num_classes(num_classes)
  if isinstance(marks, _MARK_TYPES):
    marks = [marks]
  if isinstance(marks, (str, bytes)) or not isinstance(marks, Iterable):
    raise ValueError(f"marks must be a mark or a sequence of marks, got {type(marks).__name__}")
  out = np.full(shape, UNMARKED, np.int32)
  for i, mark in enumerate(marks):
    draw = _DRAW.get(type(mark))
    if draw is None:
      raise ValueError(f"marks[{i}] is a {type(mark).__name__}, not a mark; expected one of "
                       f"{[t.__name__ for t in _MARK_TYPES]}")
    what = f"marks[{i}] {_describe(mark)}"
    if draw(out, mark, what, num_classes) == 0:
      if isinstance(mark, Polygon):
        raise ValueError(f"{what} marks no pixel: no pixel centre of the image of shape {shape} lies inside it "
                         "(it is entirely outside the image, or thinner than a pixel)")
      raise ValueError(f"{what} lies entirely outside the image of shape {shape} (it marks no pixel)")
  return out


def validate_mark_map(marks: Any, spatial_shape: Sequence[int], num_classes: int) -> np.ndarray:
  """Checks an encoded mark map and returns it as a fresh ``int32`` array.

  Args:
    marks: integer array, ``-1`` unmarked, ``k`` in ``[0, num_classes)`` marked as class ``k``.
    spatial_shape: the image's spatial shape; ``marks`` must have exactly this shape.
    num_classes: number of classes the network predicts.

  Returns:
    ``int32[*spatial_shape]``, a copy (never the caller's array).

  Raises:
    ValueError: ``marks`` is not an integer array (a float array is rejected even when it holds
      whole numbers), has another shape, or holds a value outside ``[-1, num_classes)``.
  """
  num_classes = _num_classes(num_classes)
  arr = np.asarray(marks)
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"marks must be an integer array, got dtype {arr.dtype}")
  spatial_shape = tuple(int(s) for s in spatial_shape)
  if arr.shape != spatial_shape:
    raise ValueError(f"marks have shape {arr.shape}, but the image's spatial shape is {spatial_shape}")
  _check_range(arr, "marks", num_classes)
  return np.array(arr, dtype=np.int32, copy=True)


def accumulate(previous: Any, new: Any) -> np.ndarray:
  """Merges the marks of a new interaction round into the earlier ones.

  Args:
    previous: the mark map so far (integer array, ``-1`` unmarked).
    new: the new round's mark map, same shape.

  Returns:
    ``int32`` array: ``new`` where it is marked (``>= 0``), ``previous`` elsewhere.

  Raises:
    ValueError: either is not an integer array, holds values below ``-1`` or beyond int32, or the
      shapes differ.
  """
  previous = _integer_array(previous, "previous marks")
  new = _integer_array(new, "new marks")
  if previous.shape != new.shape:
    raise ValueError(f"previous marks have shape {previous.shape} but new marks have shape {new.shape}")
  _check_range(previous, "previous marks", None)
  _check_range(new, "new marks", None)
  return np.where(new >= 0, new, previous).astype(np.int32)


def _neighbour_offsets(ndim: int, connectivity: int) -> list[np.ndarray]:
  grid = np.indices((3,) * ndim).reshape(ndim, -1).T - 1
  steps = np.abs(grid).sum(axis=1)
  return [d for d, s in zip(grid, steps) if 1 <= s <= connectivity]


def _within_cap(labels: np.ndarray, remaining: np.ndarray) -> np.ndarray:
  """Keeps, per label, the first ``remaining[label]`` entries of ``labels`` (in their order)."""
  order = np.argsort(labels, kind="stable")
  ordered = labels[order]
  counts = np.bincount(ordered, minlength=len(remaining))
  starts = np.cumsum(counts) - counts
  rank = np.empty(len(labels), np.int64)
  rank[order] = np.arange(len(labels)) - starts[ordered]
  return rank < remaining[labels]


def grow_marks(marks: Any, image: Any, threshold: float, *, connectivity: int = 1,
               max_distance: int | None = None, max_pixels: int | None = None,
               blocked: Any = None) -> np.ndarray:
  """Grows marks into neighbouring pixels of similar intensity (Sambaturu et al., MICCAI 2021).

  Breadth-first from every marked pixel, one layer at a time: an unmarked neighbour of a pixel
  reached in the previous layer joins, taking that pixel's label, when its intensity differs from
  *that pixel's* intensity (not the seed's) by strictly less than ``threshold``. A slow ramp is
  therefore followed to its end; a step of ``threshold`` or more stops growth. When labels reach the
  same pixel in the same layer, the lowest class index wins. Originally marked pixels never change.

  Args:
    marks: integer mark map ``[*spatial]``, ``-1`` unmarked.
    image: ``[*spatial]`` or ``[*spatial, C]``; with channels the intensity difference is the
      largest absolute difference over channels.
    threshold: finite, ``>= 0``; ``0`` grows nothing.
    connectivity: ``1`` joins face neighbours (4 in 2D, 6 in 3D), ``ndim`` all neighbours (8 / 26);
      in between, neighbours that differ in at most ``connectivity`` coordinates.
    max_distance: at most this many layers (``None``: no limit; ``0``: no growth).
    max_pixels: at most this many pixels added per class in total (``None``: no limit). When a layer
      would exceed a class's allowance, that class takes the first pixels of the layer in raster (C)
      order; the rest stay unmarked (other classes may reach them later), and the class stops.
    blocked: optional boolean ``[*spatial]``: unmarked pixels that never join and that growth does not
      pass, e.g. the marks of earlier rounds, which a grown label must not replace (a pixel marked in
      ``marks`` stays a seed). They stay unmarked in the result.

  Returns:
    A new ``int32[*spatial]`` mark map.

  Raises:
    ValueError: ``marks`` is not an integer map with values ``>= -1``; ``image`` is not real and
      finite or its spatial shape differs from ``marks``; ``blocked`` is not a boolean map of the
      marks' shape; ``threshold``, ``connectivity``, ``max_distance`` or ``max_pixels`` is out of range.
  """
  marks = _integer_array(marks, "marks")
  _check_range(marks, "marks", None)
  spatial, ndim = marks.shape, marks.ndim
  image = np.asarray(image)
  if image.dtype.kind not in "biuf":
    raise ValueError(f"image must be a real numeric array, got dtype {image.dtype}")
  if image.shape == spatial:
    channels = 1
  elif image.ndim == ndim + 1 and image.shape[:-1] == spatial:
    channels = image.shape[-1]
  else:
    raise ValueError(f"image has shape {image.shape}, but the marks' spatial shape is {spatial} "
                     f"(image must be {spatial} or {spatial} + (channels,))")
  values = image.astype(np.float64).reshape(spatial + (channels,))
  if not np.all(np.isfinite(values)):
    raise ValueError("image contains NaN or Inf")
  threshold = _real(threshold, "threshold")
  connectivity = _index(connectivity, "connectivity")
  if not 1 <= connectivity <= max(ndim, 1):
    raise ValueError(f"connectivity must be in [1, {ndim}] for a {ndim}-D image, got {connectivity}")
  if max_distance is not None and _index(max_distance, "max_distance") < 0:
    raise ValueError(f"max_distance must be >= 0 or None, got {max_distance}")
  if max_pixels is not None and _index(max_pixels, "max_pixels") < 0:
    raise ValueError(f"max_pixels must be >= 0 or None, got {max_pixels}")
  wall = None
  if blocked is not None:
    blocked = np.asarray(blocked)
    if blocked.dtype != bool or blocked.shape != spatial:
      raise ValueError(f"blocked must be a boolean map of the marks' shape {spatial}, got "
                       f"{blocked.dtype} {blocked.shape}")
    wall = blocked & (marks < 0)

  # Pad by one pixel of "wall" so that every neighbour of an image pixel is a valid flat index.
  labels = np.pad(marks.astype(np.int32), 1, constant_values=_WALL)
  if wall is not None:
    labels[(slice(1, -1),) * ndim][wall] = _WALL
  flat_labels = labels.reshape(-1)         # a view of `labels`
  flat_values = np.pad(values, [(1, 1)] * ndim + [(0, 0)]).reshape(-1, channels)
  if channels == 1:
    flat_values = flat_values[:, 0].copy()
  strides = np.array([int(np.prod(labels.shape[a + 1:])) for a in range(ndim)], np.int64)
  deltas = [int(d @ strides) for d in _neighbour_offsets(ndim, connectivity)]

  frontier = np.flatnonzero(flat_labels >= 0)
  num_labels = int(marks.max()) + 1 if frontier.size else 0
  remaining = None if max_pixels is None else np.full(num_labels, int(max_pixels), np.int64)
  best = np.full(flat_labels.size, _NO_LABEL, np.int32)   # lowest label reaching a pixel this layer
  slot = np.zeros(flat_labels.size, np.int64)              # scratch for de-duplication
  layer = 0
  while frontier.size and (max_distance is None or layer < max_distance):
    if remaining is not None:
      frontier = frontier[remaining[flat_labels[frontier]] > 0]
    source_labels = flat_labels[frontier]
    reached = []
    for delta in deltas:
      target = frontier + delta
      free = flat_labels[target] == UNMARKED
      target, source, label = target[free], frontier[free], source_labels[free]
      diff = np.abs(flat_values[target] - flat_values[source])
      if channels > 1:
        diff = diff.max(axis=1)
      close = diff < threshold
      target, label = target[close], label[close]
      best[target] = np.minimum(best[target], label)   # targets are distinct for one delta
      reached.append(target)
    new = np.concatenate(reached) if reached else np.zeros(0, np.int64)
    slot[new] = np.arange(new.size)        # keep one entry per distinct pixel (the last written)
    new = np.sort(new[slot[new] == np.arange(new.size)])   # raster order
    new_labels = best[new]
    best[new] = _NO_LABEL
    if remaining is not None:
      keep = _within_cap(new_labels, remaining)
      new, new_labels = new[keep], new_labels[keep]
      remaining -= np.bincount(new_labels, minlength=num_labels)
    flat_labels[new] = new_labels
    frontier = new
    layer += 1
  grown = np.ascontiguousarray(labels[(slice(1, -1),) * ndim])
  if wall is not None:
    grown[wall] = UNMARKED
  return grown
