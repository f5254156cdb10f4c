"""The round's segmentation on the image's grid: the progressive merge with the refined network's sure pixels."""

import numpy as np

from scribblejax.config import RefineConfig
from scribblejax.io.images import Geometry, Image
from scribblejax.pipeline import InputSpec, fit_image
from scribblejax.pipeline.round import round_labels
from scribblejax.refinement.merge import REASONS, Merged, changed_by


def _fitted(shape, array=None):
  array = np.ones((*shape, 1), np.float32) if array is None else array
  return fit_image(
    Image(array, Geometry("tiff", shape, "yx", (1.0, 1.0), None, {}), "img.tif"), InputSpec(2, 1, 2), {"kind": "none"}
  )


def _logits(p_object):
  """Two-class logits whose softmax gives the object class ``p_object``."""
  p = np.clip(np.asarray(p_object, np.float64), 1e-7, 1 - 1e-7)
  return np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=-1).astype(np.float32)


def test_a_round_takes_the_sure_part_near_a_new_mark_and_very_sure_changes_anywhere():
  fitted = _fitted((1, 12))
  # the refined network calls pixels 0..6 and 8..11 object: sure near the new mark at 0 (0..3: 0.95),
  # weakly beyond it (0.6), very sure at pixel 10, in a change (8..11) that touches no new mark
  p = np.full((1, 12), 0.6)
  p[0, :4], p[0, 7], p[0, 10] = 0.95, 0.2, 0.999
  previous = np.zeros((1, 12), np.int32)
  marks = np.full((1, 12), -1, np.int32)
  marks[0, 0] = 1
  labels, network, reasons = round_labels(_logits(p), fitted, RefineConfig(), previous, marks, None)
  assert (network == (p > 0.5)).all()
  np.testing.assert_array_equal(labels[0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0])  # the far sure one too
  why = [REASONS[r] for r in reasons[0]]
  assert why[:4] == ["mark", "new_marks", "new_marks", "new_marks"] and why[10] == "sure"
  assert set(why[4:10] + why[11:]) == {"kept"}
  earlier = np.full((1, 12), -1, np.int32)
  earlier[0, 11] = 0  # an earlier round's mark of the other class
  marks[0, 11] = 0
  labels, *_ = round_labels(_logits(p), fitted, RefineConfig(), previous, marks, earlier)
  np.testing.assert_array_equal(labels[0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0])
  no_far = RefineConfig(merge_far=1.0)
  labels, *_ = round_labels(_logits(p), fitted, no_far, previous, marks, earlier)
  np.testing.assert_array_equal(labels[0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
  protected = np.zeros((1, 12), bool)
  protected[0, [2, 10]] = True  # the network was sure there
  labels, *_ = round_labels(_logits(p), fitted, RefineConfig(), previous, marks, earlier, None, protected)
  np.testing.assert_array_equal(labels[0], [1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
  plain = RefineConfig(merge_near=0.0, merge_far=1.0)  # FocalClick's merge: the touching region whole
  labels, *_ = round_labels(_logits(p), fitted, plain, previous, marks, earlier)
  np.testing.assert_array_equal(labels[0], [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
  probabilities = RefineConfig(output="probabilities")  # the refined scores are a softmax already
  softmax = np.stack([1 - p, p], axis=-1).astype(np.float32)
  labels, *_ = round_labels(softmax, fitted, probabilities, previous, marks, earlier)
  np.testing.assert_array_equal(labels[0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0])


def test_a_round_lets_an_appended_class_past_the_protection():
  fitted = _fitted((1, 6))
  # three classes; the refined network is sure of class 2 on pixels 0..2 and of class 1 on 3..4
  logits = np.full((1, 6, 3), -8.0, np.float32)
  logits[0, :3, 2] = logits[0, 3:5, 1] = logits[0, 5, 0] = 8.0
  previous = np.zeros((1, 6), np.int32)
  marks = np.full((1, 6), -1, np.int32)
  marks[0, 0] = 2
  protected = np.ones((1, 6), bool)  # the network was sure of every pixel
  labels, *_ = round_labels(logits, fitted, RefineConfig(), previous, marks, None, None, protected, new_classes=(2,))
  np.testing.assert_array_equal(labels[0], [2, 2, 2, 0, 0, 0])
  labels, *_ = round_labels(logits, fitted, RefineConfig(), previous, marks, None, None, protected)
  np.testing.assert_array_equal(labels[0], [2, 0, 0, 0, 0, 0])


def test_a_round_takes_a_change_away_from_the_marks_that_looks_like_the_class_it_takes():
  # dark pixels 0..5, bright 6..11; the segmentation so far has the bright object from pixel 8 on
  image = np.where(np.arange(12) >= 6, 1.0, 0.0).reshape(1, 12, 1).astype(np.float32)
  fitted = _fitted((1, 12), image)
  p = np.where(np.arange(12) >= 6, 0.7, 0.1).reshape(1, 12)  # the refined network, unsure, moves the edge to 6
  previous = (np.arange(12) >= 8).astype(np.int32).reshape(1, 12)
  marks = np.full((1, 12), -1, np.int32)
  marks[0, 0] = 0  # a new mark far from the change
  labels, _, reasons = round_labels(_logits(p), fitted, RefineConfig(), previous, marks, None)
  np.testing.assert_array_equal(labels[0], np.arange(12) >= 6)  # pixels 6, 7 look like the object: taken
  assert [REASONS[r] for r in reasons[0, 5:9]] == ["kept", "image", "image", "kept"]
  assert changed_by(Merged(labels, reasons), previous) == {"mark": 0, "new_marks": 0, "sure": 0, "image": 2}
  labels, *_ = round_labels(_logits(p), fitted, RefineConfig(merge_contrast=1.0), previous, marks, None)
  np.testing.assert_array_equal(labels, previous)
