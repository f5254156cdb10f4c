"""Mark maps: rasterising marks into one (:func:`encode_marks`), merging rounds (:func:`accumulate`) and
checking an encoded map (:func:`validate_mark_map`).

A mark map is ``int32[*spatial]``: :data:`UNMARKED` (``-1``) where the user marked nothing and ``k >= 0``
where the user said "this pixel is class ``k``".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from scribblejax.marks._checks import UNMARKED, check_num_classes, check_range, check_shape, integer_array
from scribblejax.marks.types import MARK_TYPES, Mark, describe

__all__ = ["UNMARKED", "accumulate", "encode_marks", "validate_mark_map"]


def encode_marks(shape: Sequence[int], marks: Sequence[Mark] | Mark, *, num_classes: int | None = None) -> np.ndarray:
  """Rasterises marks into one mark map.

  Marks are drawn in order, each by the drawing function its type registered
  (:data:`scribblejax.marks.types.MARK_TYPES`); where they overlap, later marks overwrite earlier ones (a
  ``LabelMap`` overwrites only where it is marked, a ``Box`` only on its ring and core). Marks partly outside
  the image are clipped.

  Args:
    shape: the image's spatial shape, e.g. ``(H, W)`` or ``(D, H, W)``.
    marks: a sequence of marks (a single mark is accepted too).
    num_classes: when given, every label must be ``< num_classes``.

  Returns:
    ``int32[*shape]``: ``-1`` where unmarked, the class index elsewhere.

  Raises:
    ValueError: a mark is of an unknown kind, has a coordinate with the wrong number of entries, a
      label that is not an integer in ``[0, num_classes)``, marks no pixel of the image (lies
      outside it; a polygon: holds no pixel centre), or a ``LabelMap`` whose shape or values are wrong.
      The message names the mark (its position in ``marks``) and the offending value.
  """
  shape = check_shape(shape)
  num_classes = check_num_classes(num_classes)
  if isinstance(marks, tuple(MARK_TYPES)):
    marks = [marks]
  if isinstance(marks, (str, bytes)) or not isinstance(marks, Iterable):
    raise ValueError(f"marks must be a mark or a sequence of marks, got {type(marks).__name__}")
  out = np.full(shape, UNMARKED, np.int32)
  for i, mark in enumerate(marks):
    kind = MARK_TYPES.get(type(mark))
    if kind is None:
      raise ValueError(
        f"marks[{i}] is a {type(mark).__name__}, not a mark; expected one of {[t.__name__ for t in MARK_TYPES]}"
      )
    what = f"marks[{i}] {describe(mark)}"
    if kind.draw(out, mark, what, num_classes) == 0:
      raise ValueError(f"{what} {kind.no_pixel.format(shape=shape)}")
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
  num_classes = check_num_classes(num_classes)
  arr = np.asarray(marks)
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"marks must be an integer array, got dtype {arr.dtype}")
  spatial_shape = tuple(int(s) for s in spatial_shape)
  if arr.shape != spatial_shape:
    raise ValueError(f"marks have shape {arr.shape}, but the image's spatial shape is {spatial_shape}")
  check_range(arr, "marks", num_classes)
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
  previous = integer_array(previous, "previous marks")
  new = integer_array(new, "new marks")
  if previous.shape != new.shape:
    raise ValueError(f"previous marks have shape {previous.shape} but new marks have shape {new.shape}")
  check_range(previous, "previous marks", None)
  check_range(new, "new marks", None)
  return np.where(new >= 0, new, previous).astype(np.int32)
