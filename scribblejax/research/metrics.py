"""Segmentation metrics: Dice per class, mean foreground Dice, Dice per interaction, NoC@tau, timing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from scribblejax._checks import is_integer


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
  """Dice of each class, ``float64[num_classes]``; NaN for a class absent from both maps.

  Raises:
    ValueError: the maps have different shapes, are not integer label maps, or hold a label outside
      ``[0, num_classes)`` (which no class's Dice would count).
  """
  pred, truth = np.asarray(pred), np.asarray(truth)
  if pred.shape != truth.shape:
    raise ValueError(f"prediction of shape {pred.shape} and ground truth of shape {truth.shape} differ")
  if not is_integer(num_classes) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  for what, arr in (("prediction", pred), ("ground truth", truth)):
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
      raise ValueError(f"the {what} must be an integer label map, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_classes):
      raise ValueError(
        f"the {what} holds labels {int(arr.min())}..{int(arr.max())}, outside "
        f"[0, {num_classes}) with num_classes={num_classes}"
      )
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


def dice_per_interaction(predictions: Sequence[np.ndarray], truth: np.ndarray, num_classes: int) -> list[float]:
  """Mean foreground Dice of each prediction in a sequence (index 0: before any interaction)."""
  return [mean_foreground_dice(p, truth, num_classes) for p in predictions]


def noc_summary(
  dice_per_interaction: Sequence[float], taus: Sequence[float] = (0.85, 0.9), cap: int | None = None
) -> dict[str, dict]:
  """NoC@tau for several thresholds, with whether tau was reached at all.

  Args:
    dice_per_interaction: Dice after 0, 1, ..., N interactions.
    taus: thresholds.
    cap: value reported when tau is never reached (default N, the number of interactions run).

  Returns:
    ``{"0.85": {"noc": int, "reached": bool}, ...}``: a NoC equal to the cap with ``reached`` false
    means "not within the interactions run".
  """
  values = list(dice_per_interaction)
  out = {}
  for tau in taus:
    reached = any(d >= tau for d in values)
    out[f"{tau:g}"] = {"noc": noc(values, tau, cap), "reached": bool(reached)}
  return out


def classes_corrected(
  before: np.ndarray, after: np.ndarray, truth: np.ndarray, num_classes: int, min_gain: float = 0.01
) -> list[int]:
  """Classes whose Dice rose by at least ``min_gain`` from ``before`` to ``after``."""
  a = dice_per_class(before, truth, num_classes)
  b = dice_per_class(after, truth, num_classes)
  return [
    c for c in range(num_classes) if np.isfinite(b[c]) and (np.nan_to_num(b[c]) - np.nan_to_num(a[c])) >= min_gain
  ]


def timing_summary(seconds: Sequence[float], compile_seconds: float | None) -> dict:
  """Seconds per interaction (compiled code) and the one-off compile time, reported apart.

  Args:
    seconds: wall-clock seconds of each interaction, measured after a warm-up compiled everything.
    compile_seconds: seconds of the warm-up (compilation plus one trivial run), or ``None``.

  Returns:
    ``{"seconds_per_interaction": [...], "mean_seconds": float, "median_seconds": float,
    "compile_seconds": float | None}``.
  """
  values = [float(s) for s in seconds]
  return {
    "seconds_per_interaction": values,
    "mean_seconds": float(np.mean(values)) if values else float("nan"),
    "median_seconds": float(np.median(values)) if values else float("nan"),
    "compile_seconds": None if compile_seconds is None else float(compile_seconds),
  }
