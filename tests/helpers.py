"""Small helpers shared by test files (importable because pytest puts ``tests/`` on the path)."""

import numpy as np


def foreground_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
  """Mean Dice over the foreground classes present in either map.

  Written out here rather than taken from ``scribblejax.research.metrics``, so a test that checks a
  reported Dice does not check the library against itself.
  """
  scores = []
  for c in range(1, num_classes):
    p, t = pred == c, truth == c
    if p.any() or t.any():
      scores.append(2.0 * np.sum(p & t) / (np.sum(p) + np.sum(t)))
  return float(np.mean(scores))
