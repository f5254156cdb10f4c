"""A session's stored initial segmentation and the merge's masks beside it."""

import numpy as np

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
