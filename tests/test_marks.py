"""Tests for scribblejax.marks: encoding every kind of mark, accumulation, validation, region growing."""


import numpy as np
import pytest

from scribblejax.marks import (Box, LabelMap, Point, Polygon, Scribble, accumulate, encode_marks,
                               grow_marks, validate_mark_map)


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
  m = encode_marks((6, 10), [Point(centre, label=1, radius=radius)])     # 1e5 asked for 596 GiB before
  dist2 = ((np.indices((6, 10)) - np.reshape(centre, (2, 1, 1))) ** 2).sum(0)
  np.testing.assert_array_equal(m == 1, dist2 <= radius ** 2)
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
  expected = ({(4, c) for c in range(2, 17)} | {(3, c) for c in range(3, 16)}
              | {(5, c) for c in range(3, 16)})
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
  lo, hi = (10, 10), (19, 29)              # 10 x 20 box
  m = encode_marks((40, 50), [Box(lo, hi, label=1, background=0, ring=2, core=0.5)])
  # Ring: the box grown by 2 on every side minus the box itself.
  assert (m == 0).sum() == 14 * 24 - 10 * 20
  assert (m[8:22, 8:32] == 0).sum() == 14 * 24 - 10 * 20
  # Core: 5 x 10, centred.
  assert _pixels(m, 1) == {(r, c) for r in range(12, 17) for c in range(15, 25)}
  # The rest of the box is unmarked.
  assert (m[10:20, 10:30] == -1).sum() == 10 * 20 - 5 * 10


def test_box_3d_counts():
  m = encode_marks((20, 20, 20), [Box((5, 5, 5), (12, 12, 12), label=2, background=1, ring=1,
                                      core=0.25)])
  assert (m == 1).sum() == 10**3 - 8**3
  assert (m == 2).sum() == 2**3
  assert _pixels(m, 2) == {(a, b, c) for a in (8, 9) for b in (8, 9) for c in (8, 9)}


def test_box_ring_outside_image_dropped_and_no_ring():
  m = encode_marks((20, 20), [Box((0, 0), (9, 9), label=1, background=0, ring=3)])
  assert (m == 0).sum() == 13 * 13 - 10 * 10
  m = encode_marks((20, 20), [Box((2, 2), (9, 9), label=1, background=None)])
  assert (m == 0).sum() == 0 and (m == 1).sum() == 4 * 4


def test_scribble_to_a_far_off_point_is_cut_to_the_image():
  far = encode_marks((40, 30), [Scribble([(5, 5), (5, 10**9)], label=1, radius=1)])      # would list 1e9 pixels
  np.testing.assert_array_equal(far, encode_marks((40, 30), [Scribble([(5, 5), (5, 29)], label=1, radius=1)]))
  diagonal = encode_marks((40, 30), [Scribble([(-10**8, -10**8), (10**8, 10**8)], label=0, radius=0)])
  assert _pixels(diagonal, 0) == {(i, i) for i in range(30)}
  with pytest.raises(ValueError, match=r"marks\[0\].*entirely outside"):
    encode_marks((4, 4), [Scribble([(-10**9, 0), (-10**9, 10**9)], label=1)])


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
  verts = [(0.5, 1.5), (0.5, 4.5), (2.5, 4.5), (2.5, 1.5)]     # (axis-0, axis-2) coordinates
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
  assert m[0, 0] == 1                      # not overwritten by an unmarked value
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
  for big in (np.full((4, 5), 2**32 + 1, np.int64), np.full((4, 5), 2**63, np.uint64)):   # never wrapped
    with pytest.raises(ValueError, match=r"labels hold value \d+, too large for a class index"):
      encode_marks((4, 5), [LabelMap(big)])


# ----------------------------------------------------------------------------------------------
# encode_marks in general

