"""grow_marks: region growing from the marks into pixels of similar intensity."""

import numpy as np
import pytest

from scribblejax.marks import grow_marks


def _pixels(marks, label):
  return {tuple(int(v) for v in p) for p in np.argwhere(marks == label)}


# grow_marks


def _seed(shape, *points_labels):
  marks = np.full(shape, -1, np.int32)
  for point, label in points_labels:
    marks[point] = label
  return marks


def test_grow_fills_exactly_its_region_below_step_and_crosses_above():
  image = np.zeros((12, 16), np.float32)
  image[:, 8:] = 1.0  # step of 1.0 between two flat regions
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
  image = np.tile(np.arange(20, dtype=np.float64) * 0.1, (3, 1))  # increments of 0.1 per column
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
  np.fill_diagonal(image, 0.0)  # a diagonal line of 0 in a field of 1
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
  big = grow_marks(_seed((30, 30), ((0, 0), 0), ((29, 29), 1)), np.zeros((30, 30)), 1.0, max_pixels=100)
  assert (big == 0).sum() == 101 and (big == 1).sum() == 101


def test_grow_ties_lowest_label_wins():
  image = np.zeros((1, 5))
  for low, high in [((0, 0), (0, 4)), ((0, 4), (0, 0))]:
    marks = _seed(image.shape, (low, 0), (high, 3))
    grown = grow_marks(marks, image, 1.0)
    assert grown[0, 2] == 0


def test_grow_multichannel_uses_max_channel_difference():
  image = np.zeros((4, 8, 2))
  image[:, 4:, 1] = 1.0  # step only in channel 1
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
  image = np.zeros((5, 7), np.float32)  # flat: everything could join
  marks = _seed((5, 7), ((2, 0), 1))
  blocked = np.zeros((5, 7), bool)
  blocked[:, 3] = True  # a wall across the image (earlier marks)
  blocked[2, 0] = True  # blocked, but marked now: still a seed
  grown = grow_marks(marks, image, 0.5, blocked=blocked)
  assert (grown[:, :3] == 1).all()  # its side fills
  assert (grown[:, 3:] == -1).all()  # the wall and everything behind it stay unmarked
  np.testing.assert_array_equal(
    grow_marks(marks, image, 0.5, blocked=np.zeros((5, 7), bool)), grow_marks(marks, image, 0.5)
  )
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
