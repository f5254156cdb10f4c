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

Each kind is registered with its drawing function in :mod:`scribblejax.marks.types` (:data:`MARK_TYPES`);
a new kind of mark is one class there, its drawing function and ``@register``.

:func:`encode_marks` rasterises marks into a mark map, :func:`accumulate` merges the marks of a new
interaction round into the previous ones, :func:`validate_mark_map` checks an encoded map, and
:func:`grow_marks` grows marks into similar neighbouring pixels (the region growing of Sambaturu et
al., MICCAI 2021).

Modules: :mod:`~scribblejax.marks.types` (the mark classes and the registry), :mod:`~scribblejax.marks.encode`
(mark maps), :mod:`~scribblejax.marks.grow` (region growing).

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

from scribblejax.marks.encode import UNMARKED, accumulate, encode_marks, validate_mark_map
from scribblejax.marks.grow import grow_marks
from scribblejax.marks.types import (
  MARK_TYPES,
  Box,
  LabelMap,
  Mark,
  MarkType,
  Point,
  Polygon,
  Scribble,
  describe,
  register,
)

__all__ = [
  "MARK_TYPES",
  "UNMARKED",
  "Box",
  "LabelMap",
  "Mark",
  "MarkType",
  "Point",
  "Polygon",
  "Scribble",
  "accumulate",
  "describe",
  "encode_marks",
  "grow_marks",
  "register",
  "validate_mark_map",
]