def test_later_marks_overwrite_earlier():
  m = encode_marks((10, 10), [Scribble([(5, 0), (5, 9)], label=0, radius=0),
                              Point((5, 5), label=1, radius=1)])
  assert m[5, 5] == 1 and m[5, 4] == 1 and m[5, 3] == 0
  m = encode_marks((10, 10), [Point((5, 5), label=1, radius=1),
                              Scribble([(5, 0), (5, 9)], label=0, radius=0)])
  assert m[5, 5] == 0 and m[4, 5] == 1


def test_encode_validation_errors():
  with pytest.raises(ValueError, match=r"marks\[0\].*coord has 3 entries, but the image has 2 dimensions"):
    encode_marks((5, 5), [Point((1, 2, 3), label=0)])
  with pytest.raises(ValueError, match=r"label must be an integer, got 1.5"):
    encode_marks((5, 5), [Point((1, 2), label=1.5)])
  with pytest.raises(ValueError, match=r"label must be an integer, got True"):
    encode_marks((5, 5), [Point((1, 2), label=True)])
  with pytest.raises(ValueError, match=r"label must be >= 0, got -1"):
    encode_marks((5, 5), [Point((1, 2), label=-1)])
  with pytest.raises(ValueError, match=r"marks\[1\].*label is 3, but num_classes is 3"):
    encode_marks((5, 5), [Point((1, 2), label=2), Point((1, 2), label=3)], num_classes=3)
  with pytest.raises(ValueError, match=r"coord must be integers"):
    encode_marks((5, 5), [Point((1.0, 2.0), label=0)])
  with pytest.raises(ValueError, match=r"radius must be finite"):
    encode_marks((5, 5), [Point((1, 2), label=0, radius=-1)])
  with pytest.raises(ValueError, match=r"marks\[0\] is a dict, not a mark"):
    encode_marks((5, 5), [{"coord": (1, 2), "label": 0}])
  with pytest.raises(ValueError, match=r"shape must be"):
    encode_marks((5, 0), [])
  with pytest.raises(ValueError, match=r"marks\[0\] Scribble.*points must be an N x 2 array, got the ragged"):
    encode_marks((5, 5), [Scribble([(1, 2), (3,)], label=0)])
  with pytest.raises(ValueError, match="marks must be a mark or a sequence of marks, got NoneType"):
    encode_marks((5, 5), None)
  with pytest.raises(ValueError, match="axis applies to 3-D images only"):
    encode_marks((5, 5), [Polygon([(1, 1), (1, 4), (4, 4)], label=0, axis=2)])


def test_encode_accepts_single_mark_and_numpy_scalars():
  m = encode_marks((4, 4), Point(np.array([1, 2]), label=np.int64(1)))
  assert _pixels(m, 1) == {(1, 2)}
  assert (encode_marks((3, 3), []) == -1).all()


def test_encode_does_not_modify_inputs_and_marks_are_serialisable():
  points = np.array([[1, 1], [1, 6]])
  labels = np.full((8, 8), -1)
  labels[7, 7] = 0
  copies = points.copy(), labels.copy()
  marks = [Scribble(points, label=1, radius=1), LabelMap(labels)]
  encode_marks((8, 8), marks)
  np.testing.assert_array_equal(points, copies[0])
  np.testing.assert_array_equal(labels, copies[1])
  point = Point((1, 2), 3, 1.5)
  assert Point(**point._asdict()) == point


# ----------------------------------------------------------------------------------------------
# accumulate and validate_mark_map

def test_accumulate_keeps_earlier_and_new_overrides():
  prev = np.array([[0, -1, 1], [-1, -1, 2]])
  new = np.array([[-1, 3, 0], [-1, -1, -1]], np.int16)
  out = accumulate(prev, new)
  np.testing.assert_array_equal(out, [[0, 3, 0], [-1, -1, 2]])
  assert out.dtype == np.int32
  np.testing.assert_array_equal(prev, [[0, -1, 1], [-1, -1, 2]])


