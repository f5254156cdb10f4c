"""Small helpers shared by test files (importable because pytest puts ``tests/`` on the path)."""

import gc

import jax
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


def memory_mappings() -> tuple[int, int] | None:
  """``(held, limit)``: the memory mappings this process holds and the kernel's limit on them
  (``vm.max_map_count``), or ``None`` where ``/proc`` does not say (not Linux)."""
  try:
    with open("/proc/self/maps") as f:
      held = sum(1 for _ in f)
    with open("/proc/sys/vm/max_map_count") as f:
      limit = int(f.read())
  except (OSError, ValueError):
    return None
  return held, limit


def release_compiled_programs() -> None:
  """Drops every program JAX has compiled in this process, and the memory they map (each compiles again
  when it is next called)."""
  jax.clear_caches()
  gc.collect()
