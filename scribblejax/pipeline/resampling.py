"""Resampling images, logits and label maps between voxel spacings, as nnU-Net does.

A network trained at one voxel spacing sees anatomy at the wrong scale in an image of another. nnU-Net
therefore resamples every image to its plans' spacing before the network and the network's logits
back to the image's grid afterwards (``nnunetv2.preprocessing.resampling.default_resampling``):

* the new shape is ``round(spacing / target * shape)`` per axis; nothing happens when it equals the
  old one;
* intensities are interpolated with splines of order 3 (logits: order 1) by ``skimage.transform.resize``
  (``mode="edge"``, no anti-aliasing);
* a 3-D volume whose spacing is anisotropic (the largest over the smallest is more than 3, in the
  source spacing, else in the target spacing) with one coarse axis is resampled in-plane slice by slice
  and along the coarse axis with order ``order_z`` (0: nearest).

:func:`resample` does exactly that for channels-last arrays. Marks are sparse and thin, so
:func:`resample_label_map` maps them by nearest neighbour and then makes sure no marked voxel is lost
when a grid gets coarser.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from scribblejax._checks import is_finite_number, is_integer

ANISOTROPY_THRESHOLD = 3.0  # nnunetv2.configuration.ANISO_THRESHOLD


@dataclasses.dataclass(frozen=True)
class ResampleScheme:
  """How an array is interpolated (nnU-Net's ``resampling_fn_*_kwargs``).

  Attributes:
    order: spline order of the interpolation (in-plane, when the coarse axis goes on its own).
    order_z: spline order along the coarse axis of an anisotropic volume.
    force_separate_z: ``True``/``False`` forces the coarse axis on (off) its own; ``None`` decides by
      ``anisotropy_threshold``.
    anisotropy_threshold: largest over smallest spacing above which a volume counts as anisotropic.
  """

  order: int = 3
  order_z: int = 0
  force_separate_z: bool | None = None
  anisotropy_threshold: float = ANISOTROPY_THRESHOLD

  def __post_init__(self):
    for name in ("order", "order_z"):
      value = getattr(self, name)
      if not is_integer(value) or not 0 <= value <= 5:
        raise ValueError(f"ResampleScheme.{name} must be a spline order 0..5, got {value!r}")
    if self.force_separate_z not in (None, True, False):
      raise ValueError(f"ResampleScheme.force_separate_z must be None, True or False, got {self.force_separate_z!r}")
    if not is_finite_number(self.anisotropy_threshold) or self.anisotropy_threshold <= 0:
      raise ValueError(
        f"ResampleScheme.anisotropy_threshold must be a positive number, got {self.anisotropy_threshold!r}"
      )

  @classmethod
  def from_nnunet(cls, kwargs: Any, default: ResampleScheme) -> ResampleScheme:
    """The scheme of a plans' ``resampling_fn_data_kwargs`` / ``..._probabilities_kwargs`` (``default``
    for what they do not state).

    Raises:
      ValueError: the kwargs are not an object, or resample segmentations (``is_seg``).
    """
    if kwargs is None:
      return default
    if not isinstance(kwargs, dict):
      raise ValueError(f"nnU-Net resampling kwargs must be an object, got {kwargs!r}")
    if kwargs.get("is_seg"):
      raise ValueError("nnU-Net resampling kwargs with is_seg=True do not resample images or logits")
    unknown = set(kwargs) - {"is_seg", "order", "order_z", "force_separate_z"}
    if unknown:
      raise ValueError(f"unknown nnU-Net resampling option(s) {sorted(unknown)}")
    return cls(
      order=kwargs.get("order", default.order),
      order_z=kwargs.get("order_z", default.order_z),
      force_separate_z=kwargs.get("force_separate_z", default.force_separate_z),
    )

  def to_json(self) -> dict:
    return {
      "order": self.order,
      "order_z": self.order_z,
      "force_separate_z": self.force_separate_z,
      "anisotropy_threshold": self.anisotropy_threshold,
    }


IMAGE = ResampleScheme(order=3, order_z=0)  # nnU-Net's default for images
LOGITS = ResampleScheme(order=1, order_z=0)  # nnU-Net's default for logits on export


def _spacing(spacing: Any, ndim: int, what: str) -> tuple[float, ...]:
  values = tuple(spacing) if isinstance(spacing, (Sequence, np.ndarray)) else None
  if values is None or len(values) != ndim or not all(is_finite_number(s) and s > 0 for s in values):
    raise ValueError(f"{what} must be {ndim} positive finite numbers (one per spatial axis), got {spacing!r}")
  return tuple(float(s) for s in values)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
  """The shape of ``shape`` voxels at ``spacing`` resampled to ``target`` (nnU-Net's rounding; at least 1).

  Raises:
    ValueError: the lengths differ or a spacing is not positive and finite.
  """
  spacing = _spacing(spacing, len(shape), "the spacing")
  target = _spacing(target, len(shape), "the target spacing")
  return tuple(max(1, int(round(s / t * n))) for n, s, t in zip(shape, spacing, target))


def _coarse_axis(spacing: tuple[float, ...], threshold: float) -> int | None:
  """The one coarsest axis of an anisotropic spacing (``None``: isotropic enough, or two coarse axes)."""
  if max(spacing) / min(spacing) <= threshold:
    return None
  coarse = [a for a, s in enumerate(spacing) if s == max(spacing)]
  return coarse[0] if len(coarse) == 1 else None


def separate_axis(spacing: Sequence[float], target: Sequence[float], scheme: ResampleScheme = IMAGE) -> int | None:
  """The axis a 3-D resampling treats on its own (with ``scheme.order_z``), or ``None`` (nnU-Net's rule)."""
  spacing, target = tuple(spacing), tuple(target)
  if len(spacing) != 3 or scheme.force_separate_z is False:
    return None
  if scheme.force_separate_z:
    return _coarse_axis(spacing, 0.0)
  axis = _coarse_axis(spacing, scheme.anisotropy_threshold)
  if axis is None and max(spacing) / min(spacing) <= scheme.anisotropy_threshold:
    axis = _coarse_axis(target, scheme.anisotropy_threshold)
  return axis


def _resize(array: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
  from skimage.transform import resize

  if tuple(array.shape) == tuple(shape):
    return array
  return resize(array, shape, order=order, mode="edge", anti_aliasing=False)


def _along(array: np.ndarray, axis: int, length: int, order: int) -> np.ndarray:
  """Resamples one axis to ``length`` voxels with pixel-centre alignment and edge clamping."""
  from scipy.ndimage import affine_transform

  if array.shape[axis] == length:
    return array
  scale = np.ones(array.ndim)
  scale[axis] = array.shape[axis] / length
  shape = list(array.shape)
  shape[axis] = length
  return affine_transform(
    array, scale, offset=0.5 * scale - 0.5, output_shape=tuple(shape), order=order, mode="nearest"
  )


def _one_channel(array: np.ndarray, shape: tuple[int, ...], axis: int | None, scheme: ResampleScheme) -> np.ndarray:
  if axis is None:
    return _resize(array, shape, scheme.order)
  plane = tuple(n for a, n in enumerate(shape) if a != axis)
  slices = [_resize(np.take(array, i, axis=axis), plane, scheme.order) for i in range(array.shape[axis])]
  return _along(np.stack(slices, axis=axis), axis, shape[axis], scheme.order_z)


def resample(
  array: Any, shape: Sequence[int], spacing: Sequence[float], target: Sequence[float], scheme: ResampleScheme = IMAGE
) -> np.ndarray:
  """Resamples ``array`` ``[*spatial, C]`` at ``spacing`` to ``shape`` voxels at ``target`` spacing.

  nnU-Net's ``resample_data_or_seg_to_shape`` for images and logits (not segmentations), channels
  last: the spacings only decide whether a 3-D volume's coarse axis is treated on its own.

  Args:
    array: ``[*spatial, C]`` numbers.
    shape: the new spatial shape (:func:`resampled_shape`).
    spacing: the voxel spacing of ``array``'s spatial axes.
    target: the voxel spacing of the result.
    scheme: the interpolation (:data:`IMAGE`, :data:`LOGITS` or a model's own).

  Returns:
    float32 ``[*shape, C]`` (``array`` itself, as float32, when the shape does not change).

  Raises:
    ValueError: the shapes or spacings do not fit the array.
  """
  array = np.asarray(array)
  spatial = array.shape[:-1]
  shape = tuple(int(n) for n in shape)
  if array.ndim < 2 or len(shape) != len(spatial) or any(n < 1 for n in shape):
    raise ValueError(
      f"cannot resample an array of shape {array.shape} (spatial axes, then channels) to the spatial shape {shape}"
    )
  spacing = _spacing(spacing, len(spatial), "the spacing")
  target = _spacing(target, len(spatial), "the target spacing")
  if shape == tuple(spatial):
    return np.asarray(array, np.float32)
  axis = separate_axis(spacing, target, scheme)
  data = np.asarray(array, np.float64)
  channels = [_one_channel(data[..., c], shape, axis, scheme) for c in range(data.shape[-1])]
  return np.stack(channels, axis=-1).astype(np.float32)


def _nearest(n_from: int, n_to: int) -> np.ndarray:
  """For each of ``n_to`` voxels, the nearest of ``n_from`` (pixel centres aligned)."""
  centre = (np.arange(n_to) + 0.5) * (n_from / n_to) - 0.5
  return np.clip(np.floor(centre + 0.5), 0, n_from - 1).astype(np.int64)


def _stencil(index: np.ndarray, old: int, new: int, order: int) -> tuple[np.ndarray, np.ndarray]:
  """The two voxels (maybe one twice) of a ``new``-voxel axis that interpolation of ``order`` 0 or 1
  reads for the ``old``-voxel axis' voxels ``index`` (centre-aligned, clamped at the edges, as
  :func:`resample` maps an axis of ``new`` voxels back to ``old``)."""
  c = np.clip((index + 0.5) * (new / old) - 0.5, 0, new - 1)
  lo = np.floor(c)
  frac = c - lo
  hi = np.minimum(lo + 1, new - 1)
  if order == 1:
    return lo, np.where(frac > 0, hi, lo)
  near = np.where(frac > 0.5, hi, lo)
  return near, np.where(np.isclose(frac, 0.5), hi, near)  # a tie: either may be read


def cover_label_map(labels: Any, into: np.ndarray, orders: Sequence[int], fill: int = -1) -> np.ndarray:
  """``into`` (a label map of another grid over the same extent) with every voxel still ``fill`` that
  the way back to ``labels``' grid reads for a marked voxel of ``labels`` given that voxel's label.

  Logits resampled back with interpolation of order 0 or 1 are convex blends of the voxels read, so a
  marked voxel of ``labels`` whose every voxel read on ``into``'s grid predicts its class is predicted
  as its class after the way back too.

  Args:
    labels: the marks ``[*old]`` (``fill`` unmarked).
    into: the marks ``[*new]`` so far (not changed; a copy is returned).
    orders: per axis, the interpolation order (0 or 1) of the way back.
    fill: the unmarked value.
  """
  labels = np.asarray(labels)
  out = np.array(into, copy=True)
  if len(orders) != labels.ndim or any(o not in (0, 1) for o in orders):
    raise ValueError(f"cover_label_map needs one order, 0 or 1, per axis; got {tuple(orders)}")
  marked = np.argwhere(labels != fill)
  if not len(marked) or labels.shape == out.shape:
    return out
  values = labels[tuple(marked.T)]
  pairs = [_stencil(marked[:, a], m, n, o) for a, (m, n, o) in enumerate(zip(labels.shape, out.shape, orders))]
  for choice in itertools.product((0, 1), repeat=labels.ndim):
    spots = tuple(pairs[a][k].astype(np.int64) for a, k in enumerate(choice))
    empty = out[spots] == fill
    out[tuple(s[empty] for s in spots)] = values[empty]
  return out


def resample_label_map(labels: Any, shape: Sequence[int], fill: int = -1) -> tuple[np.ndarray, int]:
  """Maps a label map (marks, or a segmentation) to a grid of ``shape`` voxels covering the same extent.

  Each new voxel takes the label of its nearest old voxel. Where the new grid is coarser, a marked
  voxel (one not equal to ``fill``) whose nearest new voxel holds ``fill`` then marks that voxel, so a
  thin scribble keeps every piece. Where labels meet in one new voxel, one holds: the nearest old
  voxel's, else one of those mapped there; the others are counted as lost.

  Returns:
    ``(new labels of labels' dtype, count of marked voxels whose label found no voxel of its own)``.
  """
  labels = np.asarray(labels)
  shape = tuple(int(n) for n in shape)
  if len(shape) != labels.ndim or any(n < 1 for n in shape):
    raise ValueError(f"cannot map a label map of shape {labels.shape} to the shape {shape}")
  if shape == labels.shape:
    return labels.copy(), 0
  out = labels[np.ix_(*[_nearest(a, b) for a, b in zip(labels.shape, shape)])]
  marked = np.argwhere(labels != fill)
  if not len(marked):
    return out, 0
  forward = np.stack(
    [np.clip(np.floor((marked[:, a] + 0.5) * (n / m)), 0, n - 1) for a, (m, n) in enumerate(zip(labels.shape, shape))],
    axis=1,
  ).astype(np.int64)
  values = labels[tuple(marked.T)]
  spots = tuple(forward.T)
  empty = out[spots] == fill
  out[tuple(f[empty] for f in spots)] = values[empty]
  lost = int(np.count_nonzero(out[spots] != values))
  return out, lost
