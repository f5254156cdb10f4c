"""The kinds of mark a user draws, each registered with the function that draws it into a mark map.

Kinds of mark (immutable NamedTuples, so they serialise with ``_asdict()``):

* :class:`Point`: one pixel, or a Euclidean disk / ball around it.
* :class:`Scribble`: a polyline, thickened to a given radius.
* :class:`Box`: "the object is in this box": marks a background ring just outside the box and the
  box's central core as the object; the rest of the box is left unmarked.
* :class:`Polygon`: a filled polygon (lasso); in 3D it lies on one slice.
* :class:`LabelMap`: a whole array of labels, e.g. a previous segmentation or a painted layer.

The registry :data:`MARK_TYPES` maps each class to its :class:`MarkType`; :func:`scribblejax.marks.encode_marks`
draws every mark through it. A new kind of mark is a NamedTuple and its drawing function, registered
next to it::

    class Ring(NamedTuple):
      centre: Sequence[int]
      label: int
      inner: float
      outer: float

    @register(Ring)
    def _draw_ring(out, mark, what, num_classes):
      ...                                  # validate (errors start with `what`), write `out`, count pixels
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import skimage.draw

from scribblejax._checks import INT32_MAX
from scribblejax.marks._checks import UNMARKED, as_index, as_label, as_real, int_coords, integer_array

_CHUNK = 1 << 20  # coordinates per chunk when thickening lines


# ----------------------------------------------------------------------------------------------
# The registry.


class MarkType(NamedTuple):
  """How one kind of mark is drawn into a mark map.

  Attributes:
    cls: the mark's class (a NamedTuple).
    draw: ``draw(out, mark, what, num_classes) -> int`` validates ``mark`` (raising ``ValueError``
      messages that start with ``what``, the mark's position and description), writes its labels into the
      mark map ``out`` (``int32[*spatial]``, in place, clipped to the image) and returns how many pixels
      it wrote: ``0`` is an error (the mark lies outside the image), ``-1`` a mark that may mark nothing.
    no_pixel: why a mark that wrote no pixel is refused, completing "``marks[i] <mark>`` ..."; ``{shape}``
      is replaced by the image's shape.
    describe: ``describe(mark) -> str`` for error messages; ``None``: the mark's ``repr`` (shortened).
  """

  cls: type
  draw: Callable[[np.ndarray, Any, str, int | None], int]
  no_pixel: str = "lies entirely outside the image of shape {shape} (it marks no pixel)"
  describe: Callable[[Any], str] | None = None


_REGISTRY: dict[type, MarkType] = {}

# mark class -> MarkType, in the order of registration (read-only; filled when this module is imported)
MARK_TYPES: Mapping[type, MarkType] = types.MappingProxyType(_REGISTRY)


def register(cls: type, *, no_pixel: str | None = None, describe: Callable[[Any], str] | None = None):
  """Registers the decorated function as the drawing function of the mark class ``cls``.

  Args:
    cls: the mark's class.
    no_pixel: see :class:`MarkType` (default: "lies entirely outside the image ...").
    describe: see :class:`MarkType`.

  Returns:
    A decorator that registers ``draw`` and returns it unchanged.

  Raises:
    ValueError: ``cls`` already has a drawing function.
  """

  def decorator(draw):
    if cls in _REGISTRY:
      raise ValueError(f"{cls.__name__} already has a drawing function")
    entry = MarkType(cls, draw, describe=describe)
    _REGISTRY[cls] = entry if no_pixel is None else entry._replace(no_pixel=no_pixel)
    return draw

  return decorator


def describe(mark: Any) -> str:
  """A mark as error messages name it: its registered description, or its ``repr`` cut to 200 characters."""
  kind = _REGISTRY.get(type(mark))
  if kind is not None and kind.describe is not None:
    return kind.describe(mark)
  text = repr(mark)
  return text if len(text) <= 200 else text[:197] + "..."


# ----------------------------------------------------------------------------------------------
# Rasterising helpers shared by the drawing functions.


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
    coords = (centres[start : start + step, None, :] + offsets[None]).reshape(-1, out.ndim)
    coords = coords[np.all((coords >= 0) & (coords < shape), axis=1)]
    written[tuple(coords.T)] = True
  out[written] = label
  return int(written.sum())


def _clip_segment(
  start: np.ndarray, stop: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
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


def _clipped_slices(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, ...] | None:
  """Slices for the inclusive box ``lo..hi`` clipped to the image; ``None`` when empty."""
  lo = np.maximum(lo, 0)
  hi = np.minimum(hi, np.array(shape) - 1)
  if np.any(lo > hi):
    return None
  return tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))


# ----------------------------------------------------------------------------------------------
# Point


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


@register(Point)
def _draw_point(out: np.ndarray, mark: Point, what: str, num_classes: int | None) -> int:
  label = as_label(mark.label, f"{what}: label", num_classes)
  coord = int_coords(mark.coord, f"{what}: coord", out.ndim, rows=False)
  radius = as_real(mark.radius, f"{what}: radius")
  return _write_thick(out, coord[None], radius, label)


# ----------------------------------------------------------------------------------------------
# Scribble


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


@register(Scribble)
def _draw_scribble(out: np.ndarray, mark: Scribble, what: str, num_classes: int | None) -> int:
  label = as_label(mark.label, f"{what}: label", num_classes)
  points = int_coords(mark.points, f"{what}: points", out.ndim, rows=True)
  radius = as_real(mark.radius, f"{what}: radius")
  pieces = [points]
  for start, stop in zip(points[:-1], points[1:]):
    pieces.append(_segment_pixels(start, stop, out.shape, radius))
  return _write_thick(out, np.concatenate(pieces).astype(np.int64), radius, label)


# ----------------------------------------------------------------------------------------------
# Box


class Box(NamedTuple):
  """ "The object of class ``label`` lies inside this box" (a bounding-box interaction).

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


@register(Box)
def _draw_box(out: np.ndarray, mark: Box, what: str, num_classes: int | None) -> int:
  label = as_label(mark.label, f"{what}: label", num_classes)
  background = None if mark.background is None else as_label(mark.background, f"{what}: background", num_classes)
  if background is not None and background == label:
    raise ValueError(f"{what}: background and label are both {label}; the ring must be another class")
  lo = int_coords(mark.lo, f"{what}: lo", out.ndim, rows=False)
  hi = int_coords(mark.hi, f"{what}: hi", out.ndim, rows=False)
  if np.any(lo > hi):
    raise ValueError(f"{what}: lo {lo.tolist()} exceeds hi {hi.tolist()} on some axis")
  ring = as_index(mark.ring, f"{what}: ring")
  if ring < 0:
    raise ValueError(f"{what}: ring must be >= 0, got {ring}")
  core = as_real(mark.core, f"{what}: core", 0.0, 1.0)
  if _clipped_slices(lo, hi, out.shape) is None:
    raise ValueError(f"{what} lies entirely outside the image of shape {out.shape}")
  count = 0
  if background is not None and ring > 0:
    outer = _clipped_slices(lo - ring, hi + ring, out.shape)
    region = out[outer]  # a view: writing to it writes to `out`
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


# ----------------------------------------------------------------------------------------------
# Polygon


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


@register(
  Polygon,
  no_pixel="marks no pixel: no pixel centre of the image of shape {shape} lies inside it "
  "(it is entirely outside the image, or thinner than a pixel)",
)
def _draw_polygon(out: np.ndarray, mark: Polygon, what: str, num_classes: int | None) -> int:
  label = as_label(mark.label, f"{what}: label", num_classes)
  vertices = np.array(mark.vertices)
  if vertices.dtype == object or not (
    np.issubdtype(vertices.dtype, np.integer) or np.issubdtype(vertices.dtype, np.floating)
  ):
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
    axis = as_index(mark.axis, f"{what}: axis")
    if not 0 <= axis < 3:
      raise ValueError(f"{what}: axis must be 0, 1 or 2 for a 3-D image, got {axis}")
    if mark.index is None:
      raise ValueError(f"{what}: a polygon in a 3-D image needs the slice index along axis {axis}")
    index = as_index(mark.index, f"{what}: index")
    if not 0 <= index < out.shape[axis]:
      raise ValueError(f"{what}: slice index {index} lies outside the image (axis {axis} has {out.shape[axis]} slices)")
    plane = np.moveaxis(out, axis, 0)[index]  # a view, in-plane axes in increasing order
  else:
    raise ValueError(f"{what}: polygons need a 2-D or 3-D image, got {out.ndim} dimensions")
  rows, cols = skimage.draw.polygon(vertices[:, 0], vertices[:, 1], shape=plane.shape)
  plane[rows, cols] = label
  return len(np.unique(rows * plane.shape[1] + cols))


# ----------------------------------------------------------------------------------------------
# LabelMap


class LabelMap(NamedTuple):
  """A whole array of marks the shape of the image (e.g. a painted layer or an earlier result).

  Attributes:
    labels: integer array, shape equal to the image's spatial shape. Values equal to ``unmarked``
      mean "no mark"; every other value is a class index (``>= 0``).
    unmarked: the value that means "no mark" (e.g. ``255`` for an 8-bit label image).
  """

  labels: Any
  unmarked: int = UNMARKED


def _describe_label_map(mark: LabelMap) -> str:
  labels = np.asarray(mark.labels)
  return f"LabelMap(labels=<{labels.dtype} array of shape {labels.shape}>, unmarked={mark.unmarked!r})"


@register(LabelMap, describe=_describe_label_map)
def _draw_label_map(out: np.ndarray, mark: LabelMap, what: str, num_classes: int | None) -> int:
  labels = np.asarray(mark.labels)
  if labels.shape != out.shape:
    raise ValueError(f"{what}: labels have shape {labels.shape}, but the image has shape {out.shape}")
  labels = integer_array(labels, f"{what}: labels")
  unmarked = as_index(mark.unmarked, f"{what}: unmarked")
  marked = labels != unmarked
  values = labels[marked]
  if values.size:
    lo, hi = int(values.min()), int(values.max())
    if lo < 0:
      raise ValueError(f"{what}: labels hold value {lo}, which is neither unmarked ({unmarked}) nor a class index >= 0")
    if num_classes is not None and hi >= num_classes:
      raise ValueError(f"{what}: labels hold value {hi}, but num_classes is {num_classes}")
    if hi > INT32_MAX:
      raise ValueError(f"{what}: labels hold value {hi}, too large for a class index (marks are stored as int32)")
  out[marked] = values
  return -1  # a label map may legitimately mark nothing


Mark = Point | Scribble | Box | Polygon | LabelMap
