"""Progressive merge (a round changes the segmentation only where its marks asked) and the round's
report on its marks."""

import numpy as np
import pytest

import scribblejax as sj
from scribblejax.refinement import describe_marks, marks_report
from scribblejax.refinement.merge import (
  REASONS,
  changed_by,
  merge_masks,
  merge_round,
  merge_with_reasons,
  new_marks_of,
  progressive_merge,
  resembling,
  sure,
)


def test_only_changes_that_touch_a_new_mark_are_taken():
  previous = np.zeros((12, 12), np.int32)
  proposed = previous.copy()
  proposed[1:4, 1:4] = 1  # the change the mark asked for
  proposed[8:11, 8:11] = 1  # a change far from every mark (an over-correction)
  new = np.full((12, 12), -1, np.int32)
  new[2, 2] = 1
  merged = progressive_merge(previous, proposed, new)
  assert (merged[1:4, 1:4] == 1).all()
  assert (merged[8:11, 8:11] == 0).all()
  assert merged.dtype == np.int32


def test_every_mark_holds_even_where_the_network_disagrees():
  previous = np.zeros((6, 6), np.int32)
  proposed = previous.copy()
  marks = np.full((6, 6), -1, np.int32)
  marks[0, 0], marks[5, 5] = 1, 2  # the network honoured neither
  merged = progressive_merge(previous, proposed, marks, marks)
  assert merged[0, 0] == 1 and merged[5, 5] == 2 and (merged[1:5] == 0).all()


def test_a_change_that_touches_a_mark_is_taken_whole_and_new_marks_are_only_the_new_ones():
  previous = np.zeros((3, 20), np.int32)
  proposed = previous.copy()
  proposed[1, :] = 1  # one long region of change
  new = np.full((3, 20), -1, np.int32)
  new[1, 0] = 1
  assert (progressive_merge(previous, proposed, new)[1] == 1).all()
  earlier = np.full((3, 20), -1, np.int32)
  earlier[0, 0] = 0
  both = earlier.copy()
  both[1, 0] = 1
  np.testing.assert_array_equal(new_marks_of(both, earlier), new)
  np.testing.assert_array_equal(new_marks_of(both, None), both)
  with pytest.raises(ValueError, match="one shape"):
    progressive_merge(previous, proposed[:2], new)