def test_accumulate_errors():
  with pytest.raises(ValueError, match=r"shape \(2, 3\).*shape \(3, 2\)"):
    accumulate(np.zeros((2, 3), int), np.zeros((3, 2), int))
  with pytest.raises(ValueError, match=r"new marks must be an integer array"):
    accumulate(np.zeros((2, 3), int), np.zeros((2, 3)))
  for too_big in (2 ** 32 + 1, 2 ** 32 - 1):                   # were wrapped to 1 and to -1 (unmarked)
    with pytest.raises(ValueError, match=f"new marks hold value {too_big}, too large"):
      accumulate(np.full((2, 3), -1, np.int64), np.full((2, 3), too_big, np.int64))


def test_validate_mark_map():
  marks = np.array([[-1, 0], [2, 1]], np.int64)
  out = validate_mark_map(marks, (2, 2), 3)
  assert out.dtype == np.int32 and out is not marks
  out[0, 0] = 1
  assert marks[0, 0] == -1                 # a copy
  out32 = np.zeros((2, 2), np.int32)
  assert validate_mark_map(out32, (2, 2), 1) is not out32


def test_validate_mark_map_errors():
  with pytest.raises(ValueError, match=r"marks must be an integer array"):
    validate_mark_map(np.zeros((2, 2), np.float32), (2, 2), 3)
  with pytest.raises(ValueError, match=r"marks must be an integer array"):
    validate_mark_map(np.zeros((2, 2), bool), (2, 2), 3)
  with pytest.raises(ValueError, match=r"shape \(2, 3\).*spatial shape is \(3, 2\)"):
    validate_mark_map(np.zeros((2, 3), np.int32), (3, 2), 3)
  with pytest.raises(ValueError, match=r"value 3.*num_classes=3"):
    validate_mark_map(np.array([[0, 3]]), (1, 2), 3)
  with pytest.raises(ValueError, match=r"value -2"):
    validate_mark_map(np.array([[0, -2]]), (1, 2), 3)


# ----------------------------------------------------------------------------------------------
# grow_marks

def _seed(shape, *points_labels):
  marks = np.full(shape, -1, np.int32)
  for point, label in points_labels:
    marks[point] = label
  return marks


def test_grow_fills_exactly_its_region_below_step_and_crosses_above():
  image = np.zeros((12, 16), np.float32)
  image[:, 8:] = 1.0                       # step of 1.0 between two flat regions
  marks = _seed(image.shape, ((3, 2), 1))
  grown = grow_marks(marks, image, threshold=0.9)
  np.testing.assert_array_equal(grown == 1, image == 0)
  assert (grown == 1).sum() == 12 * 8
  assert (grow_marks(marks, image, threshold=1.1) == 1).all()
  # Strictly less than the threshold: a difference equal to it does not join.
  np.testing.assert_array_equal(grow_marks(marks, image, threshold=1.0) == 1, image == 0)


def test_grow_two_labels_each_fill_own_region():
  image = np.zeros((10, 10))
  image[5:] = 5
  marks = _seed(image.shape, ((0, 0), 2), ((9, 9), 0))
  grown = grow_marks(marks, image, threshold=1)
  np.testing.assert_array_equal(grown, np.where(image == 0, 2, 0))


def test_grow_follows_ramp_by_current_pixel_not_seed():
  image = np.tile(np.arange(20, dtype=np.float64) * 0.1, (3, 1))   # increments of 0.1 per column
  marks = _seed(image.shape, ((1, 0), 1))
  threshold = 0.15
  grown = grow_marks(marks, image, threshold)
  assert (grown == 1).all()
  # Comparing with the seed's intensity would stop after one column: most pixels differ from the
  # seed by more than the threshold, yet they were reached.
  far_from_seed = np.abs(image - image[1, 0]) >= threshold
  assert far_from_seed.sum() == 3 * 18 and (grown[far_from_seed] == 1).all()
  # A single larger step in the ramp stops growth there.
  image[:, 10:] += 0.2
  np.testing.assert_array_equal(grow_marks(marks, image, threshold)[0], [1] * 10 + [-1] * 10)


