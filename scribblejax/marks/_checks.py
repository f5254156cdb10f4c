"""Value checks shared by the mark types, the encoder and region growing (each error names what it checks)."""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

from scribblejax._checks import INT32_MAX

UNMARKED = -1  # a mark map's "no mark here"


def as_index(value: Any, what: str) -> int:
  """``value`` as a Python int; bools and non-integers are rejected."""
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{what} must be an integer, got {value!r}")
  try:
    return operator.index(value)
  except TypeError:
    raise ValueError(f"{what} must be an integer, got {value!r}") from None


def as_label(value: Any, what: str, num_classes: int | None) -> int:
  label = as_index(value, what)
  if label < 0:
    raise ValueError(f"{what} must be >= 0, got {label}")
  if num_classes is not None and label >= num_classes:
    raise ValueError(f"{what} is {label}, but num_classes is {num_classes}")
  return label


def as_real(value: Any, what: str, lo: float = 0.0, hi: float = math.inf) -> float:
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{what} must be a real number, got {value!r}")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{what} must be a real number, got {value!r}") from None
  if not math.isfinite(number) or not lo <= number <= hi:
    raise ValueError(f"{what} must be finite and in [{lo}, {hi}], got {value!r}")
  return number


def int_coords(value: Any, what: str, ndim: int, rows: bool) -> np.ndarray:
  """Integer coordinates: shape ``(ndim,)``, or ``(N, ndim)`` with ``N >= 1`` when ``rows``."""
  try:
    arr = np.array(value)  # a copy: never alias the caller's array
  except ValueError:  # ragged nested sequences
    raise ValueError(
      f"{what} must be {'an N x ' + str(ndim) + ' array' if rows else str(ndim) + ' integers'}, "
      f"got the ragged {value!r}"
    ) from None
  if arr.dtype == object or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f"{what} must be integers, got {value!r}")
  if rows:
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != ndim:
      raise ValueError(f"{what} must be an N x {ndim} array (N >= 1) for a {ndim}-D image, got shape {arr.shape}")
  elif arr.shape != (ndim,):
    raise ValueError(
      f"{what} has {arr.size if arr.ndim == 1 else arr.shape} entries, but the image has {ndim} dimensions"
    )
  return arr.astype(np.int64)


def check_shape(shape: Any) -> tuple[int, ...]:
  try:
    dims = tuple(as_index(s, "shape entry") for s in shape)
  except TypeError:
    raise ValueError(f"shape must be a sequence of integers, got {shape!r}") from None
  if not dims or any(s < 1 for s in dims):
    raise ValueError(f"shape must be a non-empty sequence of positive integers, got {shape!r}")
  return dims


def integer_array(value: Any, what: str) -> np.ndarray:
  arr = np.asarray(value)
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{what} must be an integer array, got dtype {arr.dtype}")
  return arr


def check_range(arr: np.ndarray, what: str, num_classes: int | None) -> None:
  if not arr.size:
    return
  lo, hi = int(arr.min()), int(arr.max())
  if lo < UNMARKED:
    raise ValueError(f"{what} hold value {lo}; values must be -1 (unmarked) or a class index >= 0")
  if num_classes is not None and hi >= num_classes:
    raise ValueError(f"{what} hold value {hi}, outside [-1, num_classes) with num_classes={num_classes}")
  if hi > INT32_MAX:
    raise ValueError(f"{what} hold value {hi}, too large for a class index (marks are stored as int32)")


def check_num_classes(num_classes: Any) -> int | None:
  if num_classes is None:
    return None
  n = as_index(num_classes, "num_classes")
  if n < 1:
    raise ValueError(f"num_classes must be >= 1, got {n}")
  return n
