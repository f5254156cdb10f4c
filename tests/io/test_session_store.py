"""A session's stored initial segmentation and the merge's masks beside it."""

import numpy as np
import pytest

from scribblejax.io import session_store


def test_the_initial_segmentation_and_the_merge_masks_come_back_and_old_sessions_have_none(tmp_path):
  labels = np.arange(12, dtype=np.int32).reshape(3, 4) % 3
  unsure = labels == 1
  sure = labels == 2
  session_store.save_initial(tmp_path / "s", labels, unsure, sure)
  np.testing.assert_array_equal(session_store.load_initial(tmp_path / "s"), labels)
  np.testing.assert_array_equal(session_store.load_unsure(tmp_path / "s"), unsure)
  np.testing.assert_array_equal(session_store.load_sure(tmp_path / "s"), sure)
  session_store.save_initial(tmp_path / "old", labels)  # a session started before the masks were stored
  assert session_store.load_unsure(tmp_path / "old") is None and session_store.load_sure(tmp_path / "old") is None
  assert session_store.load_sure(tmp_path / "none") is None


def test_a_round_keeps_both_segmentations_and_take_switches_between_them(tmp_path):
  merged = np.array([[0, 1], [1, 1]], np.int32)
  own = np.array([[0, 0], [1, 2]], np.int32)
  marks = np.array([[-1, 1], [-1, -1]], np.int32)
  doc = session_store.new_session("img.png", "digest", "nuclei2d", (2, 2))
  with pytest.raises(ValueError, match="nothing to take"):
    session_store.take(tmp_path, doc, "network")
  doc = session_store.append_round(
    tmp_path, doc, {}, marks=marks, new_marks=marks, labels=merged, tunable=[np.ones(3)], network_labels=own
  )
  stored = session_store.round_arrays(tmp_path, doc["rounds"][-1])
  assert session_store.choices(stored) == ("merged", "network") and session_store.taken_of(stored) == "merged"
  np.testing.assert_array_equal(session_store.take(tmp_path, doc, "network"), own)
  arrays = session_store.round_arrays(tmp_path, doc["rounds"][-1])
  np.testing.assert_array_equal(arrays["labels"], own)
  assert session_store.taken_of(arrays) == "network"
  session_store.take(tmp_path, doc, "merged")  # back: the round's file holds what it held
  arrays = session_store.round_arrays(tmp_path, doc["rounds"][-1])
  assert sorted(arrays) == sorted(stored)
  for name in stored:
    np.testing.assert_array_equal(arrays[name], stored[name], err_msg=name)
  with pytest.raises(ValueError, match="is one of merged, network"):
    session_store.take(tmp_path, doc, "refined")
  with pytest.raises(ValueError, match="shows one of merged, network, mixed"):
    session_store.store_take(tmp_path, doc, stored, own, "both")
  with pytest.raises(ValueError, match="labels of shape"):
    session_store.store_take(tmp_path, doc, stored, own[:1], "network")
  mix = np.where(np.eye(2, dtype=bool), own, merged)  # as a region take leaves it: stored once, as given
  session_store.store_take(tmp_path, doc, stored, mix, "mixed")
  arrays = session_store.round_arrays(tmp_path, doc["rounds"][-1])
  np.testing.assert_array_equal(arrays["labels"], mix)
  assert session_store.taken_of(arrays) == "mixed" and arrays["labels"].dtype == np.int32
  np.testing.assert_array_equal(arrays["merged_labels"], merged)


def test_take_refuses_a_round_without_a_choice(tmp_path):
  labels, marks = np.zeros((2, 2), np.int32), np.full((2, 2), -1, np.int32)
  doc = session_store.new_session("img.png", "digest", "nuclei2d", (2, 2))
  add = dict(marks=marks, new_marks=marks, labels=labels, tunable=[])
  # without the merge the round's segmentation is the refined network's own: nothing else to take
  nomerge = session_store.append_round(tmp_path, doc, {}, **add, network_labels=labels, taken="network")
  assert session_store.choices(session_store.round_arrays(tmp_path, nomerge["rounds"][-1])) == ()
  with pytest.raises(ValueError, match="no merge to take"):
    session_store.take(tmp_path, nomerge, "merged")
  with pytest.raises(ValueError, match="refined without the merge: it has one segmentation"):
    session_store.take(tmp_path, nomerge, "network", np.ones((2, 2), bool))
  np.testing.assert_array_equal(session_store.take(tmp_path, nomerge, "network"), labels)
  # a round stored before the refined network's labels were kept
  old = session_store.append_round(tmp_path, doc, {}, **add)
  assert session_store.taken_of(session_store.round_arrays(tmp_path, old["rounds"][-1])) is None
  with pytest.raises(ValueError, match="older scribblejax"):
    session_store.take(tmp_path, old, "network")
  # a damaged one: it says which it shows, but lacks the labels
  np.savez_compressed(tmp_path / old["rounds"][-1]["file"], marks=marks, labels=labels, taken=np.array("merged"))
  with pytest.raises(ValueError, match="damaged: it lacks merged_labels, network_labels"):
    session_store.take(tmp_path, old, "network")


