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
  np.testing.assert_array_equal(session_store.take(tmp_path, doc, "network"), own)
  arrays = session_store.round_arrays(tmp_path, doc["rounds"][-1])
  np.testing.assert_array_equal(arrays["labels"], own)
  np.testing.assert_array_equal(arrays["tunable_0"], np.ones(3))  # the rest of the round is kept
  assert session_store.taken(arrays) == "network"
  session_store.take(tmp_path, doc, "merged")
  arrays = session_store.round_arrays(tmp_path, doc["rounds"][-1])
  np.testing.assert_array_equal(arrays["labels"], merged)
  assert session_store.taken(arrays) == "merged"
  with pytest.raises(ValueError, match="is one of merged, network"):
    session_store.take(tmp_path, doc, "refined")
  # a round stored before the refined network's labels were kept: nothing to choose between
  old = session_store.append_round(tmp_path, doc, {}, marks=marks, new_marks=marks, labels=merged, tunable=[])
  assert session_store.taken(session_store.round_arrays(tmp_path, old["rounds"][-1])) is None
  with pytest.raises(ValueError, match="refine again"):
    session_store.take(tmp_path, old, "network")