def test_near_a_mark_only_the_sure_part_of_a_region_is_taken_and_far_only_the_very_sure():
  previous = np.zeros((1, 10), np.int32)
  proposed = np.ones((1, 10), np.int32)  # one region of change, touching the mark at its left end
  new = np.full((1, 10), -1, np.int32)
  new[0, 0] = 1
  near = np.zeros((1, 10), bool)
  near[0, :4] = True  # the refined network is sure of the first four pixels only
  merged = progressive_merge(previous, proposed, new, near=near)
  np.testing.assert_array_equal(merged[0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
  far = np.zeros((1, 10), bool)
  far[0, 8] = True  # very sure: taken although not near
  marks = new.copy()
  marks[0, 9] = 0
  merged = progressive_merge(previous, proposed, new, marks, free=far, near=near)
  np.testing.assert_array_equal(merged[0, 4:], [0, 0, 0, 0, 1, 0])
  with pytest.raises(ValueError, match="near pixels of shape"):
    progressive_merge(previous, proposed, new, near=near[:, :5])


def test_sure_and_the_masks_a_config_gives():
  p = np.array([[0.5, 0.5], [0.95, 0.05], [0.999, 0.001], [1.0, 0.0]], np.float32)
  np.testing.assert_array_equal(sure(p, 0.9), [False, True, True, True])
  assert sure(p, 0.0).all() and not sure(p, 1.0).any()  # 1 takes nothing, even a saturated softmax
  config = sj.RefineConfig(merge_near=0.9, merge_far=0.995, output="probabilities")  # scores given as a softmax
  free, near, protected = merge_masks(p, None, config)
  np.testing.assert_array_equal(near, [False, True, True, True])
  np.testing.assert_array_equal(free, [False, False, True, True])
  assert protected is None
  w = np.log(np.array([[0.6, 0.4], [0.99, 0.01], [0.98, 0.02], [0.98, 0.02]], np.float32))  # W's logits
  config = sj.RefineConfig(merge_confidence=0.8, merge_protect=0.99, output="probabilities")
  free, _, protected = merge_masks(p, w, config)
  np.testing.assert_array_equal(free, [True, False, True, True])  # W unsure, or refined very sure
  np.testing.assert_array_equal(protected, [False, True, False, False])  # W sure
  free, near, protected = merge_masks(None, w, sj.RefineConfig())
  assert free is None and near is None and protected is not None  # no refined distribution: whole regions
  with pytest.raises(ValueError, match="merge_far is a probability"):
    sj.RefineConfig(merge_far=1.5)


def test_very_sure_changes_are_taken_far_from_the_marks_and_the_networks_sure_pixels_stay():
  previous = np.zeros((1, 8), np.int32)
  proposed = np.ones((1, 8), np.int32)
  new = np.full((1, 8), -1, np.int32)
  new[0, 0] = 1  # marks of one class only: a sure change far away is still taken
  proposed[0, 1:3] = 0  # splits the change: pixels 3..7 are away from the mark
  free = np.zeros((1, 8), bool)
  free[0, 3:7] = True  # the refined network is very sure of pixels 3..6, not of 7
  merged = progressive_merge(previous, proposed, new, free=free)
  np.testing.assert_array_equal(merged[0], [1, 0, 0, 1, 1, 1, 1, 0])
  protected = np.zeros((1, 8), bool)
  protected[0, [0, 5]] = True  # the network was sure there: a mark still holds, a change does not
  merged = progressive_merge(previous, proposed, new, free=free, protected=protected)
  np.testing.assert_array_equal(merged[0], [1, 0, 0, 1, 1, 0, 1, 0])


def test_a_change_into_a_class_the_network_never_learnt_is_not_protected():
  previous = np.zeros((1, 6), np.int32)
  proposed = np.array([[2, 2, 2, 1, 1, 0]], np.int32)  # one region of change, touching the mark at 0
  new = np.full((1, 6), -1, np.int32)
  new[0, 0] = 2
  protected = np.ones((1, 6), bool)  # the network was sure of every pixel
  merged = progressive_merge(previous, proposed, new, protected=protected, new_classes=(2,))
  np.testing.assert_array_equal(merged[0], [2, 2, 2, 0, 0, 0])  # class 2 was appended: W knew nothing of it
  merged = progressive_merge(previous, proposed, new, protected=protected)
  np.testing.assert_array_equal(merged[0], [2, 0, 0, 0, 0, 0])
  # and back out of it: a pixel once given the appended class is not stuck there
  previous = np.array([[2, 2, 2, 2, 0, 0]], np.int32)
  proposed = np.array([[1, 1, 1, 1, 0, 0]], np.int32)
  new = np.array([[1, -1, -1, -1, -1, -1]], np.int32)
  merged = progressive_merge(previous, proposed, new, protected=protected, new_classes=(2,))
  np.testing.assert_array_equal(merged[0], [1, 1, 1, 1, 0, 0])


def test_a_round_from_the_scores_applies_the_thresholds_and_the_appended_classes():
  previous = np.zeros((1, 4), np.int32)
  proposed = np.array([[2, 2, 0, 0]], np.int32)
  new = np.array([[2, -1, -1, -1]], np.int32)
  initial = np.zeros((1, 4, 3), np.float32)
  initial[..., 0] = 20.0  # W was sure of class 0 everywhere: every pixel protected
  refined = np.zeros((1, 4, 3), np.float32)
  refined[0, :2, 2] = refined[0, 2:, 0] = 20.0  # the refined network is sure of its labels
  config = sj.RefineConfig()
  merged = merge_round(previous, proposed, new, new, config, refined, initial, new_classes=(2,)).labels
  np.testing.assert_array_equal(merged[0], [2, 2, 0, 0])
  kept = merge_round(previous, proposed, new, new, config, refined, initial).labels
  np.testing.assert_array_equal(kept[0], [2, 0, 0, 0])


def test_a_session_names_new_classes_the_network_does_not_output():
  split = sj.split_params(_tiny(), sj.last_layers(1))
  image = np.zeros((8, 8, 1), np.float32)
  assert sj.start_session(split, image, new_classes=[1]).new_classes == (1,)
  with pytest.raises(ValueError, match=r"new_classes \[2\] are not classes of the network, which outputs 2"):
    sj.start_session(split, image, new_classes=(2,))


def _tiny(seed=0):
  from flax import nnx

  return sj.UNet(spatial_dims=2, in_channels=1, num_classes=2, channels=(4, 8), rngs=nnx.Rngs(seed))


@pytest.mark.slow
def test_a_session_round_merges_and_reports(monkeypatch):
  model = _tiny()
  split = sj.split_params(model, sj.last_layers(2))
  image = np.random.default_rng(0).random((16, 16, 1)).astype(np.float32)
  marks = np.full((16, 16), -1, np.int32)
  marks[3, 3:9] = 1
  marks[12, 3:9] = 0
  config = sj.RefineConfig(max_steps=30, learning_rate=0.05)
  session = sj.add_marks(sj.start_session(split, image, config), marks)
  labels = np.asarray(sj.current_labels(session))
  before = np.asarray(np.argmax(session.initial_logits, -1))
  refined = np.asarray(session.rounds[-1].result.labels)
  import jax

  free, near, protected = merge_masks(session.rounds[-1].result.logits, session.initial_logits, config)
  np.testing.assert_array_equal(near, jax.nn.softmax(session.rounds[-1].result.logits, -1).max(-1) >= config.merge_near)
  masks = dict(free=free, near=near, protected=protected)
  expected = progressive_merge(before, refined, marks, marks, **masks, image=image, contrast=config.merge_contrast)
  np.testing.assert_array_equal(labels, expected)
  without = progressive_merge(before, refined, marks, marks, **masks)
  assert (labels != without).any()  # on this noise image the contrast step takes regions: it ran
  assert (labels[marks >= 0] == marks[marks >= 0]).all()
  paper = sj.add_marks(sj.start_session(split, image, sj.RefineConfig.paper(max_steps=30)), marks)
  np.testing.assert_array_equal(np.asarray(sj.current_labels(paper)), np.asarray(paper.rounds[-1].result.labels))


@pytest.mark.slow
def test_a_session_and_the_harness_hand_their_appended_classes_and_the_image_to_the_merge(monkeypatch):
  import scribblejax.research.baselines as bl
  import scribblejax.session as session_module

  seen = []
  for module in (session_module, bl):
    merge = module.merge_round
    record = lambda *a, _m=merge, **k: seen.append((a[7], k["image"].shape)) or _m(*a, **k)
    monkeypatch.setattr(module, "merge_round", record)
  model = _tiny()
  image = np.random.default_rng(0).random((16, 16, 1)).astype(np.float32)
  marks = np.full((16, 16), -1, np.int32)
  marks[3, 3:9] = 1
  config = sj.RefineConfig(max_steps=3)
  split = sj.split_params(model, sj.last_layers(2))
  sj.add_marks(sj.start_session(split, image, config, new_classes=(1,)), marks)
  method = bl.refine_method(model, 2, config, new_classes=(1,))
  method.update(method.init(image), marks)
  assert seen == [((1,), (16, 16, 1)), ((1,), (16, 16, 1))]


def test_the_report_names_why_marks_are_not_honoured():
  model = _tiny(1)
  split = sj.split_params(model, sj.last_layers(1))
  image = np.random.default_rng(1).random((16, 16, 1)).astype(np.float32)
  marks = np.full((16, 16), -1, np.int32)
  marks[2:14, 2:14] = np.random.default_rng(2).integers(0, 2, (12, 12))  # salt and pepper: unreachable
  config = sj.RefineConfig(max_steps=3)
  result = sj.refine(split, image, marks, config)
  report = marks_report(result, marks, config)
  assert not report.satisfied and report.honoured < 1.0
  assert set(report.per_class) == {0, 1}
  assert report.reason == "the step budget (3) ran out after 3 steps"
  line = describe_marks(report, ("background", "object"))
  assert "background" in line and "object" in line and "step budget" in line
  empty = np.full((16, 16), -1, np.int32)
  assert marks_report(sj.refine(split, image, empty, config), empty).satisfied
  assert describe_marks(marks_report(sj.refine(split, image, empty, config), empty)) == "every mark honoured"


def test_the_paper_preset_is_algorithm_1_as_it_was():
  paper = sj.RefineConfig.paper()
  assert (
    paper.optimizer,
    paper.learning_rate,
    paper.momentum,
    paper.prox_weight,
    paper.keep_weight,
    paper.max_steps,
    paper.progressive_merge,
  ) == ("sgd", 0.01, 0.9, 1.0, 0.0, 100, False)
  assert sj.RefineConfig.paper(max_steps=140).max_steps == 140
  with pytest.raises(ValueError, match="optimizer"):
    sj.RefineConfig(optimizer="lbfgs")


def test_take_where_takes_whole_regions_of_difference_that_the_pointed_pixels_touch():
  from scribblejax.refinement.merge import take_where

  shown = np.zeros((6, 10), np.int32)
  other = shown.copy()
  other[0:2, 0:3] = 1  # region A
  other[4:6, 6:10] = 2  # region B
  where = np.zeros((6, 10), bool)
  where[1, 1] = True  # one click inside A
  expected = shown.copy()
  expected[0:2, 0:3] = 1
  np.testing.assert_array_equal(take_where(shown, other, where), expected)
  where[5, 9] = True  # and one inside B: both
  np.testing.assert_array_equal(take_where(shown, other, where), other)
  with pytest.raises(ValueError, match="touch no region where the two segmentations differ"):
    take_where(shown, other, np.arange(60).reshape(6, 10) == 35)  # (3, 5): where the two agree
  with pytest.raises(ValueError, match="one shape"):
    take_where(shown, other[:5], where)
  with pytest.raises(ValueError, match="boolean mask"):
    take_where(shown, other, np.where(where, 1, -1))  # a marks map is no mask: -1 would point everywhere
  with pytest.raises(ValueError, match="already the one to take"):
    take_where(shown, shown.copy(), where)
  with pytest.raises(ValueError, match="where pixels of shape"):
    take_where(shown, other, where[:5])


def test_differences_lists_the_regions_largest_first_each_with_a_point_that_takes_it_alone():
  from scribblejax.refinement.merge import Difference, differences, take_where

  shown = np.zeros((12, 14), np.int32)
  other = shown.copy()
  other[1:6, 1:8] = 1  # A: 35 pixels, and a notch so that its deepest pixel is not its bounding box's centre
  other[1, 4] = 0
  other[9:11, 10:14] = 2  # B: 8 pixels
  other[8, 0:3] = 1  # C: 3 pixels, one wide
  shown[10, 0:2] = 2  # D: 2 pixels, the other way round
  found = differences(shown, other)
  assert [d.size for d in found] == [34, 8, 3, 2]
  assert [(d.shown, d.other) for d in found] == [(0, 1), (0, 2), (0, 1), (2, 0)]
  # the pixel deepest inside A: not its box's centre (3, 4), two pixels from the notch, but (3, 3), 2.24 from it
  assert found[0].point == (3, 3)
  for d in found:  # each point takes its own region and no other
    where = np.zeros(shown.shape, bool)
    where[d.point] = True
    taken = take_where(shown, other, where)
    assert int((taken != shown).sum()) == d.size and taken[d.point] == d.other
  assert differences(shown, other, 2) == found[:2] and differences(shown, other, 0) == ()
  assert differences(shown, shown.copy()) == ()
  mixed = np.zeros((1, 4), np.int32)
  mixed[0, :2], mixed[0, 2:] = 2, 1  # one region, half class 2, half class 1: the lower class is named
  assert differences(np.zeros_like(mixed), mixed)[0].other == 1
  ties = np.zeros((3, 7), np.int32)
  ties[0, 0] = ties[2, 6] = ties[0, 4] = 1  # three regions of one pixel: in C order
  assert [d.point for d in differences(np.zeros_like(ties), ties)] == [(0, 0), (0, 4), (2, 6)]
  volume = np.zeros((5, 5, 6), np.int32)
  volume[1:4, 1:4, 2:5] = 1
  assert differences(np.zeros_like(volume), volume) == (Difference(27, (2, 2, 3), 0, 1),)
  with pytest.raises(ValueError, match="one shape"):
    differences(shown, other[:5])
  with pytest.raises(ValueError, match="a count"):
    differences(shown, other, -1)


def _edge_image():
  """Dark columns 0..9, bright 10..19; the segmentation shown puts the edge at 12, the other at 10."""
  image = np.zeros((20, 20, 1))
  image[:, 10:] = 1.0
  shown = np.zeros((20, 20), np.int32)
  shown[:, 12:] = 1
  other = np.zeros((20, 20), np.int32)
  other[:, 10:] = 1
  return image, shown, other


def test_resembling_takes_a_region_that_looks_like_its_neighbours_of_the_other_class():
  image, shown, other = _edge_image()
  taken = resembling(image, shown, other, 0.2)
  np.testing.assert_array_equal(taken, shown != other)  # columns 10, 11 are bright: class 1's look
  np.testing.assert_array_equal(resembling(image[..., 0], shown, other, 0.2), taken)  # one channel, no axis
  assert not resembling(image, shown, other, 1.0).any()  # the score is at most 1
  wrong = other.copy()
  wrong[:, 8:] = 1  # columns 8..11: half dark, half bright, halfway between the two looks (score 0)
  assert not resembling(image, shown, wrong, 0.2).any()
  assert resembling(image, shown, wrong, -0.1).sum() == 80
  into_dark = other.copy()
  into_dark[:, 6:] = 1  # the edge moved into the dark: columns 6..9 look like class 0 (score -1)
  assert not resembling(image, other, into_dark, -0.9).any()
  assert not resembling(image, other, into_dark, -1.0).any()  # -1 is not above -1
  # two channels: the Euclidean distance over both
  two = np.concatenate([image, 1 - image], axis=-1)
  np.testing.assert_array_equal(resembling(two, shown, other, 0.2), taken)


def test_resembling_judges_only_regions_with_neighbours_of_both_classes():
  image, shown, other = _edge_image()
  alone = np.ones((20, 20), np.int32)  # every pixel class 1 in the other: no neighbour is left to read
  assert not resembling(image, shown, alone, -1.0).any()
  with pytest.raises(ValueError, match="label maps of its spatial shape"):
    resembling(image[:, :5], shown, other, 0.2)
  with pytest.raises(ValueError, match="at least 1"):
    resembling(image, shown, other, 0.2, ring=0)


def test_the_merge_takes_resembling_regions_but_not_protected_nor_marked_pixels():
  image, shown, other = _edge_image()
  no_marks = np.full((20, 20), -1, np.int32)
  merged = progressive_merge(shown, other, no_marks, image=image, contrast=0.2)
  np.testing.assert_array_equal(merged, other)  # the change touches no mark; the image alone takes it
  np.testing.assert_array_equal(progressive_merge(shown, other, no_marks), shown)  # without the image: kept
  np.testing.assert_array_equal(progressive_merge(shown, other, no_marks, image=image, contrast=1.0), shown)
  protected = np.zeros((20, 20), bool)
  protected[:10] = True
  earlier = no_marks.copy()
  earlier[15, 10] = 0  # an earlier round's mark: not new, so the region is no near take of this round
  merged = progressive_merge(shown, other, no_marks, earlier, protected=protected, image=image, contrast=0.2)
  assert (merged[:10] == shown[:10]).all()  # the network was sure there
  assert merged[15, 10] == 0  # marked
  assert (merged[10:15, 10:12] == 1).all() and (merged[16:, 10:12] == 1).all()  # taken by the contrast step
  np.testing.assert_array_equal(
    progressive_merge(shown, other, no_marks, earlier, protected=protected)[10:], shown[10:]
  )


def test_merge_contrast_is_a_score_in_minus_one_to_one():
  assert sj.RefineConfig().merge_contrast == 0.1
  assert sj.RefineConfig(merge_contrast=-1).merge_contrast == -1
  for bad in (1.5, -2, float("nan"), "0.2", True):
    with pytest.raises(ValueError, match="merge_contrast is a score in"):
      sj.RefineConfig(merge_contrast=bad)


def test_resembling_works_in_3d_and_reads_no_neighbour_without_an_intensity():
  image, shown, other = _edge_image()
  volume = np.repeat(image[None], 3, axis=0)  # three equal slices
  taken = resembling(volume, np.repeat(shown[None], 3, axis=0), np.repeat(other[None], 3, axis=0), 0.2)
  np.testing.assert_array_equal(taken, np.repeat((shown != other)[None], 3, axis=0))
  flat = np.zeros_like(image)  # both neighbourhoods look the same: not judged
  assert not resembling(flat, shown, other, -1.0).any()
  unread = image.copy()
  unread[:, 12:] = np.nan  # the class-1 neighbours have no intensity (outside a crop): not judged
  assert not resembling(unread, shown, other, -1.0).any()
  unread[:, 14:] = np.nan
  unread[:, 12:14] = 1.0  # two columns of class-1 neighbours are left: judged on them alone
  np.testing.assert_array_equal(resembling(unread, shown, other, 0.2), taken[0])


def test_the_reasons_name_what_changed_each_pixel_and_kept_for_every_pixel_left_as_it_was():
  previous = np.zeros((1, 8), np.int32)
  proposed = np.array([[1, 1, 1, 0, 0, 0, 1, 0]], np.int32)
  new = np.full((1, 8), -1, np.int32)
  new[0, 0] = 1
  free = np.ones((1, 8), bool)  # the refined network sure everywhere, of changed and unchanged pixels alike
  protected = np.zeros((1, 8), bool)
  protected[0, 2] = True  # W was sure of pixel 2: the change there is kept out
  merged = merge_with_reasons(previous, proposed, new, free=free, protected=protected)
  np.testing.assert_array_equal(merged.labels[0], [1, 1, 0, 0, 0, 0, 1, 0])
  assert [REASONS[r] for r in merged.reasons[0]] == [
    "mark",
    "new_marks",
    "kept",
    "kept",
    "kept",
    "kept",
    "sure",
    "kept",
  ]
  assert changed_by(merged, previous) == {"mark": 1, "new_marks": 1, "sure": 1, "image": 0}
  np.testing.assert_array_equal(
    progressive_merge(previous, proposed, new, free=free, protected=protected), merged.labels
  )
