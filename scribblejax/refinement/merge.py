"""A round's segmentation: the refined network's labels where the new marks asked for a change.

Refining a network on a few marked pixels moves its decision everywhere: besides the region the user
corrected, hundreds of small regions far from any mark can flip, and where the network was good most
of those flips are wrong (``docs/correction.md`` has the measurement). The user asked for none of
those. So a round keeps the previous segmentation except in the connected
regions of change that touch one of this round's new marks, where it takes the refined labels: the
progressive merge of FocalClick (Chen et al., "FocalClick: Towards Practical Interactive Image
Segmentation", CVPR 2022), which updates only the connected regions that contain the new clicks.
Where the network itself was unsure (its top class probability below ``merge_confidence``), the
refined labels are taken wherever they lie: there a change no mark asked for was more often right
than wrong on the benchmark's cases, where the network was sure, more often wrong. Every marked pixel
then takes its mark: what the user drew holds in the segmentation whether or not the network's argmax
honours it (the round's report says which).

A change that the marks do ask for is never cut off: a region of change that touches a new mark is
taken whole, however far it reaches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage


def progressive_merge(
  previous: Any, proposed: Any, new_marks: Any, marks: Any | None = None, *, free: Any | None = None
) -> np.ndarray:
  """The round's labels: ``proposed`` in the changed regions that touch a new mark, ``previous`` elsewhere.

  Args:
    previous: ``int[*spatial]``, the segmentation before this round.
    proposed: ``int[*spatial]``, the refined network's labels.
    new_marks: ``int[*spatial]``, this round's marks (-1 unmarked).
    marks: ``int[*spatial]``, every mark so far (``None``: ``new_marks``); each marked pixel takes its mark.
    free: ``bool[*spatial]``, pixels that take ``proposed`` wherever they lie (see :func:`unsure`).

  Returns:
    ``int32[*spatial]``.

  Raises:
    ValueError: the maps differ in shape.
  """
  previous, proposed, new_marks = np.asarray(previous), np.asarray(proposed), np.asarray(new_marks)
  marks = new_marks if marks is None else np.asarray(marks)
  shapes = {previous.shape, proposed.shape, new_marks.shape, marks.shape}
  if len(shapes) != 1:
    raise ValueError(f"progressive_merge needs label maps of one shape, got {sorted(shapes)}")
  changed = proposed != previous
  regions, _ = ndimage.label(changed)
  asked = np.unique(regions[(new_marks >= 0) & changed])
  taken = np.isin(regions, asked[asked > 0])
  if free is not None:
    free = np.asarray(free, bool)
    if free.shape != previous.shape:
      raise ValueError(f"free pixels of shape {free.shape} and labels of shape {previous.shape} differ")
    taken |= free
  merged = np.where(taken, proposed, previous)
  return np.where(marks >= 0, marks, merged).astype(np.int32)


def unsure(probabilities: Any, confidence: float) -> np.ndarray:
  """Pixels whose top class probability is below ``confidence``: where the network was unsure.

  Where the network was sure, a change no mark asked for was, on the benchmark's cases, more often
  wrong than right; where it was unsure, more often right (``docs/correction.md``). So a round lets
  the refined network relabel unsure pixels anywhere (``free=`` of :func:`progressive_merge`).

  Args:
    probabilities: ``float[*spatial, classes]`` (a softmax).
    confidence: in ``[0, 1]``; 0 frees no pixel, 1 every pixel.
  """
  return np.asarray(probabilities).max(axis=-1) < confidence


def new_marks_of(marks: Any, earlier: Any | None) -> np.ndarray:
  """The marks of ``marks`` that ``earlier`` (the marks before this round, or ``None``) did not hold."""
  marks = np.asarray(marks)
  if earlier is None:
    return marks.astype(np.int32)
  return np.where(np.asarray(earlier) == marks, -1, marks).astype(np.int32)
