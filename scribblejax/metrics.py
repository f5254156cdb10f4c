"""Segmentation metrics: Dice per class, mean foreground Dice, NoC@tau."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
  """Dice of each class, ``float64[num_classes]``; NaN for a class absent from both maps.

  Raises:
    ValueError: the maps have different shapes.
  """
  pred, truth = np.asarray(pred), np.asarray(truth)
  if pred.shape != truth.shape:
    raise ValueError(f"prediction of shape {pred.shape} and ground truth of shape {truth.shape} differ")
  out = np.full(num_classes, np.nan)
  for c in range(num_classes):
    p, t = pred == c, truth == c
    denom = p.sum() + t.sum()
    if denom:
      out[c] = 2.0 * np.logical_and(p, t).sum() / denom
  return out


def mean_foreground_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
  """Mean Dice over classes 1..num_classes-1 that occur in either map (class 0 is background)."""
  d = dice_per_class(pred, truth, num_classes)[1:]
  return float(np.nanmean(d)) if np.any(~np.isnan(d)) else float("nan")


def noc(dice_per_interaction: Sequence[float], tau: float, cap: int | None = None) -> int:
  """Number of clicks/interactions to reach Dice ``tau`` (index 0 is the initial prediction).

  Returns the first interaction index whose Dice is >= ``tau``; ``cap`` (default: the number of
  interactions) when it is never reached, as is usual for NoC.
  """
  values = list(dice_per_interaction)
  cap = len(values) - 1 if cap is None else cap
  for i, d in enumerate(values):
    if d >= tau:
      return min(i, cap)
  return cap
