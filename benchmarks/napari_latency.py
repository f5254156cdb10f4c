"""Latency of the napari widget: seconds from pressing Refine to the updated segmentation layer.

Each case opens an image in a napari viewer with :class:`scribblejax.napari.widget.ScribbleWidget`,
paints one stroke and presses Refine; the clock runs from the click until the worker has returned and
the layer holds the new segmentation (the GUI thread idles in between, as a user's would). The first
round includes compilation (the widget's "compile on open" is off unless ``--compile-on-open``) and is
reported apart; then each repeat resets the session (untimed) and
refines the same stroke again. Cases: 2-D 256^2 (``nuclei2d`` on the DSB field) and 3-D 64^3
(``tissue3d`` on the MNI volume at 2 mm).

Run under a display (``xvfb-run -a``)::

    xvfb-run -a python -m benchmarks.napari_latency --repeats 3 --out benchmarks/results/napari_latency.json

The record states the device, the versions, the date and the command; ``--note`` adds a line (say, that
the machine was shared).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = ("2d", "3d")


def _images(folder: Path) -> dict:
  """The two cases' image files, models and strokes (an index into the image's spatial axes)."""
  import nibabel as nib
  from PIL import Image as PILImage

  from scribblejax.research import data

  image, _ = data.nuclei_instances()
  png = folder / "cells256.png"
  PILImage.fromarray(image[:256, :256].astype(np.uint16)).save(png)
  ds = data.tissue3d(factor=2)
  volume = ds.image[17:81, 26:90, 15:79, 0]
  nii = folder / "brain64.nii.gz"
  nib.save(nib.Nifti1Image(volume.astype(np.float32), ds.affine), nii)
  return {"2d": (png, "nuclei2d", (128, slice(100, 140))), "3d": (nii, "tissue3d", (32, slice(20, 44), 32))}


def _wait(app, widget, limit: float = 1800.0) -> None:
  start = time.perf_counter()
  while widget.busy:
    app.processEvents()
    time.sleep(0.002)
    if time.perf_counter() - start > limit:
      raise RuntimeError("the widget did not finish in time")


def _timed_round(app, widget, stroke, values) -> tuple[float, dict]:
  from scribblejax.napari.widget import SCRIBBLES

  layer = widget.viewer.layers[SCRIBBLES]
  layer.data[stroke] = values
  layer.refresh()
  widget.report = None
  start = time.perf_counter()
  widget.refine_button.click()
  _wait(app, widget)
  seconds = time.perf_counter() - start
  if widget.report is None:
    raise RuntimeError(f"the round failed: {widget.message_label.text()}")
  return seconds, widget.report


def run_case(
  app, viewer, name: str, image: Path, model: str, stroke, repeats: int, steps: int, warm: bool = False
) -> dict:
  """Opens the image, times a first round (with compilation) and ``repeats`` more after resets."""
  from scribblejax.napari.widget import SEGMENTATION, ScribbleWidget

  widget = ScribbleWidget(viewer)
  viewer.window.add_dock_widget(widget, name=f"scribblejax {name}")
  widget.setting_edits["max_steps"].setText(str(steps))
  widget.warm_check.setChecked(warm)
  start = time.perf_counter()
  widget.open(str(image), model)
  _wait(app, widget)
  open_seconds = time.perf_counter() - start
  if widget.interaction is None:
    raise RuntimeError(f"opening failed: {widget.message_label.text()}")
  labels = viewer.layers[SEGMENTATION].data[stroke]
  num_classes = widget.interaction.num_classes
  values = np.where(labels == num_classes - 1, num_classes - 1, num_classes)  # a class the network does not give
  first, first_report = _timed_round(app, widget, stroke, values)
  times, reports = [], []
  for _ in range(repeats):
    widget.reset()
    _wait(app, widget)
    seconds, report = _timed_round(app, widget, stroke, values)
    times.append(seconds)
    reports.append(report)
  viewer.window.remove_dock_widget(widget)
  shape = list(widget.interaction.image.spatial_shape)
  return {
    "case": name,
    "model": model,
    "image_shape": shape,
    "compile_on_open": warm,
    "open_seconds": open_seconds,
    "first_round_seconds": first,
    "first_round_compile_seconds": first_report["compile_seconds"],
    "first_round_steps": first_report["steps"],
    "median_seconds": statistics.median(times),
    "seconds": times,
    "median_loop_seconds": statistics.median(r["seconds"] for r in reports),
    "compile_seconds": [r["compile_seconds"] for r in reports],
    "steps": [r["steps"] for r in reports],
    "satisfied": [r["satisfied"] for r in reports],
    "max_steps": steps,
  }


def _versions() -> dict:
  import importlib.metadata as metadata

  names = ("scribblejax", "jax", "jaxlib", "flax", "numpy", "napari", "PyQt5", "vispy")
  found = {}
  for name in names:
    try:
      found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      found[name] = None
  return {"python": platform.python_version(), **found}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cases", default="2d,3d", help="comma-separated: 2d (256^2), 3d (64^3)")
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the first (median reported)")
  parser.add_argument("--steps", type=int, default=20, help="most SGD steps per round (refine --steps)")
  parser.add_argument(
    "--compile-on-open",
    action="store_true",
    help="keep the widget's 'compile on open' (off by default here, so that the first round shows the compilation)",
  )
  parser.add_argument("--out", help="JSON record to write (default: print only)")
  parser.add_argument("--note", default="", help="a line about the machine or the run, kept in the record")
  args = parser.parse_args(argv)
  cases = [c.strip() for c in args.cases.split(",") if c.strip()]
  unknown = [c for c in cases if c not in CASES]
  if unknown or args.repeats < 1:
    parser.error(f"cases are {', '.join(CASES)} and --repeats >= 1")

  import jax
  import napari
  from qtpy.QtWidgets import QApplication

  viewer = napari.Viewer(show=False)
  app = QApplication.instance()
  results = []
  with tempfile.TemporaryDirectory() as folder:
    images = _images(Path(folder))
    for name in cases:
      image, model, stroke = images[name]
      results.append(run_case(app, viewer, name, image, model, stroke, args.repeats, args.steps, args.compile_on_open))
      print(json.dumps(results[-1]), flush=True)
  viewer.close()
  device = jax.devices()[0]
  record = {
    "benchmark": "napari_latency",
    "what": "seconds from the Refine click to the updated segmentation layer",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": " ".join(["python -m benchmarks.napari_latency", *(argv if argv is not None else sys.argv[1:])]),
    "device": str(device.device_kind),
    "platform": str(device.platform),
    "machine": platform.processor() or platform.machine(),
    "versions": _versions(),
    "note": args.note,
    "cases": results,
  }
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
  print(json.dumps({k: v for k, v in record.items() if k != "cases"}, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
