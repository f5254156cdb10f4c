"""Real data vendored with the package (see NOTICE for sources and credit).

* DSB 2018 nuclei (Caicedo et al., Nature Methods 2019; from the stardist 0.9.2 wheel, BSD-3): one
  512x512 fluorescence field with 125 nuclei. Fixed spatial split: the left 384 columns train, the
  right 128 columns test.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"


class Dataset(NamedTuple):
  """Images and labels with their split and class names."""
  image: np.ndarray           # [*spatial, C] float32, as stored (no normalisation)
  labels: np.ndarray          # int32[*spatial]
  class_names: tuple[str, ...]
  train: tuple                # index (tuple of slices) of the training part
  test: tuple                 # index of the test part
  spacing: tuple[float, ...]  # pixel spacing


def _read_tiff(path: Path) -> np.ndarray:
  import tifffile
  try:
    return tifffile.imread(path)
  except (OSError, ValueError) as err:
    raise ValueError(f"cannot read {path}: {err}") from err


def nuclei_instances() -> tuple[np.ndarray, np.ndarray]:
  """The DSB image (uint16 [512, 512]) and its instance mask renumbered 0..N (int32)."""
  image = _read_tiff(DATA_DIR / "dsb2018_nuclei" / "img2d.tif")
  mask = _read_tiff(DATA_DIR / "dsb2018_nuclei" / "mask2d.tif")
  ids = np.unique(mask)
  ids = ids[ids != 0]
  renumbered = np.zeros(mask.shape, np.int32)
  for new, old in enumerate(ids, start=1):
    renumbered[mask == old] = new
  return image, renumbered


def nuclei2d(classes: str = "binary") -> Dataset:
  """DSB 2018 nuclei as semantic labels.

  Args:
    classes: "binary" (0 background, 1 nucleus) or "border" (0 background, 1 interior, 2 border: the
      pixels of a nucleus that touch another label).
  """
  image, instances = nuclei_instances()
  if classes == "binary":
    labels = (instances > 0).astype(np.int32)
    names = ("background", "nucleus")
  elif classes == "border":
    from skimage.segmentation import find_boundaries
    border = find_boundaries(instances, mode="inner") & (instances > 0)
    labels = np.where(border, 2, (instances > 0).astype(np.int32)).astype(np.int32)
    names = ("background", "interior", "border")
  else:
    raise ValueError(f"classes must be 'binary' or 'border', got {classes!r}")
  return Dataset(image[..., None].astype(np.float32), labels, names,
                 (slice(None), slice(0, 384)), (slice(None), slice(384, 512)), (1.0, 1.0))
