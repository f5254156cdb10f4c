"""The mark types: each kind of mark draws the pixels it promises, and the registry that dispatches them."""

from typing import NamedTuple

import numpy as np
import pytest

from scribblejax import marks as marks_lib
from scribblejax.marks import Box, LabelMap, Point, Polygon, Scribble, encode_marks, types
from scribblejax.marks.types import MARK_TYPES, MarkType, describe, register


def _ball_count(radius, ndim):
  """Number of integer offsets within Euclidean ``radius``, counted by brute force."""
  r = int(radius)
  grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * ndim, indexing="ij"), -1)
  return int(((grid**2).sum(-1) <= radius**2).sum())


def _pixels(marks, label):
  return {tuple(int(v) for v in p) for p in np.argwhere(marks == label)}


# ----------------------------------------------------------------------------------------------
# Point


def test_point_radius0_marks_exactly_one_pixel_2d_and_3d():
  m = encode_marks((8, 9), [Point((3, 4), label=2)])
  assert m.dtype == np.int32 and m.shape == (8, 9)
  assert _pixels(m, 2) == {(3, 4)} and (m == -1).sum() == 8 * 9 - 1
  m = encode_marks((5, 6, 7), [Point((1, 2, 3), label=0)])
  assert _pixels(m, 0) == {(1, 2, 3)}


@pytest.mark.parametrize("radius,ndim", [(1, 2), (2, 2), (2.5, 2), (1, 3), (1.5, 3), (2, 3)])
def test_point_radius_marks_euclidean_ball(radius, ndim):
  shape = (11,) * ndim
  centre = (5,) * ndim
  m = encode_marks(shape, [Point(centre, label=1, radius=radius)])
  assert (m == 1).sum() == _ball_count(radius, ndim)
  dist2 = ((np.indices(shape) - 5) ** 2).sum(0)
  np.testing.assert_array_equal(m == 1, dist2 <= radius**2)


@pytest.mark.parametrize("radius,centre", [(7.5, (2, 3)), (9, (-4, 12)), (1e5, (3, 3))])
def test_a_ball_larger_than_the_image_marks_the_same_pixels_without_listing_its_offsets(radius, centre):
  m = encode_marks((6, 10), [Point(centre, label=1, radius=radius)])  # 1e5 asked for 596 GiB before
  dist2 = ((np.indices((6, 10)) - np.reshape(centre, (2, 1, 1))) ** 2).sum(0)
  np.testing.assert_array_equal(m == 1, dist2 <= radius**2)
  s = encode_marks((6, 10), [Scribble([(0, 0), (5, 9)], label=1, radius=radius)])
  assert (s == 1).all()


def test_point_partly_outside_is_clipped():
  m = encode_marks((10, 10), [Point((0, 0), label=1, radius=2)])
  # Quarter disk: offsets (dr, dc) >= 0 with dr^2 + dc^2 <= 4.
  assert _pixels(m, 1) == {(0, 0), (1, 0), (2, 0), (0, 1), (0, 2), (1, 1)}


def test_point_entirely_outside_raises_naming_mark():
  with pytest.raises(ValueError, match=r"marks\[1\].*Point.*entirely outside"):
    encode_marks((10, 10), [Point((1, 1), 0), Point((20, 3), label=1, radius=2)])


# ----------------------------------------------------------------------------------------------
# Scribble


def test_scribble_radius0_along_row_is_exactly_the_segment():
  m = encode_marks((10, 20), [Scribble([(4, 3), (4, 15)], label=1, radius=0)])
  assert _pixels(m, 1) == {(4, c) for c in range(3, 16)}


def test_scribble_polyline_radius0_joins_segments():
  m = encode_marks((10, 10), [Scribble([(1, 1), (1, 6), (7, 6)], label=0, radius=0)])
  expected = {(1, c) for c in range(1, 7)} | {(r, 6) for r in range(1, 8)}
  assert _pixels(m, 0) == expected


def test_scribble_radius1_is_line_dilated_by_plus():
  m = encode_marks((10, 20), [Scribble([(4, 3), (4, 15)], label=1, radius=1)])
  expected = {(4, c) for c in range(2, 17)} | {(3, c) for c in range(3, 16)} | {(5, c) for c in range(3, 16)}
  assert _pixels(m, 1) == expected


