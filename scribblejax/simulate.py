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
  reach past a region that is not convex).

Points and scribbles never lie outside the error region they correct, and boxes are clipped to the
ground truth, so every mark carries the true class.

Like a person, the simulated user ignores disagreements only ``ignore_border`` pixels wide along a
boundary: each error mask is eroded by that many pixels before its largest region is chosen (0 marks
every error, however thin).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from scribblejax.marks import UNMARKED, Box, encode_marks

KINDS = ("scribble", "point", "box")


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
                   ignore_border: int = 1) -> np.ndarray:
  """One interaction of the simulated user, as a mark map (``-1`` unmarked).

  Args:
    pred: the current prediction, int ``[*spatial]``.
    truth: the ground truth, int ``[*spatial]``.
    num_classes: number of classes.
    kind: "scribble", "point" or "box".
    radius: thickness of points and scribbles.
    max_length: most skeleton pixels per scribble.
    per_class: mark the largest error region of every class (True) or only the largest overall.
    ignore_border: erode each error mask by this many pixels first (errors thinner than that along a
      boundary are left alone).

  Returns:
    ``int32[*spatial]`` marks of this interaction (all ``-1`` when the prediction is perfect).
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  pred, truth = np.asarray(pred), np.asarray(truth)
  if pred.shape != truth.shape:
    raise ValueError(f"prediction {pred.shape} and ground truth {truth.shape} differ in shape")
  regions = []
  for c in range(num_classes):
    error = (truth == c) & (pred != c)
    if ignore_border > 0:
      error = ndimage.binary_erosion(error, iterations=ignore_border)
    region = _largest_component(error)
    if region is not None:
      regions.append((int(region.sum()), c, region))
  regions.sort(key=lambda r: (-r[0], r[1]))
  if not per_class:
    regions = regions[:1]
  out = np.full(pred.shape, UNMARKED, np.int32)
  for _, c, region in regions:
    if kind == "point":
      mark = np.zeros_like(region)
      mark[_interior_point(region)] = True
      if radius > 0:
        mark = ndimage.binary_dilation(mark, _ball(radius, region.ndim)) & region
      out[mark] = c
    elif kind == "scribble":
      out[_scribble_pixels(region, max_length, radius)] = c
    else:
      coords = np.argwhere(region)
      box = Box(tuple(coords.min(0)), tuple(coords.max(0)), c, background=0 if c != 0 else None)
      encoded = encode_marks(pred.shape, [box])
      out = np.where((encoded >= 0) & (encoded == truth), encoded, out)
  return out
