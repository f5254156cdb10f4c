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
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from scribblejax.marks import UNMARKED, Box, encode_marks

KINDS = ("scribble", "point", "box", "click", "object_box")
ROBOT_USERS = ("scribble", "point", "box", "click", "cvpr25")


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
  return (grid ** 2).sum(0) <= radius ** 2


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


def simulate_marks(pred: np.ndarray, truth: np.ndarray, num_classes: int, *, kind: str = "scribble",
                   radius: int = 1, max_length: int = 40, per_class: bool = True,
                   ignore_border: int = 1, marked: np.ndarray | None = None) -> np.ndarray:
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
  out = _marks(squeeze(pred), squeeze(truth), num_classes, kind, radius, max_length, per_class, ignore_border,
               squeeze(marked))
  return out.reshape(pred.shape)


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


def _marks(pred, truth, num_classes, kind, radius, max_length, per_class, ignore_border, marked):
  out = np.full(pred.shape, UNMARKED, np.int32)
  if kind == "object_box":
    return _object_boxes(truth, num_classes, out)
  regions = _error_regions(pred, truth, num_classes, ignore_border, marked)
  if not per_class or kind == "click":
    regions = regions[:1]
  for _, c, region in regions:
    if kind in ("point", "click"):
      mark = np.zeros_like(region)
      mark[_interior_point(region)] = True
      if radius > 0:
        mark = ndimage.binary_dilation(mark, _ball(radius, region.ndim)) & region
      out[mark] = c
    elif kind == "scribble":
      out[_scribble_pixels(region, max_length, radius)] = c
    else:
      out = _box(region, c, truth, out)
  return out


def _box(region, c, truth, out):
  """A box around ``region`` marked ``c`` (ring of background), less what the truth contradicts."""
  coords = np.argwhere(region)
  box = Box(tuple(coords.min(0)), tuple(coords.max(0)), c, background=0 if c != 0 else None)
  encoded = encode_marks(region.shape, [box])
  return np.where((encoded >= 0) & (encoded == truth), encoded, out)


def _object_boxes(truth, num_classes, out):
  """A box around the largest part of every foreground class's ground truth."""
  for c in range(1, num_classes):
    region = _largest_component(truth == c)
    if region is not None:
      out = _box(region, c, truth, out)
  return out


def robot_marks(user: str, interaction: int, pred: np.ndarray, truth: np.ndarray, num_classes: int, **kwargs
                ) -> np.ndarray:
  """The marks a robot user draws at ``interaction`` (1 for the first), as :func:`simulate_marks`.

  ``"cvpr25"`` draws an object box at the first interaction and one click at each later one; every
  other user draws the kind of its name every time.

  Raises:
    ValueError: an unknown user.
  """
  if user not in ROBOT_USERS:
    raise ValueError(f"robot user must be one of {ROBOT_USERS}, got {user!r}")
  kind = ("object_box" if interaction == 1 else "click") if user == "cvpr25" else user
  return simulate_marks(pred, truth, num_classes, kind=kind, **kwargs)