def test_scribble_single_point_equals_point():
  a = encode_marks((12, 12), [Scribble([(5, 6)], label=1, radius=2)])
  b = encode_marks((12, 12), [Point((5, 6), label=1, radius=2)])
  np.testing.assert_array_equal(a, b)


def test_scribble_3d_axis_and_diagonal():
  m = encode_marks((6, 7, 8), [Scribble([(2, 3, 1), (2, 3, 6)], label=1, radius=0)])
  assert _pixels(m, 1) == {(2, 3, z) for z in range(1, 7)}
  m = encode_marks((6, 6, 6), [Scribble([(0, 0, 0), (5, 5, 5)], label=2, radius=0)])
  assert _pixels(m, 2) == {(i, i, i) for i in range(6)}
  m = encode_marks((9, 9, 9), [Scribble([(4, 4, 2), (4, 4, 6)], label=0, radius=1)])
  # Line of 5 voxels dilated by the 6-neighbourhood: 5 + 4 * 5 side voxels + 2 end caps.
  assert (m == 0).sum() == 5 + 4 * 5 + 2


def test_scribble_partly_outside_is_clipped():
  m = encode_marks((5, 10), [Scribble([(2, -5), (2, 3)], label=1, radius=0)])
  assert _pixels(m, 1) == {(2, c) for c in range(0, 4)}


def test_scribble_bad_points_raise():
  with pytest.raises(ValueError, match=r"marks\[0\].*points must be an N x 2 array"):
    encode_marks((5, 5), [Scribble([(1, 1, 1)], label=0)])
  with pytest.raises(ValueError, match=r"points must be integers"):
    encode_marks((5, 5), [Scribble([(1.5, 1.0)], label=0)])


# ----------------------------------------------------------------------------------------------
# Box


def test_box_ring_and_core_2d():
  lo, hi = (10, 10), (19, 29)  # 10 x 20 box
  m = encode_marks((40, 50), [Box(lo, hi, label=1, background=0, ring=2, core=0.5)])
  # Ring: the box grown by 2 on every side minus the box itself.
  assert (m == 0).sum() == 14 * 24 - 10 * 20
  assert (m[8:22, 8:32] == 0).sum() == 14 * 24 - 10 * 20
  # Core: 5 x 10, centred.
  assert _pixels(m, 1) == {(r, c) for r in range(12, 17) for c in range(15, 25)}
  # The rest of the box is unmarked.
  assert (m[10:20, 10:30] == -1).sum() == 10 * 20 - 5 * 10


def test_box_3d_counts():
  m = encode_marks((20, 20, 20), [Box((5, 5, 5), (12, 12, 12), label=2, background=1, ring=1, core=0.25)])
  assert (m == 1).sum() == 10**3 - 8**3
  assert (m == 2).sum() == 2**3
  assert _pixels(m, 2) == {(a, b, c) for a in (8, 9) for b in (8, 9) for c in (8, 9)}


def test_box_ring_outside_image_dropped_and_no_ring():
  m = encode_marks((20, 20), [Box((0, 0), (9, 9), label=1, background=0, ring=3)])
  assert (m == 0).sum() == 13 * 13 - 10 * 10
  m = encode_marks((20, 20), [Box((2, 2), (9, 9), label=1, background=None)])
  assert (m == 0).sum() == 0 and (m == 1).sum() == 4 * 4


def test_scribble_to_a_far_off_point_is_cut_to_the_image():
  far = encode_marks((40, 30), [Scribble([(5, 5), (5, 10**9)], label=1, radius=1)])  # would list 1e9 pixels
  np.testing.assert_array_equal(far, encode_marks((40, 30), [Scribble([(5, 5), (5, 29)], label=1, radius=1)]))
  diagonal = encode_marks((40, 30), [Scribble([(-(10**8), -(10**8)), (10**8, 10**8)], label=0, radius=0)])
  assert _pixels(diagonal, 0) == {(i, i) for i in range(30)}
  with pytest.raises(ValueError, match=r"marks\[0\].*entirely outside"):
    encode_marks((4, 4), [Scribble([(-(10**9), 0), (-(10**9), 10**9)], label=1)])


