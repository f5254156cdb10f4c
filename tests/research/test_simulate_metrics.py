"""The simulated user and the metrics."""

import numpy as np
import pytest
from scipy import ndimage

from scribblejax.research import metrics
from scribblejax.research.simulate import simulate_marks


def _disk(shape, centre, radius):
  grid = np.indices(shape)
  return ((grid - np.array(centre).reshape(-1, *([1] * len(shape)))) ** 2).sum(0) <= radius**2


def test_dice_and_noc():
  truth = np.zeros((10, 10), int)
  truth[:5] = 1
  pred = np.zeros((10, 10), int)
  pred[:4] = 1
  d = metrics.dice_per_class(pred, truth, 3)
  assert d[1] == pytest.approx(2 * 40 / 90) and np.isnan(d[2])
  assert metrics.mean_foreground_dice(pred, truth, 3) == pytest.approx(2 * 40 / 90)
  assert metrics.noc([0.5, 0.8, 0.92, 0.95], 0.9) == 2
  assert metrics.noc([0.5, 0.8], 0.9, cap=20) == 20
  with pytest.raises(ValueError, match="differ"):
    metrics.dice_per_class(pred, truth[:5], 2)
  three = truth.copy()
  three[0, 0] = 3
  with pytest.raises(ValueError, match=r"ground truth holds labels 0..3, outside \[0, 2\)"):
    metrics.mean_foreground_dice(pred, three, 2)  # was 1.0: the class-3 pixel was not counted
  with pytest.raises(ValueError, match="prediction must be an integer label map"):
    metrics.dice_per_class(pred + 0.4, truth, 2)  # was Dice 0 for every class
  with pytest.raises(ValueError, match="num_classes"):
    metrics.dice_per_class(pred, truth, 0)


@pytest.mark.parametrize("kind", ["scribble", "point", "box"])
def test_simulated_user_marks_errors_with_true_class_2d(kind):
  truth = np.zeros((40, 40), np.int32)
  truth[_disk((40, 40), (12, 12), 7)] = 1  # missed entirely by the prediction
  truth[_disk((40, 40), (28, 28), 6)] = 2
  pred = np.zeros_like(truth)
  pred[_disk((40, 40), (28, 28), 6)] = 2
  pred[30:38, 2:10] = 1  # a false positive of class 1 (background truth)
  marks = simulate_marks(pred, truth, 3, kind=kind)
  marked = marks >= 0
  assert marked.any()
  assert np.all(marks[marked] == truth[marked])  # every kind of mark carries the true class
  if kind != "box":
    assert np.all(pred[marked] != truth[marked])  # points and scribbles lie only on errors
  assert (marks == 1).any() and (marks == 0).any()  # both error classes marked in one interaction
  assert not (marks == 2).any()  # class 2 is right: nothing marked
  again = simulate_marks(pred, truth, 3, kind=kind)
  np.testing.assert_array_equal(marks, again)  # deterministic


def test_simulated_box_is_clipped_to_the_truth_where_its_ring_crosses_the_object():
  truth = np.zeros((16, 16), np.int32)
  truth[2:14, 4:12] = 1
  pred = truth.copy()
  pred[8:14] = 0  # the object's lower half is missed
  marks = simulate_marks(pred, truth, 2, kind="box", ignore_border=0)
  ring_on_object = (truth == 1) & (pred == 1) & (np.arange(16)[:, None] >= 6)
  assert (marks[ring_on_object] == -1).all()  # the ring above the box would say "background" there
  assert (marks == 1).any() and (marks == 0).any()  # the core and the rest of the ring remain
  assert np.all(marks[marks >= 0] == truth[marks >= 0])


def test_simulated_user_3d_and_perfect_prediction():
  truth = np.zeros((9, 20, 20), np.int32)
  truth[2:7, 5:15, 5:15] = 1
  pred = np.zeros_like(truth)
  marks = simulate_marks(pred, truth, 2, kind="scribble")
  marked_slices = np.unique(np.nonzero(marks >= 0)[0])
  assert len(marked_slices) == 1 and 2 <= marked_slices[0] <= 6
  assert np.all(marks[marks >= 0] == 1)
  assert (simulate_marks(truth, truth, 2) == -1).all()
  with pytest.raises(ValueError, match="kind"):
    simulate_marks(pred, truth, 2, kind="lasso")


