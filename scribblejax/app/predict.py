"""``predict``: the network's own segmentation of an image file, written like the image."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from scribblejax.app.models import Log, load_network, model_ref, read_info, silent
from scribblejax.app.report import (
  COMPILE_NOTE,
  check_outputs,
  class_counts,
  companion_paths,
  compile_timer,
  device_info,
  write_outputs,
)
from scribblejax.io.images import output_format, read_image
from scribblejax.pipeline.grid import labels_from_logits
from scribblejax.pipeline.network import network_logits, prepare
from scribblejax.pipeline.spec import InferenceOptions


def run_predict(
  model: str,
  image: str,
  out: str,
  *,
  overlay: bool = True,
  log: Log = silent,
  inference: InferenceOptions = InferenceOptions(),
  progress: Any = None,
) -> dict:
  """The network's own segmentation of an image, written like the image (see
  :func:`scribblejax.io.write_label_map`).

  Args:
    model: a model folder or built-in name.
    image: the image file or DICOM folder.
    out: the segmentation to write (its suffix picks the format).
    overlay: write ``<out stem>.overlay.png``.
    log: progress messages.
    inference: crop, spacing, patches, mirroring.
    progress: ``progress(done, total)`` after each patch when the network runs patch by patch.

  Returns:
    The report (also written as ``<out stem>.report.json``).

  Raises:
    ValueError: bad input, with a message naming the problem (before the network is loaded where possible).
  """
  report_path, overlay_path = companion_paths(out)
  check_outputs([out, report_path, overlay_path if overlay else None], [image])
  info = read_info(model)
  log(f"reading {image}")
  img = read_image(image)
  output_format(out, img.geometry)
  network = load_network(model, log)
  _, split, fitted, _ = prepare(network, img, info, 1, inference)
  for note in fitted.notes:
    log(f"note: {note}")
  log(f"predicting on {fitted.image.shape[:-1]} ({device_info()['device']})")
  with compile_timer() as compiled:
    start = time.perf_counter()
    labels = labels_from_logits(network_logits(split, fitted, step=inference.step, progress=progress), fitted)
    seconds = time.perf_counter() - start
  num_classes = int(network.spec.num_classes or labels.max() + 1)
  report = {
    "command": "predict",
    "image": str(image),
    "image_format": img.family,
    "image_shape": list(img.spatial_shape),
    "model": model_ref(model),
    "classes": list(info.class_names or [str(k) for k in range(num_classes)]),
    "class_pixels": class_counts(labels, info.class_names, num_classes),
    "seconds": seconds,
    "compile_seconds": compiled[0],
    "compile_seconds_note": COMPILE_NOTE,
    **device_info(),
    "notes": list(fitted.notes),
  }
  return write_outputs(report, out, img, labels, labels, None, None, overlay, log, f"{Path(image).name}: network")
