"""Between the image's grid and the model's: marks go to the model's grid (:func:`to_model`), label
maps and logits come back (:func:`to_image`, :func:`labels_from_logits`), each undoing what
:mod:`scribblejax.pipeline.preprocess` recorded in a :class:`~scribblejax.pipeline.preprocess.Fitted`
(axis order, crop, length-1 axes, resampling, padding)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from scribblejax.models.regions import region_labels
from scribblejax.pipeline.preprocess import Fitted, Resampling
from scribblejax.pipeline.resampling import cover_label_map, resample, resample_label_map, separate_axis
from scribblejax.refinement.merge import merge_masks


def inside(fitted: Fitted) -> tuple[slice, ...]:
  """The slices of the model's layout that hold the image (all of it when nothing was padded)."""
  if not fitted.pad:
    return (slice(None),) * (fitted.image.ndim - 1)
  return tuple(slice(a, n - b) for (a, b), n in zip(fitted.pad, fitted.image.shape[:-1]))


def _resampled_shape(fitted: Fitted) -> tuple[int, ...]:
  """The model-layout spatial shape after resampling, before padding."""
  pad = fitted.pad or ((0, 0),) * (fitted.image.ndim - 1)
  return tuple(n - a - b for n, (a, b) in zip(fitted.image.shape[:-1], pad))


def _before_resampling(array: np.ndarray, fitted: Fitted) -> np.ndarray:
  """An image-layout array in the model's axis order, cropped and squeezed as the image was."""
  if fitted.order is not None:
    array = np.transpose(array, fitted.order)
  if fitted.crop is not None:
    array = array[fitted.crop.box]
  return np.squeeze(array, axis=fitted.squeezed) if fitted.squeezed else array


def _image_layout(array: np.ndarray, fitted: Fitted, fill: int) -> np.ndarray:
  """Back to the image's axes: length-1 axes restored, the crop undone (``fill`` around it), axes
  reordered."""
  array = np.expand_dims(array, fitted.squeezed) if fitted.squeezed else array
  if fitted.crop is not None:
    full = np.full(fitted.crop.shape, fill, array.dtype)
    full[fitted.crop.box] = array
    array = full
  if fitted.order is not None:
    array = np.transpose(array, np.argsort(fitted.order))
  return array


def to_model(array: np.ndarray, fitted: Fitted, fill: int = -1) -> np.ndarray:
  """A ``[*image_spatial]`` array in the model's spatial layout (padding, if any, holds ``fill``:
  unmarked for marks)."""
  return to_model_counted(array, fitted, fill)[0]


def to_model_counted(array: np.ndarray, fitted: Fitted, fill: int = -1) -> tuple[np.ndarray, int]:
  """:func:`to_model`, and how many marked voxels lost their label to another mark sharing their
  voxel of the model's grid (only where the image was resampled to a coarser grid)."""
  lost = 0
  array = _before_resampling(array, fitted)
  if fitted.resampling is not None:
    array, lost = resample_label_map(array, _resampled_shape(fitted), fill=fill)
  return (np.pad(array, fitted.pad, constant_values=fill) if fitted.pad else array), lost


def _logit_orders(resampling: Resampling) -> tuple[int, ...] | None:
  """Per model axis, the interpolation order that brings logits back to the image's grid, when each is
  0 or 1 (convex blends of the voxels read); ``None`` otherwise."""
  axis = separate_axis(resampling.target, resampling.spacing, resampling.logits)  # as labels_from_logits
  orders = tuple(
    resampling.logits.order_z if a == axis else resampling.logits.order for a in range(len(resampling.shape))
  )
  return orders if all(o in (0, 1) for o in orders) else None


def cover_marks(model_marks: np.ndarray, image_marks: np.ndarray, fitted: Fitted) -> np.ndarray:
  """``model_marks`` with each unmarked voxel that the logits' way back to the image's grid reads for a
  marked image pixel given that pixel's label (:func:`scribblejax.pipeline.resampling.cover_label_map`).

  A mark goes to the model's grid as its nearest voxel (:func:`to_model`), but the segmentation comes
  back by interpolating the logits of the voxels around it; with these voxels marked too, a loop that
  honours every mark on the model's grid honours them on the image's grid. Unchanged without
  resampling, or when logits come back with splines of order 2 or more (no convex blends).
  """
  orders = None if fitted.resampling is None else _logit_orders(fitted.resampling)
  if orders is None:
    return model_marks
  out = np.array(model_marks, copy=True)
  region = inside(fitted)
  out[region] = cover_label_map(_before_resampling(image_marks, fitted), out[region], orders)
  return out