def test_grow_connectivity_on_diagonal():
  image = np.ones((6, 6))
  np.fill_diagonal(image, 0.0)             # a diagonal line of 0 in a field of 1
  marks = _seed(image.shape, ((0, 0), 1))
  face = grow_marks(marks, image, threshold=0.5, connectivity=1)
  assert _pixels(face, 1) == {(0, 0)}
  full = grow_marks(marks, image, threshold=0.5, connectivity=2)
  assert _pixels(full, 1) == {(i, i) for i in range(6)}


def test_grow_3d_connectivities():
  image = np.ones((5, 5, 5))
  for i in range(5):
    image[i, i, i] = 0.0
  marks = _seed(image.shape, ((0, 0, 0), 0))
  assert (grow_marks(marks, image, 0.5, connectivity=1) == 0).sum() == 1
  assert (grow_marks(marks, image, 0.5, connectivity=2) == 0).sum() == 1
  assert (grow_marks(marks, image, 0.5, connectivity=3) == 0).sum() == 5
  flat = np.zeros((6, 7, 8))
  flat[3:] = 1.0
  grown = grow_marks(_seed(flat.shape, ((0, 0, 0), 1)), flat, 0.5)
  np.testing.assert_array_equal(grown == 1, flat == 0)


def test_grow_max_distance():
  image = np.zeros((9, 9))
  marks = _seed(image.shape, ((4, 4), 1))
  grown = grow_marks(marks, image, 1.0, max_distance=2)
  rows, cols = np.indices(image.shape)
  np.testing.assert_array_equal(grown == 1, np.abs(rows - 4) + np.abs(cols - 4) <= 2)
  grown = grow_marks(marks, image, 1.0, max_distance=2, connectivity=2)
  np.testing.assert_array_equal(grown == 1, np.maximum(np.abs(rows - 4), np.abs(cols - 4)) <= 2)
  np.testing.assert_array_equal(grow_marks(marks, image, 1.0, max_distance=0), marks)


def test_grow_max_pixels_per_class_in_raster_order():
  image = np.zeros((1, 12))
  marks = _seed(image.shape, ((0, 0), 1), ((0, 11), 0))
  grown = grow_marks(marks, image, 1.0, max_pixels=3)
  np.testing.assert_array_equal(grown[0], [1, 1, 1, 1, -1, -1, -1, -1, 0, 0, 0, 0])
  # A layer larger than the allowance: the first pixels in raster order.
  image = np.zeros((5, 5))
  grown = grow_marks(_seed(image.shape, ((2, 2), 0)), image, 1.0, max_pixels=2)
  assert _pixels(grown, 0) == {(2, 2), (1, 2), (2, 1)}
  big = grow_marks(_seed((30, 30), ((0, 0), 0), ((29, 29), 1)), np.zeros((30, 30)), 1.0,
                   max_pixels=100)
  assert (big == 0).sum() == 101 and (big == 1).sum() == 101


def test_grow_ties_lowest_label_wins():
  image = np.zeros((1, 5))
  for low, high in [((0, 0), (0, 4)), ((0, 4), (0, 0))]:
    marks = _seed(image.shape, (low, 0), (high, 3))
    grown = grow_marks(marks, image, 1.0)
    assert grown[0, 2] == 0


def test_grow_multichannel_uses_max_channel_difference():
  image = np.zeros((4, 8, 2))
  image[:, 4:, 1] = 1.0                    # step only in channel 1
  marks = _seed((4, 8), ((0, 0), 1))
  np.testing.assert_array_equal(grow_marks(marks, image, 0.5)[0], [1] * 4 + [-1] * 4)
  assert (grow_marks(marks, image, 1.5) == 1).all()


def test_grow_keeps_original_marks_and_leaves_inputs_unchanged():
  rng = np.random.default_rng(0)
  image = rng.random((16, 16)).astype(np.float32)
  marks = np.full((16, 16), -1, np.int32)
  marks[2:5, 2:5] = 0
  marks[10, 3:12] = 1
  marks[4, 5] = 2
  copies = image.copy(), marks.copy()
  grown = grow_marks(marks, image, 0.3, connectivity=2)
  np.testing.assert_array_equal(image, copies[0])
  np.testing.assert_array_equal(marks, copies[1])
  np.testing.assert_array_equal(grown[marks >= 0], marks[marks >= 0])
  assert grown.dtype == np.int32 and grown is not marks
  assert (grown >= 0).sum() > (marks >= 0).sum()


