"""What the use cases write and report: output paths beside the segmentation, the checks that no
output overwrites an input, the device and compile times, class counts, the round's closing line, and
the segmentation, overlay and report written atomically."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from scribblejax.io import fileio
from scribblejax.io.images import Image, suffix_of, write_label_map
from scribblejax.io.overlay import save_overlay

_COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)
COMPILE_NOTE = (
  "compile_seconds: time JAX reported spending on tracing, lowering and XLA compilation during "
  "the timed call (jax.monitoring events); seconds includes it"
)


def companion_paths(out: str | os.PathLike) -> tuple[Path, Path]:
  """The report and overlay next to an output: ``seg.nii.gz`` -> ``seg.report.json``, ``seg.overlay.png``."""
  p = Path(out)
  suffix = suffix_of(p)
  stem = p.name[: len(p.name) - len(suffix)] if suffix and p.name.lower().endswith(suffix) else p.name
  return p.with_name(f"{stem}.report.json"), p.with_name(f"{stem}.overlay.png")


def _same(a: str | os.PathLike, b: str | os.PathLike) -> bool:
  if os.path.realpath(a) == os.path.realpath(b):
    return True
  try:
    return os.path.samefile(a, b)
  except OSError:
    return False


def check_outputs(outputs: Sequence[str | os.PathLike | None], inputs: Sequence[str | os.PathLike]) -> None:
  """Refuses outputs that would overwrite an input (or each other), or could not be written.

  Raises:
    ValueError: naming the output (and the input, or the folder that is in the way).
  """
  outputs = [o for o in outputs if o is not None]
  for o in outputs:
    for i in inputs:
      if _same(o, i):
        raise ValueError(f"output {o} is the input {i}; inputs are never overwritten, choose another --out")
      if Path(i).is_dir() and os.path.realpath(o).startswith(os.path.realpath(i) + os.sep) and Path(o).exists():
        raise ValueError(f"output {o} would overwrite a file of the input folder {i}")
  for n, o in enumerate(outputs):
    if any(_same(o, p) for p in outputs[n + 1 :]):
      raise ValueError(f"two outputs would be written to {o}")
  for o in outputs:
    _check_writable(Path(o))


def _check_writable(path: Path) -> None:
  """Refuses, before any work, an output that is a folder or whose folder cannot be made or written."""
  if path.is_dir():
    raise ValueError(f"output {path} is a folder; name a file")
  parent = path.parent
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent
  if not parent.is_dir():
    raise ValueError(f"cannot write {path}: {parent} is a file, not a folder")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"cannot write {path}: no permission to write in {parent}")


def write_json(path: str | os.PathLike, data: dict) -> None:
  """Writes JSON atomically."""
  fileio.write_json(path, data)


@contextlib.contextmanager
def compile_timer() -> Iterator[list[float]]:
  """Collects the seconds JAX reports for tracing, lowering and compiling inside the block.

  Yields:
    A one-element list whose entry grows as JAX compiles.
  """
  total = [0.0]

  def listener(event: str, duration: float, **kwargs: Any) -> None:
    del kwargs
    if event in _COMPILE_EVENTS:
      total[0] += float(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield total
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def device_info() -> dict:
  """``{"device": kind, "platform": name}`` of JAX's first device."""
  device = jax.devices()[0]
  return {"device": str(device.device_kind), "platform": str(device.platform)}


def class_counts(marks: np.ndarray, class_names: Sequence[str] | None, num_classes: int) -> dict:
  """``{class name: pixels}`` of a label map or marks (``-1`` unmarked), classes without pixels left out."""
  counts = np.bincount(marks[marks >= 0].ravel(), minlength=num_classes)
  names = class_names or [str(k) for k in range(num_classes)]
  return {str(names[k]) if k < len(names) else str(k): int(c) for k, c in enumerate(counts) if c}


def write_outputs(
  report: dict,
  out: str | None,
  image: Image,
  labels: np.ndarray,
  before: np.ndarray,
  after: np.ndarray | None,
  marks: np.ndarray | None,
  overlay: bool,
  log: Callable[[str], None],
  title: str,
) -> dict:
  """Writes the segmentation, the overlay and the report (each atomically); nothing when ``out`` is
  ``None``.

  Returns:
    The report with the paths written (``out``, ``out_format``, ``overlay``, ``report``).
  """
  if out is None:
    return report
  report_path, overlay_path = companion_paths(out)
  report["out_format"] = write_label_map(out, labels, image.geometry)
  report["out"] = str(out)
  log(f"wrote {out}")
  if overlay:
    save_overlay(overlay_path, image.array, image.geometry, before, after, marks, title=title)
    report["overlay"] = str(overlay_path)
  report["report"] = str(report_path)
  write_json(report_path, report)
  return report


def round_line(
  satisfied: bool,
  network_honoured: float,
  honoured: float,
  marks: np.ndarray,
  network_labels: np.ndarray,
  class_names: Sequence[str] | None,
  steps: int,
  max_steps: int,
  nonfinite: bool,
) -> str:
  """The one line a round ends with: every mark honoured, or the fraction per class and why not."""
  if satisfied and network_honoured == 1.0:
    return "every mark honoured"
  marked = marks >= 0
  name = lambda c: class_names[c] if class_names and c < len(class_names) else f"class {c}"
  per_class = ", ".join(
    f"{name(int(c))} {np.mean(network_labels[marks == c] == c):.1%}" for c in np.unique(marks[marked])
  )
  if satisfied:
    why = "the marks lie between the model's voxels"
  elif nonfinite:
    why = "the objective became non-finite"
  else:
    why = f"the step budget ({max_steps}) ran out after {steps} steps"
  shown = "; the segmentation honours every mark" if honoured == 1.0 else f"; the segmentation honours {honoured:.1%}"
  return f"the network honours {network_honoured:.1%} of marked pixels ({per_class}): {why}{shown}"


CHANGED_BY = {  # merge.REASONS as a round's closing lines name them
  "mark": "marked",
  "new_marks": "in regions of change at a new mark",
  "sure": "where the refined network is sure",
  "image": "where the image resembles the new class",
}


def changed_line(changed: dict[str, int] | None) -> str:
  """The line that says what a round's merge changed, per reason (:func:`scribblejax.refinement.merge.changed_by`);
  empty when it changed nothing, or ran without the merge (``None``)."""
  if not changed or not sum(changed.values()):
    return ""
  parts = ", ".join(f"{n} {CHANGED_BY[reason]}" for reason, n in changed.items() if n)
  return f"this round changed {sum(changed.values())} pixels: {parts}"