def test_a_whole_take_is_named_as_asked_even_where_the_two_segmentations_agree(tmp_path):
  labels, marks = np.zeros((2, 2), np.int32), np.full((2, 2), -1, np.int32)
  doc = session_store.new_session("img.png", "digest", "nuclei2d", (2, 2))
  doc = session_store.append_round(
    tmp_path, doc, {}, marks=marks, new_marks=marks, labels=labels, tunable=[], network_labels=labels.copy()
  )
  session_store.take(tmp_path, doc, "network")
  assert session_store.taken_of(session_store.round_arrays(tmp_path, doc["rounds"][-1])) == "network"


def test_take_where_stores_a_mix_region_by_region_and_names_it(tmp_path):
  merged = np.zeros((4, 6), np.int32)
  own = merged.copy()
  own[0, 0:2] = 1  # region A
  own[3, 4:6] = 2  # region B
  marks = np.full((4, 6), -1, np.int32)
  marks[2, 2] = 0
  doc = session_store.new_session("img.png", "digest", "nuclei2d", (4, 6))
  doc = session_store.append_round(
    tmp_path, doc, {}, marks=marks, new_marks=marks, labels=merged, tunable=[np.ones(3)], network_labels=own
  )
  stored = session_store.round_arrays(tmp_path, doc["rounds"][-1])
  where = np.zeros((4, 6), bool)
  where[0, 1] = True  # points at A
  mixed = session_store.take(tmp_path, doc, "network", where)
  expected = merged.copy()
  expected[0, 0:2] = 1
  np.testing.assert_array_equal(mixed, expected)
  arrays = session_store.round_arrays(tmp_path, doc["rounds"][-1])
  assert session_store.taken_of(arrays) == "mixed"
  np.testing.assert_array_equal(arrays["labels"], expected)
  np.testing.assert_array_equal(arrays["merged_labels"], merged)  # both kept
  where[3, 5] = True  # and B too: the network's own whole, and named so
  session_store.take(tmp_path, doc, "network", where)
  assert session_store.taken_of(session_store.round_arrays(tmp_path, doc["rounds"][-1])) == "network"
  session_store.take(tmp_path, doc, "merged", where)  # the merge back in both: the file as it was stored
  arrays = session_store.round_arrays(tmp_path, doc["rounds"][-1])
  for name in stored:
    np.testing.assert_array_equal(arrays[name], stored[name], err_msg=name)
  with pytest.raises(ValueError, match="touch no region"):
    session_store.take(tmp_path, doc, "network", np.eye(4, 6, dtype=bool) & (own == merged))


def test_a_round_keeps_why_its_merge_gave_each_pixel_its_label_and_names_a_bad_map(tmp_path):
  merged = np.array([[0, 1], [1, 1]], np.int32)
  marks = np.array([[-1, 1], [-1, -1]], np.int32)
  reasons = np.array([[0, 1], [2, 4]], np.uint8)  # kept, mark, new_marks, image
  doc = session_store.new_session("img.png", "digest", "nuclei2d", (2, 2))
  stored = dict(marks=marks, new_marks=marks, labels=merged, tunable=[np.ones(3)], network_labels=merged)
  doc = session_store.append_round(tmp_path, doc, {}, **stored, reasons=reasons.astype(np.int64))
  arrays = session_store.round_arrays(tmp_path, doc["rounds"][-1])
  assert session_store.reasons_of(arrays).dtype == np.uint8
  np.testing.assert_array_equal(session_store.reasons_of(arrays), reasons)
  session_store.take(tmp_path, doc, "network")  # a take keeps them (they are the merge's, whatever is shown)
  np.testing.assert_array_equal(
    session_store.reasons_of(session_store.round_arrays(tmp_path, doc["rounds"][-1])), reasons
  )
  unmerged = dict(stored, taken="network")  # a round without the merge: its labels are the network's, no reasons
  doc = session_store.append_round(tmp_path, doc, {}, **unmerged)
  assert session_store.reasons_of(session_store.round_arrays(tmp_path, doc["rounds"][-1])) is None
  files = sorted(p.name for p in tmp_path.iterdir())
  for bad, problem in (
    (reasons[:1], "of its labels' shape"),
    (reasons + 4, "codes 0 to 4"),
    (reasons > 0, "integer map"),
  ):
    with pytest.raises(ValueError, match=problem):
      session_store.append_round(tmp_path, doc, {}, **stored, reasons=bad)
  assert sorted(p.name for p in tmp_path.iterdir()) == files  # a refused round writes nothing
  fresh = session_store.new_session("img.png", "digest", "nuclei2d", (2, 2))
  with pytest.raises(ValueError, match="codes 0 to 4"):  # validated before the folder is made
    session_store.append_round(tmp_path / "new", fresh, {}, **stored, reasons=reasons + 4)
  assert not (tmp_path / "new").exists()
  with pytest.raises(ValueError, match="stored reasons are damaged"):  # a damaged file is named on reading
    session_store.reasons_of(dict(arrays, reasons=reasons[:1]))