def test_grow_blocked_pixels_neither_join_nor_pass():
  image = np.zeros((5, 7), np.float32)                     # flat: everything could join
  marks = _seed((5, 7), ((2, 0), 1))
  blocked = np.zeros((5, 7), bool)
  blocked[:, 3] = True                                     # a wall across the image (earlier marks)
  blocked[2, 0] = True                                     # blocked, but marked now: still a seed
  grown = grow_marks(marks, image, 0.5, blocked=blocked)
  assert (grown[:, :3] == 1).all()                         # its side fills
  assert (grown[:, 3:] == -1).all()                        # the wall and everything behind it stay unmarked
  np.testing.assert_array_equal(grow_marks(marks, image, 0.5, blocked=np.zeros((5, 7), bool)),
                                grow_marks(marks, image, 0.5))
  with pytest.raises(ValueError, match=r"blocked must be a boolean map of the marks' shape \(5, 7\)"):
    grow_marks(marks, image, 0.5, blocked=blocked[:, :6])
  with pytest.raises(ValueError, match=r"blocked must be a boolean map"):
    grow_marks(marks, image, 0.5, blocked=blocked.astype(np.uint8))


def test_grow_integer_image_does_not_wrap():
  image = np.array([[0, 255, 254]], np.uint8)
  grown = grow_marks(_seed((1, 3), ((0, 2), 1)), image, 2)
  np.testing.assert_array_equal(grown, [[-1, 1, 1]])


def test_grow_errors():
  marks = _seed((4, 4), ((0, 0), 0))
  image = np.zeros((4, 4))
  with pytest.raises(ValueError, match=r"threshold must be finite and in \[0.0, inf\]"):
    grow_marks(marks, image, -0.1)
  with pytest.raises(ValueError, match=r"threshold must be finite"):
    grow_marks(marks, image, float("nan"))
  with pytest.raises(ValueError, match=r"threshold must be finite"):
    grow_marks(marks, image, float("inf"))
  bad = image.copy()
  bad[1, 1] = np.nan
  with pytest.raises(ValueError, match=r"image contains NaN or Inf"):
    grow_marks(marks, bad, 0.5)
  bad[1, 1] = np.inf
  with pytest.raises(ValueError, match=r"image contains NaN or Inf"):
    grow_marks(marks, bad, 0.5)
  with pytest.raises(ValueError, match=r"image has shape \(4, 5\).*spatial shape is \(4, 4\)"):
    grow_marks(marks, np.zeros((4, 5)), 0.5)
  with pytest.raises(ValueError, match=r"connectivity must be in \[1, 2\]"):
    grow_marks(marks, image, 0.5, connectivity=3)
  with pytest.raises(ValueError, match=r"marks must be an integer array"):
    grow_marks(marks.astype(float), image, 0.5)
  with pytest.raises(ValueError, match=r"max_pixels must be >= 0"):
    grow_marks(marks, image, 0.5, max_pixels=-1)
  with pytest.raises(ValueError, match=r"max_distance must be >= 0"):
    grow_marks(marks, image, 0.5, max_distance=-1)


def test_grow_512_whole_image():
  """A flat 512x512 image is grown from one corner through all 1023 layers (speed is benchmarked, not tested)."""
  rng = np.random.default_rng(1)
  image = np.zeros((512, 512), np.float32)
  marks = _seed(image.shape, ((0, 0), 0))
  grown = grow_marks(marks, image, 0.5)
  assert (grown == 0).all()
  noisy = rng.random((512, 512), np.float32)
  marks = _seed(image.shape, ((0, 0), 0), ((256, 256), 1), ((511, 0), 2))
  grown = grow_marks(marks, noisy, 0.6, connectivity=2)
  assert set(np.unique(grown)) <= {-1, 0, 1, 2} and (grown >= 0).sum() > 3
