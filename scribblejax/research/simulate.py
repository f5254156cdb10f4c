"""A deterministic simulated user for 2D and 3D, multi-class.

Each interaction compares the prediction with the ground truth, takes for every class the largest
connected region that should be that class but is predicted otherwise (false negatives of the class,
which are the false positives of the others), and marks it with the true class:

* ``"point"``: a disk of ``radius`` at the region's interior pixel farthest from its boundary (the
  rule RITM and f-BRS use);
* ``"scribble"``: the region's skeleton, at most ``max_length`` pixels nearest that interior pixel,
  thickened by ``radius`` but never leaving the region; in 3D it is drawn on the slice (of axis 0)
  where the region is largest;
* ``"box"``: the region's bounding box as a :class:`scribblejax.marks.Box` (core of the class, ring
  of background; class 0 regions get no ring), less every pixel whose true class is not the one the
  box marks it with (a box's ring can cross the rest of the object, or another class; its core can
  reach past a region that is not convex);
* ``"click"``: RITM's robot user: one point only, in the largest error region of all classes (a
  false negative or a false positive, whichever is larger), at its pixel farthest from its boundary;
* ``"object_box"``: a box around the *ground truth* of every foreground class (its largest
  connected part), as the first interaction of the CVPR 2025 interactive 3-D challenge gives.

:func:`robot_marks` names whole robot users, one kind of mark per interaction: the kinds above, and
``"cvpr25"`` (the challenge's protocol: an object box first, then one click per interaction).

Points and scribbles never lie outside the error region they correct, and boxes are clipped to the
ground truth, so every mark carries the true class.

Like a person, the simulated user ignores disagreements only ``ignore_border`` pixels wide along a
boundary: each error mask is eroded by that many pixels before its largest region is chosen (0 marks
every error, however thin). Axes of length 1 (a 2-D slice stored as ``H x W x 1``) are set aside
first, so that the erosion does not empty every mask. Pixels already marked (``marked=``) are never
chosen again: a mark the method has not honoured is not drawn twice, the user moves on to the next
error.

Kinds and robot users are registries: :data:`MARK_KINDS` maps a kind of mark to the function that draws it, and
:data:`ROBOT_USER_SCHEDULES` a robot user to the kind it draws at each interaction; :data:`KINDS` and
:data:`ROBOT_USERS` are their names, which the evaluation harness and the command line's ``--marks`` offer.
A new kind is one function and one entry (most draw on each class's largest error region: wrap a
``draw(region, class, truth, out, options) -> out`` in :func:`per_error_region`); a new robot user is one
entry.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from scribblejax.marks import UNMARKED, Box, encode_marks


class UserOptions(NamedTuple):
  """How the simulated user draws (the options of :func:`simulate_marks`), as every kind of mark receives them."""

  radius: int  # thickness of points and scribbles
  max_length: int  # most skeleton pixels per scribble
  per_class: bool  # every class's largest error region, or only the largest of all
  ignore_border: int  # each error mask is eroded by this many pixels first
  marked: np.ndarray  # bool[*spatial]: pixels marked already, left out of every error region


# A kind of mark: (pred, truth, num_classes, options) -> int32[*spatial] marks (-1 unmarked), on arrays whose
# axes of length 1 are set aside.
MarkKind = Callable[[np.ndarray, np.ndarray, int, UserOptions], np.ndarray]


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
  labelled, count = ndimage.label(mask)
  if count == 0:
    return None
  sizes = np.bincount(labelled.ravel())[1:]
  return labelled == (int(np.argmax(sizes)) + 1)


def _interior_point(region: np.ndarray) -> tuple[int, ...]:
  dist = ndimage.distance_transform_edt(np.pad(region, 1))[(slice(1, -1),) * region.ndim]
  return tuple(int(i) for i in np.unravel_index(int(np.argmax(dist)), region.shape))


def _ball(radius: int, ndim: int) -> np.ndarray:
  grid = np.indices((2 * radius + 1,) * ndim) - radius
  return (grid**2).sum(0) <= radius**2


def _scribble_pixels(region: np.ndarray, max_length: int, radius: int) -> np.ndarray:
  plane = region
  index = None
  if region.ndim == 3:
    index = int(np.argmax(region.reshape(region.shape[0], -1).sum(1)))
    plane = region[index]
  centre = np.array(_interior_point(plane))
  skeleton = skeletonize(plane)
  coords = np.argwhere(skeleton)
  if len(coords) == 0:
    coords = centre[None]
  order = np.argsort(((coords - centre) ** 2).sum(1), kind="stable")
  chosen = np.zeros_like(plane)
  chosen[tuple(coords[order[:max_length]].T)] = True
  if radius > 0:
    chosen = ndimage.binary_dilation(chosen, _ball(radius, 2)) & plane
  if index is None:
    return chosen
  out = np.zeros_like(region)
  out[index] = chosen
  return out


def simulate_marks(
  pred: np.ndarray,
  truth: np.ndarray,
  num_classes: int,
  *,
  kind: str = "scribble",
  radius: int = 1,
  max_length: int = 40,
  per_class: bool = True,
  ignore_border: int = 1,
  marked: np.ndarray | None = None,
) -> np.ndarray:
  """One interaction of the simulated user, as a mark map (``-1`` unmarked).

  Args:
    pred: the current prediction, int ``[*spatial]``.
    truth: the ground truth, int ``[*spatial]``.
    num_classes: number of classes.
    kind: one of :data:`KINDS`.
    radius: thickness of points and scribbles.
    max_length: most skeleton pixels per scribble.
    per_class: mark the largest error region of every class (True) or only the largest overall
      (``"click"`` always marks one).
    ignore_border: erode each error mask by this many pixels first (errors thinner than that along a
      boundary are left alone).
    marked: bool ``[*spatial]``, pixels marked already: they are left out of every error region.

  Returns:
    ``int32[*spatial]`` marks of this interaction (all ``-1`` when no error is left to mark).
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  pred, truth = np.asarray(pred), np.asarray(truth)
  if pred.shape != truth.shape:
    raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
  marked = np.zeros(pred.shape, bool) if marked is None else np.asarray(marked, bool)
  if marked.shape != pred.shape:
    raise ValueError(f"marked pixels of shape {marked.shape} and prediction {pred.shape} differ in shape")
  kept = tuple(d for d, n in enumerate(pred.shape) if n > 1)
  squeeze = lambda a: a.reshape(tuple(pred.shape[d] for d in kept))
  options = UserOptions(radius, max_length, per_class, ignore_border, squeeze(marked))
  return MARK_KINDS[kind](squeeze(pred), squeeze(truth), num_classes, options).reshape(pred.shape)