def _missed_object(shape=(30, 30)):
  truth = np.zeros(shape, np.int32)
  truth[_disk(shape, (10, 10), 6)] = 1
  truth[_disk(shape, (22, 22), 4)] = 1
  return truth


def test_a_2d_slice_stored_with_a_singleton_axis_gets_the_same_marks():
  # the H x W x 1 copy of a slice used to erode to nothing in 3-D: no marks at all, silently
  truth = _missed_object()
  pred = np.zeros_like(truth)
  flat = simulate_marks(pred, truth, 2, kind="scribble")
  for axis in (0, 2):
    stacked = simulate_marks(np.expand_dims(pred, axis), np.expand_dims(truth, axis), 2, kind="scribble")
    assert stacked.shape == np.expand_dims(pred, axis).shape
    np.testing.assert_array_equal(np.squeeze(stacked, axis), flat)
  assert (flat == 1).sum() >= 5


def test_pixels_marked_already_are_never_marked_again():
  truth = _missed_object()
  pred = np.zeros_like(truth)
  first = simulate_marks(pred, truth, 2, kind="point", per_class=False, radius=0)
  second = simulate_marks(pred, truth, 2, kind="point", per_class=False, radius=0, marked=first >= 0)
  assert (first >= 0).sum() == 1 and (second >= 0).sum() == 1
  assert not ((first >= 0) & (second >= 0)).any()  # the same unhonoured pixel is not drawn twice
  everything = simulate_marks(pred, truth, 2, kind="scribble", marked=truth == 1)
  assert (everything == -1).all()  # every error marked already: nothing new


def test_click_is_one_point_at_the_centre_of_the_largest_error():
  truth = _missed_object()
  pred = np.zeros_like(truth)
  pred[0:4, 20:30] = 1  # a smaller false positive
  clicks = simulate_marks(pred, truth, 2, kind="click", radius=0)
  assert np.argwhere(clicks >= 0).tolist() == [[10, 10]] and clicks[10, 10] == 1


def test_cvpr25_user_boxes_the_object_first_then_clicks():
  from scribblejax.research.simulate import robot_marks

  truth = _missed_object()
  pred = np.zeros_like(truth)
  boxes = robot_marks("cvpr25", 1, pred, truth, 2)
  core = boxes == 1
  assert core.any() and (boxes == 0).any()  # the box's core and its ring of background
  assert np.all(truth[boxes >= 0] == boxes[boxes >= 0])
  click = robot_marks("cvpr25", 2, pred, truth, 2, radius=0)
  assert (click >= 0).sum() == 1
  with pytest.raises(ValueError, match="robot user"):
    robot_marks("lasso", 1, pred, truth, 2)


def test_kinds_and_robot_users_are_registries():
  from scribblejax.research import simulate

  assert simulate.KINDS == ("scribble", "point", "box", "click", "object_box") == tuple(simulate.MARK_KINDS)
  users = simulate.ROBOT_USER_SCHEDULES
  assert simulate.ROBOT_USERS == ("scribble", "point", "box", "click", "cvpr25") == tuple(users)
  assert [users["cvpr25"](i) for i in (1, 2, 3)] == ["object_box", "click", "click"]
  assert all(users[u](4) == u for u in simulate.ROBOT_USERS if u != "cvpr25")
  assert {users[u](i) for u in simulate.ROBOT_USERS for i in (1, 2)} <= set(simulate.KINDS)
  # a new kind is a drawing function on each class's largest error region
  centre = simulate.per_error_region(lambda region, c, truth, out, options: np.where(region, c, out))
  truth = _missed_object()
  pred = np.zeros_like(truth)
  options = simulate.UserOptions(
    radius=1, max_length=40, per_class=True, ignore_border=0, marked=np.zeros(truth.shape, bool)
  )
  filled = centre(pred, truth, 2, options)
  labelled, _ = ndimage.label((truth == 1) & (pred != 1))
  largest = labelled == np.argmax(np.bincount(labelled.ravel())[1:]) + 1
  np.testing.assert_array_equal(filled == 1, largest)  # the class's largest error region, whole
