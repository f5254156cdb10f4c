"""Region growing: marks grow into neighbouring pixels of similar intensity (Sambaturu et al., MICCAI 2021)."""

from __future__ import annotations

from typing import Any

import numpy as np

from scribblejax.marks._checks import UNMARKED, as_index, as_real, check_range, integer_array

_WALL = -2  # label of the padding around the image in grow_marks
_NO_LABEL = np.iinfo(np.int32).max  # "no candidate yet" in grow_marks


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


def grow_marks(
  marks: Any,
  image: Any,
  threshold: float,
  *,
  connectivity: int = 1,
  max_distance: int | None = None,
  max_pixels: int | None = None,
  blocked: Any = None,
) -> np.ndarray:
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
  marks = integer_array(marks, "marks")
  check_range(marks, "marks", None)
  spatial, ndim = marks.shape, marks.ndim
  image = np.asarray(image)
  if image.dtype.kind not in "biuf":
    raise ValueError(f"image must be a real numeric array, got dtype {image.dtype}")
  if image.shape == spatial:
    channels = 1
  elif image.ndim == ndim + 1 and image.shape[:-1] == spatial:
    channels = image.shape[-1]
  else:
    raise ValueError(
      f"image has shape {image.shape}, but the marks' spatial shape is {spatial} "
      f"(image must be {spatial} or {spatial} + (channels,))"
    )
  values = image.astype(np.float64).reshape(spatial + (channels,))
  if not np.all(np.isfinite(values)):
    raise ValueError("image contains NaN or Inf")
  threshold = as_real(threshold, "threshold")
  connectivity = as_index(connectivity, "connectivity")
  if not 1 <= connectivity <= max(ndim, 1):
    raise ValueError(f"connectivity must be in [1, {ndim}] for a {ndim}-D image, got {connectivity}")
  if max_distance is not None and as_index(max_distance, "max_distance") < 0:
    raise ValueError(f"max_distance must be >= 0 or None, got {max_distance}")
  if max_pixels is not None and as_index(max_pixels, "max_pixels") < 0:
    raise ValueError(f"max_pixels must be >= 0 or None, got {max_pixels}")
  wall = None
  if blocked is not None:
    blocked = np.asarray(blocked)
    if blocked.dtype != bool or blocked.shape != spatial:
      raise ValueError(
        f"blocked must be a boolean map of the marks' shape {spatial}, got {blocked.dtype} {blocked.shape}"
      )
    wall = blocked & (marks < 0)

  # Pad by one pixel of "wall" so that every neighbour of an image pixel is a valid flat index.
  labels = np.pad(marks.astype(np.int32), 1, constant_values=_WALL)
  if wall is not None:
    labels[(slice(1, -1),) * ndim][wall] = _WALL
  flat_labels = labels.reshape(-1)  # a view of `labels`
  flat_values = np.pad(values, [(1, 1)] * ndim + [(0, 0)]).reshape(-1, channels)
  if channels == 1:
    flat_values = flat_values[:, 0].copy()
  strides = np.array([int(np.prod(labels.shape[a + 1 :])) for a in range(ndim)], np.int64)
  deltas = [int(d @ strides) for d in _neighbour_offsets(ndim, connectivity)]

  frontier = np.flatnonzero(flat_labels >= 0)
  num_labels = int(marks.max()) + 1 if frontier.size else 0
  remaining = None if max_pixels is None else np.full(num_labels, int(max_pixels), np.int64)
  best = np.full(flat_labels.size, _NO_LABEL, np.int32)  # lowest label reaching a pixel this layer
  slot = np.zeros(flat_labels.size, np.int64)  # scratch for de-duplication
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
      best[target] = np.minimum(best[target], label)  # targets are distinct for one delta
      reached.append(target)
    new = np.concatenate(reached) if reached else np.zeros(0, np.int64)
    slot[new] = np.arange(new.size)  # keep one entry per distinct pixel (the last written)
    new = np.sort(new[slot[new] == np.arange(new.size)])  # raster order
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