def to_image(array: np.ndarray, fitted: Fitted) -> np.ndarray:
  """A ``[*model_spatial]`` label map or marks (``-1`` unmarked) back in the image's spatial layout
  (nearest neighbour where the image was resampled; logits go back by :func:`labels_from_logits`)."""
  array = array[inside(fitted)]
  if fitted.resampling is not None:
    array, _ = resample_label_map(array, fitted.resampling.shape, fill=-1)
  return _image_layout(array, fitted, fill=-1)


def masks_on_image(
  refined_output: Any, initial_logits: Any, fitted: Fitted, config: Any
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
  """The merge's ``(free, near, protected)`` masks (:func:`scribblejax.refinement.merge.merge_masks`) on
  the image's grid, from model-layout scores brought back as the labels are (:func:`labels_from_logits`:
  cropped, resampled, then put in the image's layout); all ``None`` for a region-based network (its
  sigmoids are no distribution over classes).

  Args:
    refined_output: the refined network's model-layout scores (logits, or a softmax with
      ``config.output == "probabilities"``), or ``None``.
    initial_logits: the network's (W) model-layout logits, or ``None``.
    fitted: the image on the model's grid.
    config: the round's settings (the merge's thresholds).
  """
  if fitted.regions is not None:
    return None, None, None
  back = lambda scores: None if scores is None else _scores_on_image_grid(scores, fitted)
  masks = merge_masks(back(refined_output), back(initial_logits), config)
  return tuple(None if mask is None else _image_layout(np.asarray(mask, bool), fitted, fill=False) for mask in masks)


def image_on_image_grid(fitted: Fitted) -> np.ndarray:
  """The image as the model reads it (channels adapted, normalised), brought back to the image's grid
  and axes as the labels are: ``float32[*image_spatial, C]``, NaN outside the crop (the model never read
  those pixels, and the merge reads no neighbour there). What the merge reads its intensities from
  (``RefineConfig.merge_contrast``)."""
  image = _scores_on_image_grid(fitted.image, fitted)
  return np.stack([_image_layout(image[..., c], fitted, fill=np.nan) for c in range(image.shape[-1])], axis=-1)


def _scores_on_image_grid(scores: Any, fitted: Fitted) -> np.ndarray:
  """Model-layout scores cropped to the image and resampled back to its spacing (still in the model's
  axis order, before length-1 axes and the crop's border are restored)."""
  scores = np.asarray(scores)[inside(fitted)]
  if fitted.resampling is not None:
    r = fitted.resampling
    scores = resample(scores, r.shape, r.target, r.spacing, r.logits)
  return scores


def labels_from_logits(logits: Any, fitted: Fitted) -> np.ndarray:
  """The labels ``int32[*image_spatial]`` of model-layout logits: cropped, resampled back to the
  image's grid (the model's logits scheme, as nnU-Net exports) where the image was resampled, then
  the largest logit's class (for region logits, nnU-Net's rule: :func:`scribblejax.models.region_labels`)."""
  logits = _scores_on_image_grid(logits, fitted)
  if fitted.regions is not None:
    labels = region_labels(logits, fitted.regions)
  else:
    labels = np.argmax(logits, axis=-1).astype(np.int32)
  return _image_layout(labels, fitted, fill=0)


def check_marks_inside_crop(marks: np.ndarray, fitted: Fitted, class_names: Sequence[str] | None) -> None:
  """Refuses marks of a class other than background outside the non-zero region an image was cropped
  to (the segmentation is background there, whatever the network learns).

  Raises:
    ValueError: naming the classes and the voxel counts.
  """
  if fitted.crop is None:
    return
  layout = np.transpose(marks, fitted.order) if fitted.order is not None else marks
  outside = layout.copy()
  outside[fitted.crop.box] = -1
  labels, counts = np.unique(outside[outside > 0], return_counts=True)
  if len(labels):
    names = class_names or ()
    what = ", ".join(
      f"{counts[i]} voxel(s) of {names[k] if k < len(names) else f'class {k}'}" for i, k in enumerate(labels)
    )
    raise ValueError(
      f"marks lie outside the image's non-zero region ({what}), where this model's pipeline "
      "(nnU-Net's crop to the non-zero region) always gives background; pass --no-crop to let "
      "the network see the whole image"
    )