def _error_regions(pred, truth, num_classes, ignore_border, marked):
  """``(size, class, region)`` of each class's largest error region, largest first."""
  regions = []
  for c in range(num_classes):
    error = (truth == c) & (pred != c)
    if ignore_border > 0 and error.ndim:
      error = ndimage.binary_erosion(error, iterations=ignore_border)
    region = _largest_component(error & ~marked)
    if region is not None:
      regions.append((int(region.sum()), c, region))
  regions.sort(key=lambda r: (-r[0], r[1]))
  return regions


def per_error_region(draw: Callable[..., np.ndarray], *, largest_only: bool = False) -> MarkKind:
  """A kind of mark drawn on the largest error region of every class (or of all classes).

  Args:
    draw: ``draw(region, c, truth, out, options) -> out`` marks ``region`` (bool ``[*spatial]``, pixels that
      should be class ``c``) in the mark map ``out`` and returns it.
    largest_only: mark only the largest error region of all classes, whatever ``options.per_class`` says.

  Returns:
    The kind of mark, for :data:`MARK_KINDS`.
  """

  def marks(pred, truth, num_classes, options):
    out = np.full(pred.shape, UNMARKED, np.int32)
    regions = _error_regions(pred, truth, num_classes, options.ignore_border, options.marked)
    if not options.per_class or largest_only:
      regions = regions[:1]
    for _, c, region in regions:
      out = draw(region, c, truth, out, options)
    return out

  return marks


