"""Type predicates for argument checks: Python's ``bool`` is an ``int``, and NumPy's numbers are not
Python's, so "an integer" and "a number" each need more than one ``isinstance``."""

from __future__ import annotations

from typing import Any

import numpy as np

INT32_MAX = int(np.iinfo(np.int32).max)  # the largest step count, class index or length JAX's int32 holds


def is_integer(value: Any) -> bool:
  """A Python or NumPy integer, not a bool."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
  """A Python or NumPy integer or float, not a bool (and not a string that reads as one)."""
  return is_integer(value) or isinstance(value, (float, np.floating))


def is_finite_number(value: Any) -> bool:
  """:func:`is_number`, and finite."""
  return is_number(value) and bool(np.isfinite(value))