def test_box_core_at_least_one_pixel():
  m = encode_marks((10, 10), [Box((2, 2), (6, 6), label=1, core=0.0)])
  assert _pixels(m, 1) == {(4, 4)}


def test_box_errors():
  with pytest.raises(ValueError, match=r"marks\[0\].*entirely outside"):
    encode_marks((10, 10), [Box((12, 12), (15, 15), label=1)])
  with pytest.raises(ValueError, match=r"lo \[5, 5\] exceeds hi"):
    encode_marks((10, 10), [Box((5, 5), (4, 8), label=1)])
  with pytest.raises(ValueError, match=r"background and label are both 1"):
    encode_marks((10, 10), [Box((1, 1), (4, 4), label=1, background=1)])
  with pytest.raises(ValueError, match=r"core must be finite and in \[0.0, 1.0\]"):
    encode_marks((10, 10), [Box((1, 1), (4, 4), label=1, core=1.5)])
  with pytest.raises(ValueError, match=r"background is 3, but num_classes is 2"):
    encode_marks((10, 10), [Box((1, 1), (4, 4), label=1, background=3)], num_classes=2)


# ----------------------------------------------------------------------------------------------
# Polygon


def test_polygon_2d_fills_pixel_centres_inside():
  # Half-integer corners: exactly rows 1..4 and cols 1..6 have their centres inside.
  m = encode_marks((8, 9), [Polygon([(0.5, 0.5), (0.5, 6.5), (4.5, 6.5), (4.5, 0.5)], label=3)])
  assert _pixels(m, 3) == {(r, c) for r in range(1, 5) for c in range(1, 7)}


def test_polygon_3d_lies_on_one_slice():
  verts = [(0.5, 1.5), (0.5, 4.5), (2.5, 4.5), (2.5, 1.5)]  # (axis-0, axis-2) coordinates
  m = encode_marks((5, 6, 7), [Polygon(verts, label=1, axis=1, index=3)])
  assert _pixels(m, 1) == {(a, 3, c) for a in (1, 2) for c in (2, 3, 4)}
  m = encode_marks((5, 6, 7), [Polygon(verts, label=1, axis=0, index=4)])
  assert _pixels(m, 1) == {(4, b, c) for b in (1, 2) for c in (2, 3, 4)}


def test_polygon_errors():
  tri = [(1, 1), (1, 4), (4, 1)]
  with pytest.raises(ValueError, match=r"needs the slice index"):
    encode_marks((5, 5, 5), [Polygon(tri, label=0)])
  with pytest.raises(ValueError, match=r"index must be None for a 2-D image"):
    encode_marks((5, 5), [Polygon(tri, label=0, index=1)])
  with pytest.raises(ValueError, match=r"N >= 3"):
    encode_marks((5, 5), [Polygon(tri[:2], label=0)])
  with pytest.raises(ValueError, match=r"slice index 9 lies outside"):
    encode_marks((5, 5, 5), [Polygon(tri, label=0, axis=2, index=9)])
  with pytest.raises(ValueError, match=r"entirely outside"):
    encode_marks((5, 5), [Polygon([(10, 10), (10, 14), (14, 10)], label=0)])


# ----------------------------------------------------------------------------------------------
# LabelMap


def test_label_map_unmarked_value_and_overwrite_only_where_marked():
  labels = np.full((4, 5), 255, np.uint8)
  labels[1, 1:3] = 2
  labels[3, 4] = 0
  m = encode_marks((4, 5), [Point((0, 0), label=1), Point((1, 1), label=1), LabelMap(labels, 255)])
  assert m[0, 0] == 1  # not overwritten by an unmarked value
  assert m[1, 1] == 2 and m[1, 2] == 2 and m[3, 4] == 0
  assert (m == -1).sum() == 20 - 4


def test_label_map_3d_default_unmarked():
  labels = -np.ones((3, 4, 5), np.int64)
  labels[2, 3, 4] = 1
  m = encode_marks((3, 4, 5), [LabelMap(labels)])
  assert _pixels(m, 1) == {(2, 3, 4)} and (m == -1).sum() == 59