def _draw_point(region, c, truth, out, options):
  """A disk of ``options.radius`` at the region's interior pixel farthest from its boundary, inside the region."""
  del truth
  mark = np.zeros_like(region)
  mark[_interior_point(region)] = True
  if options.radius > 0:
    mark = ndimage.binary_dilation(mark, _ball(options.radius, region.ndim)) & region
  out[mark] = c
  return out


def _draw_scribble(region, c, truth, out, options):
  """The region's skeleton nearest its interior point, thickened inside the region."""
  del truth
  out[_scribble_pixels(region, options.max_length, options.radius)] = c
  return out


def _draw_box(region, c, truth, out, options):
  del options
  return _box(region, c, truth, out)


def _box(region, c, truth, out):
  """A box around ``region`` marked ``c`` (ring of background), less what the truth contradicts."""
  coords = np.argwhere(region)
  box = Box(tuple(coords.min(0)), tuple(coords.max(0)), c, background=0 if c != 0 else None)
  encoded = encode_marks(region.shape, [box])
  return np.where((encoded >= 0) & (encoded == truth), encoded, out)


def _object_box_marks(pred, truth, num_classes, options):
  """``"object_box"``: boxes around the ground truth, whatever the prediction."""
  del options
  return _object_boxes(truth, num_classes, np.full(pred.shape, UNMARKED, np.int32))


def _object_boxes(truth, num_classes, out):
  """A box around the largest part of every foreground class's ground truth."""
  for c in range(1, num_classes):
    region = _largest_component(truth == c)
    if region is not None:
      out = _box(region, c, truth, out)
  return out


# The registry of kinds of mark: name -> the function that draws it (KINDS: the names, in this order).
MARK_KINDS: Mapping[str, MarkKind] = types.MappingProxyType(
  {
    "scribble": per_error_region(_draw_scribble),
    "point": per_error_region(_draw_point),
    "box": per_error_region(_draw_box),
    "click": per_error_region(_draw_point, largest_only=True),  # RITM's robot user
    "object_box": _object_box_marks,
  }
)
KINDS = tuple(MARK_KINDS)


def _always(kind: str) -> Callable[[int], str]:
  return lambda interaction: kind


def _cvpr25(interaction: int) -> str:
  """The CVPR 2025 interactive 3-D challenge: an object box first, then one click per interaction."""
  return "object_box" if interaction == 1 else "click"


# The registry of robot users: name -> the kind of mark it draws at interaction i (1 for the first).
ROBOT_USER_SCHEDULES: Mapping[str, Callable[[int], str]] = types.MappingProxyType(
  {
    "scribble": _always("scribble"),
    "point": _always("point"),
    "box": _always("box"),
    "click": _always("click"),
    "cvpr25": _cvpr25,
  }
)
ROBOT_USERS = tuple(ROBOT_USER_SCHEDULES)


def robot_marks(
  user: str, interaction: int, pred: np.ndarray, truth: np.ndarray, num_classes: int, **kwargs
) -> np.ndarray:
  """The marks a robot user draws at ``interaction`` (1 for the first), as :func:`simulate_marks`.

  The user's schedule (:data:`ROBOT_USER_SCHEDULES`) says which kind of mark: ``"cvpr25"`` draws an
  object box at the first interaction and one click at each later one; every other user draws the kind
  of its name every time.

  Raises:
    ValueError: an unknown user.
  """
  if user not in ROBOT_USERS:
    raise ValueError(f"robot user must be one of {ROBOT_USERS}, got {user!r}")
  return simulate_marks(pred, truth, num_classes, kind=ROBOT_USER_SCHEDULES[user](interaction), **kwargs)
