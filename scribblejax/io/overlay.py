"""Overlay PNGs: the image with the network's segmentation, the refined one and the marks.

For 3-D images the panels show the slices that carry marks (up to ``max_slices``, those with the
most marked voxels), or the middle slice when nothing is marked. Slices are taken along the last
axis of medical images (``k``) and the first axis of TIFF stacks (``z``).
"""

from __future__ import annotations

import os

import numpy as np

from scribblejax.io import fileio
from scribblejax.io.images import MEDICAL, Geometry


def slice_axis(geometry: Geometry) -> int | None:
  """The axis 3-D overlays slice along, or ``None`` for a 2-D image."""
  if len([s for s in geometry.shape if s > 1]) < 3:
    return None
  return 2 if geometry.family in MEDICAL else 0


def marked_slices(marks: np.ndarray | None, axis: int, size: int, max_slices: int) -> list[int]:
  """Indices of the slices with the most marks (in increasing order), or the middle slice."""
  if marks is None or not (marks >= 0).any():
    return [size // 2]
  other = tuple(a for a in range(marks.ndim) if a != axis)
  counts = (marks >= 0).sum(axis=other)
  chosen = [int(i) for i in np.argsort(-counts, kind="stable")[:max_slices] if counts[i] > 0]
  return sorted(chosen)


def _plane(array: np.ndarray, axis: int | None, index: int | None) -> np.ndarray:
  return array if axis is None else np.take(array, index, axis=axis)


def _display(image: np.ndarray) -> np.ndarray:
  """``[H, W]`` grey or ``[H, W, 3]`` RGB scaled to [0, 1] by the 1st and 99th percentiles."""
  x = image.astype(np.float32)
  if x.shape[-1] in (3, 4):
    x = x[..., :3]
  else:
    x = x[..., 0]
  lo, hi = np.nanpercentile(x, [1, 99]) if np.isfinite(x).any() else (0.0, 1.0)
  return np.clip((x - lo) / max(float(hi - lo), 1e-8), 0, 1)


def _draw_marks(ax, marks: np.ndarray, cmap, origin: str) -> None:
  """Sparse marks as dots with a white rim (visible at any size), dense ones as an opaque layer."""
  where = np.argwhere(marks >= 0)
  if len(where) > 4000:
    ax.imshow(np.ma.masked_less(marks, 0), cmap=cmap, vmin=0, vmax=cmap.N - 1, origin=origin, interpolation="nearest")
    return
  colours = cmap(marks[tuple(where.T)] % cmap.N)  # class % palette size, as for segmentations
  limits = ax.get_xlim(), ax.get_ylim()
  ax.scatter(where[:, 1], where[:, 0], s=10, c=colours, edgecolors="white", linewidths=0.4, marker="s")
  ax.set_xlim(*limits[0])
  ax.set_ylim(*limits[1])


def _palette(num_classes: int):
  """Distinct colours for up to 60 classes (tab10, tab20, then tab20 + tab20b + tab20c); beyond that,
  class ``c`` takes colour ``c % 60`` in segmentations and marks alike."""
  import matplotlib.pyplot as plt
  from matplotlib.colors import ListedColormap

  if num_classes <= 10:
    return plt.get_cmap("tab10")
  if num_classes <= 20:
    return plt.get_cmap("tab20")
  return ListedColormap([c for name in ("tab20", "tab20b", "tab20c") for c in plt.get_cmap(name).colors])


def save_overlay(
  path: str | os.PathLike,
  image: np.ndarray,
  geometry: Geometry,
  before: np.ndarray,
  after: np.ndarray | None = None,
  marks: np.ndarray | None = None,
  *,
  title: str = "",
  max_slices: int = 4,
) -> None:
  """Writes an overlay PNG atomically.

  Args:
    path: the PNG to write.
    image: ``[*spatial, C]`` as read.
    geometry: the image's geometry (for the slice axis and the display orientation).
    before: ``int[*spatial]``, the network's segmentation.
    after: ``int[*spatial]``, the refined segmentation (``None`` for a prediction only).
    marks: ``int[*spatial]``, ``-1`` unmarked.
    title: the figure's title.
    max_slices: most slices shown for a 3-D image.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  spatial = tuple(geometry.shape)
  if max_slices < 1:
    raise ValueError(f"max_slices must be >= 1, got {max_slices}")
  for name, labels in (("before", before), ("after", after), ("marks", marks)):
    if labels is not None and tuple(labels.shape) != spatial:
      raise ValueError(f"the overlay's {name} map has shape {tuple(labels.shape)}, the image {spatial}")
  axis = slice_axis(geometry)
  if axis is None and len(spatial) == 3:  # a 3-D array with a length-1 axis: [i, j, 1] or [1, j, k]
    flat = [a for a, n in enumerate(spatial) if n == 1][-1]
    image, before = np.take(image, 0, axis=flat), np.take(before, 0, axis=flat)
    after = None if after is None else np.take(after, 0, axis=flat)
    marks = None if marks is None else np.take(marks, 0, axis=flat)
  slices = [None] if axis is None else marked_slices(marks, axis, spatial[axis], max_slices)
  columns = [("network", before, None)] + ([("refined + marks", after, marks)] if after is not None else [])
  num_classes = int(max(before.max(), 0 if after is None else after.max(), 0 if marks is None else marks.max(), 1)) + 1
  cmap = _palette(num_classes)
  medical = geometry.family in MEDICAL
  fig, axes = plt.subplots(
    len(slices), len(columns), figsize=(4.2 * len(columns), 4.2 * len(slices) + 0.4), squeeze=False
  )
  for row, index in enumerate(slices):
    base = _display(_plane(image, axis, index))
    for col, (name, labels, mk) in enumerate(columns):
      ax = axes[row][col]
      seg = _plane(labels, axis, index)
      layers = [base, np.ma.masked_equal(seg, 0)]
      if mk is not None:
        layers.append(np.ma.masked_less(_plane(mk, axis, index), 0))
      if medical:  # show i across and j upwards
        layers = [np.swapaxes(layer, 0, 1) for layer in layers]
      origin = "lower" if medical else "upper"
      ax.imshow(layers[0], cmap="gray", origin=origin, interpolation="nearest")
      ax.imshow(
        layers[1] % cmap.N, cmap=cmap, vmin=0, vmax=cmap.N - 1, alpha=0.4, origin=origin, interpolation="nearest"
      )
      if len(layers) > 2:
        _draw_marks(ax, np.ma.filled(layers[2], -1), cmap, origin)
      where = "" if axis is None else f" (slice {index} of axis {axis})"
      ax.set_title(f"{name}{where}", fontsize=9)
      ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  try:
    with fileio.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=100)
  finally:
    plt.close(fig)