def test_label_map_errors():
  with pytest.raises(ValueError, match=r"marks\[0\] LabelMap.*shape \(4, 4\).*image has shape \(4, 5\)"):
    encode_marks((4, 5), [LabelMap(np.zeros((4, 4), np.int32))])
  with pytest.raises(ValueError, match=r"labels must be an integer array"):
    encode_marks((4, 5), [LabelMap(np.zeros((4, 5), np.float32))])
  with pytest.raises(ValueError, match=r"labels hold value -3"):
    encode_marks((4, 5), [LabelMap(np.full((4, 5), -3))])
  with pytest.raises(ValueError, match=r"labels hold value 4, but num_classes is 3"):
    encode_marks((4, 5), [LabelMap(np.full((4, 5), 4))], num_classes=3)
  for big in (np.full((4, 5), 2**32 + 1, np.int64), np.full((4, 5), 2**63, np.uint64)):  # never wrapped
    with pytest.raises(ValueError, match=r"labels hold value \d+, too large for a class index"):
      encode_marks((4, 5), [LabelMap(big)])


# ----------------------------------------------------------------------------------------------
# The registry


def test_every_mark_type_is_registered_in_order_and_reexported():
  assert tuple(MARK_TYPES) == (Point, Scribble, Box, Polygon, LabelMap)
  assert all(isinstance(kind, MarkType) and kind.cls is cls for cls, kind in MARK_TYPES.items())
  assert marks_lib.MARK_TYPES is MARK_TYPES and marks_lib.register is register
  with pytest.raises(TypeError):
    MARK_TYPES[int] = MARK_TYPES[Point]  # read-only: types register themselves
  with pytest.raises(ValueError, match="Point already has a drawing function"):
    register(Point)(lambda out, mark, what, num_classes: 0)
  assert (
    describe(LabelMap(np.zeros((300, 2), np.int16))) == "LabelMap(labels=<int16 array of shape (300, 2)>, unmarked=-1)"
  )
  assert describe(Scribble([(0, k) for k in range(100)], 1)).endswith("...")


class _Cross(NamedTuple):
  """A test-only mark: a plus sign of arm ``arm`` around ``centre`` (2-D)."""

  centre: tuple
  label: int
  arm: int = 1


def _draw_cross(out, mark, what, num_classes):
  if num_classes is not None and mark.label >= num_classes:
    raise ValueError(f"{what}: label is {mark.label}, but num_classes is {num_classes}")
  r, c = mark.centre
  rows = [(r + d, c) for d in range(-mark.arm, mark.arm + 1)] + [(r, c + d) for d in range(-mark.arm, mark.arm + 1)]
  inside = {(i, j) for i, j in rows if 0 <= i < out.shape[0] and 0 <= j < out.shape[1]}
  for i, j in inside:
    out[i, j] = mark.label
  return len(inside)


def test_a_new_mark_type_is_one_class_and_one_registration():
  register(_Cross, no_pixel="misses the image of shape {shape}", describe=lambda m: f"a cross at {m.centre}")(
    _draw_cross
  )
  try:
    m = encode_marks((5, 5), [Point((0, 0), 0), _Cross((2, 2), 1)])
    assert {tuple(p) for p in np.argwhere(m == 1)} == {(1, 2), (2, 1), (2, 2), (2, 3), (3, 2)} and m[0, 0] == 0
    single = encode_marks((5, 5), _Cross((2, 2), 1))  # a single mark of the new type is accepted too
    np.testing.assert_array_equal(single == 1, m == 1)
    assert (single == -1).sum() == 20
    with pytest.raises(ValueError, match=r"marks\[0\] a cross at \(9, 9\) misses the image of shape \(5, 5\)"):
      encode_marks((5, 5), [_Cross((9, 9), 1)])
    with pytest.raises(ValueError, match=r"marks\[1\] a cross at \(1, 1\): label is 3, but num_classes is 2"):
      encode_marks((5, 5), [Point((0, 0), 0), _Cross((1, 1), 3)], num_classes=2)
  finally:
    del types._REGISTRY[_Cross]  # leave the registry as the package defines it
  with pytest.raises(ValueError, match=r"marks\[0\] is a _Cross, not a mark; expected one of \['Point', 'Scribble'"):
    encode_marks((5, 5), [_Cross((2, 2), 1)])
