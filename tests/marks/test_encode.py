"""encode_marks in general, accumulate and validate_mark_map."""

import numpy as np
import pytest

from scribblejax.marks import LabelMap, Point, Polygon, Scribble, accumulate, encode_marks, validate_mark_map


def _pixels(marks, label):
  return {tuple(int(v) for v in p) for p in np.argwhere(marks == label)}


# ----------------------------------------------------------------------------------------------
# encode_marks in general


def test_later_marks_overwrite_earlier():
  m = encode_marks((10, 10), [Scribble([(5, 0), (5, 9)], label=0, radius=0), Point((5, 5), label=1, radius=1)])
  assert m[5, 5] == 1 and m[5, 4] == 1 and m[5, 3] == 0
  m = encode_marks((10, 10), [Point((5, 5), label=1, radius=1), Scribble([(5, 0), (5, 9)], label=0, radius=0)])
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
  for too_big in (2**32 + 1, 2**32 - 1):  # were wrapped to 1 and to -1 (unmarked)
    with pytest.raises(ValueError, match=f"new marks hold value {too_big}, too large"):
      accumulate(np.full((2, 3), -1, np.int64), np.full((2, 3), too_big, np.int64))


def test_validate_mark_map():
  marks = np.array([[-1, 0], [2, 1]], np.int64)
  out = validate_mark_map(marks, (2, 2), 3)
  assert out.dtype == np.int32 and out is not marks
  out[0, 0] = 1
  assert marks[0, 0] == -1  # a copy
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
