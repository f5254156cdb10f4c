"""Interaction sessions: rounds accumulate marks, undo, reset vs continue."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

import scribblejax as sj
from scribblejax.refinement.merge import REASONS, merge_round, new_marks_of

CFG = sj.RefineConfig.paper(max_steps=80, learning_rate=0.05, momentum=0.9, prox_weight=0.01)


def _setup():
  model = sj.UNet(spatial_dims=2, in_channels=1, num_classes=3, channels=(8, 16), rngs=nnx.Rngs(0))
  split = sj.split_params(model, sj.last_layers(3))
  image = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
  return split, image


def _round(shape, *items):
  return sj.encode_marks(shape, [sj.Point(coord, label, radius=1) for coord, label in items], num_classes=3)


def test_rounds_accumulate_and_undo_restores():
  split, image = _setup()
  session = sj.start_session(split, image, CFG)
  np.testing.assert_array_equal(np.asarray(sj.current_labels(session)), np.asarray(sj.predict(split, image)).argmax(-1))
  first = _round((16, 16), ((3, 3), 1), ((12, 12), 2))
  session = sj.add_marks(session, first)
  assert bool(session.rounds[-1].result.satisfied)
  labels1 = np.asarray(sj.current_labels(session))
  second = _round((16, 16), ((3, 12), 0), ((12, 3), 1))
  session = sj.add_marks(session, second)
  marks = sj.session.current_marks(session)
  # both rounds' marks are kept and honoured
  assert set(zip(*np.nonzero(first >= 0))) <= set(zip(*np.nonzero(marks >= 0)))
  labels2 = np.asarray(sj.current_labels(session))
  assert np.all(labels2[marks >= 0] == marks[marks >= 0])
  undone = sj.undo(session)
  assert len(undone.rounds) == 1
  np.testing.assert_array_equal(np.asarray(sj.current_labels(undone)), labels1)
  np.testing.assert_array_equal(sj.session.current_marks(undone), first)
  with pytest.raises(ValueError, match="nothing to undo"):
    sj.undo(sj.undo(undone))


def test_reset_restarts_from_w_and_continue_from_last():
  split, image = _setup()
  first = _round((16, 16), ((3, 3), 1))
  second = _round((16, 16), ((12, 12), 2))
  reset = sj.add_marks(sj.add_marks(sj.start_session(split, image, CFG), first), second)
  direct = sj.refine(split, image, sj.marks.accumulate(first, second), CFG)
  # with the paper's reset, round 2 is exactly a fresh refinement from W on all marks
  for a, b in zip(jax.tree.leaves(reset.rounds[-1].result.tunable), jax.tree.leaves(direct.tunable)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cont = sj.add_marks(sj.add_marks(sj.start_session(split, image, CFG, continue_weights=True), first), second)
  start = cont.rounds[0].result.tunable
  expected = sj.refine(split, image, sj.marks.accumulate(first, second), CFG, start=start)
  for a, b in zip(jax.tree.leaves(cont.rounds[-1].result.tunable), jax.tree.leaves(expected.tunable)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # both honour every mark, and the two modes really started from different weights
  assert bool(cont.rounds[-1].result.satisfied) and bool(reset.rounds[-1].result.satisfied)
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(split.tunable))
  )


def test_session_does_not_change_the_network():
  split, image = _setup()
  tunable = jax.tree.map(np.array, split.tunable)
  session = sj.add_marks(sj.start_session(split, image, CFG), _round((16, 16), ((3, 3), 1)))
  for a, b in zip(jax.tree.leaves(session.split.tunable), jax.tree.leaves(tunable)):
    np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("cache_trunk", [True, False])
def test_session_history_is_not_changed_through_the_callers_arrays(cache_trunk):
  split, image = _setup()
  config = dataclasses.replace(CFG, cache_trunk=cache_trunk)
  session = sj.start_session(split, image, config)
  initial = np.asarray(session.initial_logits).copy()
  image += 5.0  # the caller edits their own array after starting the session
  session = sj.add_marks(session, _round((16, 16), ((3, 3), 1)))
  expected = sj.refine(split, image - 5.0, session.rounds[-1].marks, config)
  np.testing.assert_allclose(
    np.asarray(session.rounds[-1].result.logits), np.asarray(expected.logits), rtol=1e-5, atol=1e-5
  )  # refined the image as it was given, not as edited
  np.testing.assert_array_equal(np.asarray(session.initial_logits), initial)
  marks = sj.session.current_marks(session)
  marks[0, 0] = 2  # editing what current_marks returned ...
  assert sj.session.current_marks(session)[0, 0] == -1 and session.rounds[-1].marks[0, 0] == -1  # ... changes no round
  with pytest.raises(ValueError, match="read-only"):
    session.rounds[-1].marks[0, 0] = 2


def test_take_shows_the_refined_networks_labels_and_the_next_round_merges_into_them():
  split, image = _setup()
  merging = dataclasses.replace(sj.RefineConfig(), max_steps=1)  # one step: the merge writes what the network missed
  first = _round((16, 16), ((3, 3), 1), ((12, 12), 2))
  session = sj.add_marks(sj.start_session(split, image, merging), first)
  merged, own = np.asarray(sj.current_labels(session)), np.asarray(session.rounds[-1].result.labels)
  assert (merged != own).any() and session.rounds[-1].taken == "merged"
  reasons, initial = session.rounds[-1].reasons, np.asarray(sj.current_labels(sj.start_session(split, image, merging)))
  assert (reasons[first >= 0] == REASONS.index("mark")).all()
  assert (reasons[merged != initial] != REASONS.index("kept")).all()  # every change has its reason
  taken = sj.session.take(session, "network")
  np.testing.assert_array_equal(np.asarray(sj.current_labels(taken)), own)
  np.testing.assert_array_equal(np.asarray(sj.current_labels(sj.session.take(taken, "merged"))), merged)
  # the next round merges into the labels shown: as after a first round without the merge
  second = _round((16, 16), ((3, 12), 0))
  nomerge = sj.add_marks(
    sj.start_session(split, image, merging), first, dataclasses.replace(merging, progressive_merge=False)
  )
  assert nomerge.rounds[-1].taken == "network" and nomerge.rounds[-1].reasons is None
  after = np.asarray(sj.current_labels(sj.add_marks(taken, second)))
  np.testing.assert_array_equal(after, np.asarray(sj.current_labels(sj.add_marks(nomerge, second))))
  assert (after != np.asarray(sj.current_labels(sj.add_marks(session, second)))).any()
  # a round without the merge shows the network's labels and has no merge to take
  np.testing.assert_array_equal(np.asarray(sj.current_labels(sj.session.take(nomerge, "network"))), own)
  with pytest.raises(ValueError, match="no merge to take"):
    sj.session.take(nomerge, "merged")
  with pytest.raises(ValueError, match="one of merged, network"):
    sj.session.take(session, "refined")
  with pytest.raises(ValueError, match="nothing to take"):
    sj.session.take(sj.start_session(split, image, merging), "network")


def _two_segmentations():
  """A round refined in one step: the merge writes the marks the network missed, so its two segmentations
  differ. Returns ``(split, image, config, session, merged, own)``."""
  split, image = _setup()
  merging = dataclasses.replace(sj.RefineConfig(), max_steps=1)
  session = sj.add_marks(sj.start_session(split, image, merging), _round((16, 16), ((3, 3), 1), ((12, 12), 2)))
  merged, own = np.asarray(sj.current_labels(session)), np.asarray(session.rounds[-1].result.labels)
  return split, image, merging, session, merged, own


def test_differences_rank_the_regions_a_take_can_point_at():
  split, image, merging, session, merged, own = _two_segmentations()
  regions, count = ndimage.label(merged != own)
  found = sj.session.differences(session)
  assert len(found) == count >= 2
  assert [d.size for d in found] == sorted(np.bincount(regions.ravel())[1:].tolist(), reverse=True)
  second = np.zeros(merged.shape, bool)
  second[found[1].point] = True  # the second largest region, pointed at by its point
  mixed = sj.session.take(session, "network", where=second)
  region = regions == regions[found[1].point]
  np.testing.assert_array_equal(np.asarray(sj.current_labels(mixed)), np.where(region, own, merged))
  assert (
    len(sj.session.differences(mixed)) == count - 1
    and sj.session.differences(mixed, "merged", 5)[0].size == found[1].size
  )
  assert sj.session.differences(sj.session.take(session, "network")) == ()
  with pytest.raises(ValueError, match="no round yet"):
    sj.session.differences(sj.start_session(split, image, merging))
  nomerge = sj.add_marks(
    sj.start_session(split, image, merging),
    _round((16, 16), ((3, 3), 1)),
    dataclasses.replace(merging, progressive_merge=False),
  )
  with pytest.raises(ValueError, match="refined without the merge"):
    sj.session.differences(nomerge)


def test_take_where_mixes_the_two_segmentations_region_by_region():
  split, image, merging, session, merged, own = _two_segmentations()
  regions, count = ndimage.label(merged != own)
  assert count >= 2  # two regions to choose between
  where = regions == 1
  mixed = sj.session.take(session, "network", where=where)
  assert mixed.rounds[-1].taken == "mixed"
  shown = np.asarray(sj.current_labels(mixed))
  np.testing.assert_array_equal(shown, np.where(regions == 1, own, merged))
  with pytest.raises(ValueError, match="read-only"):
    mixed.rounds[-1].shown[0, 0] = 1
  # the merge back in that region: the whole merge again, and said so
  back = sj.session.take(mixed, "merged", where=where)
  assert back.rounds[-1].taken == "merged" and back.rounds[-1].shown is None
  np.testing.assert_array_equal(np.asarray(sj.current_labels(back)), merged)
  # every region: the network's own, and said so
  every = sj.session.take(session, "network", where=regions > 0)
  assert every.rounds[-1].taken == "network"
  # the next round merges into the mix
  second = _round((16, 16), ((3, 12), 0))
  after = sj.add_marks(mixed, second)
  np.testing.assert_array_equal(
    np.asarray(sj.current_labels(after)),
    merge_round(
      shown,
      np.asarray(after.rounds[-1].result.labels),
      new_marks_of(after.rounds[-1].marks, mixed.rounds[-1].marks),
      after.rounds[-1].marks,
      merging,
      after.rounds[-1].result.logits,
      session.initial_logits,
      image=image,
    ).labels,
  )
  with pytest.raises(ValueError, match="touch no region"):
    sj.session.take(session, "network", where=(merged == own) & (regions == 0))
  unmerged = dataclasses.replace(merging, progressive_merge=False)
  nomerge = sj.add_marks(sj.start_session(split, image, merging), _round((16, 16), ((3, 3), 1)), unmerged)
  with pytest.raises(ValueError, match="refined without the merge: it has one segmentation"):
    sj.session.take(nomerge, "network", where=where)
