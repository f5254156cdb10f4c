"""An image made ready for a network, as nnU-Net prepares it: axes in the model's order, channels
adapted, cropped to the non-zero region, normalised, resampled to the model's spacing, padded to the
patch or to a size the network accepts.

Each step returns a new :class:`Fitted` that records what it did, so that :mod:`scribblejax.pipeline.grid`
can bring marks to the model's grid and results back. Where an image is adapted (RGB(A) to grey by
luminance for a one-channel model, RGBA to RGB, grey to RGB, a length-1 axis dropped, ...) a note in
words says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from scribblejax._checks import is_integer
from scribblejax.io.images import MEDICAL, RASTER, Image, exif_note
from scribblejax.pipeline.normalization import nonzero_mask, normalize
from scribblejax.pipeline.resampling import IMAGE, LOGITS, ResampleScheme, resample, resampled_shape
from scribblejax.pipeline.sliding_window import pad_to_patch, window_starts
from scribblejax.pipeline.spec import InferenceOptions, InputSpec, crops_to_nonzero, input_axis_order, stated_sizes
from scribblejax.refinement import num_classes_of


class Crop(NamedTuple):
  """The box an image was cropped to, in the model's axis order before length-1 axes are dropped."""

  box: tuple[slice, ...]
  shape: tuple[int, ...]  # the uncropped spatial shape


class Resampling(NamedTuple):
  """How an image went to the model's voxel spacing, to bring results back."""

  shape: tuple[int, ...]  # the model-layout spatial shape before resampling
  spacing: tuple[float, ...]  # the image's spacing, in model layout
  target: tuple[float, ...]  # the model's spacing
  logits: Any  # ResampleScheme of logits on the way back


class Fitted(NamedTuple):
  """An image made ready for a model."""

  image: np.ndarray  # float32[*model_spatial, C]: channels adapted and normalised
  squeezed: tuple[int, ...]  # spatial axes (after `order`) dropped (each of length 1)
  notes: tuple[str, ...]  # what was adapted, in words
  order: tuple[int, ...] | None = None  # the image's spatial axes in the order the model reads them
  pad: tuple[tuple[int, int], ...] | None = None  # zeros added before/after each model axis (see pad_to_fit)
  resampling: Resampling | None = None  # the image was resampled to the model's spacing (see resample_to_model)
  patch: tuple[int, ...] | None = None  # the network runs patch by patch (see fit_to_patch)
  crop: Crop | None = None  # the image was cropped to its non-zero region (see nonzero_box)
  slices: bool = False  # a 2-D model segments the volume slice by slice along model axis 0
  regions: tuple[int, ...] | None = None  # the network gives region logits: the class each region writes


def span_text(box: Sequence[slice]) -> str:
  """A box as ``[a:b, c:d]``."""
  return "[" + ", ".join(f"{b.start}:{b.stop}" for b in box) + "]"


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
  return tuple(round(float(v), 4) for v in values)


def adapt_channels(
  array: np.ndarray, want: int | None, what: str, family: str | None = None
) -> tuple[np.ndarray, str | None]:
  """Makes ``array`` ``[*spatial, C]`` have ``want`` channels where that is unambiguous.

  Colour conversions (RGB(A) to grey, dropping alpha, grey to RGB) apply only to raster images
  (``images.RASTER``: PNG, JPEG, TIFF) or images of unknown ``family``. A NIfTI, NRRD or DICOM image's
  channels are separate volumes or modalities: never converted.

  Returns:
    The array and a note saying what was converted (``None``: nothing).

  Raises:
    ValueError: the channel counts cannot be reconciled.
  """
  have = array.shape[-1]
  if want is None or have == want:
    return array, None
  if family is not None and family not in RASTER:
    raise ValueError(
      f"the model takes {want} channel(s), but {what} has {have}; the channels of a {family} "
      "image are separate volumes or modalities, not colours: save the one(s) the model "
      "takes as an image of their own"
    )
  x = array.astype(np.float32)
  if want == 1 and have in (3, 4):
    grey = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    return grey[..., None], f"converted the {'RGBA' if have == 4 else 'RGB'} image to grey (luminance)"
  if want == 1 and have == 2:
    return x[..., :1], "dropped the alpha channel of the grey image"
  if want == 3 and have == 4:
    return x[..., :3], "dropped the alpha channel"
  if want == 3 and have == 1:
    return np.repeat(x, 3, axis=-1), "repeated the grey channel as RGB"
  raise ValueError(f"the model takes {want} channel(s), but {what} has {have}")


def _squeezed_axes(spatial: tuple[int, ...], spec: InputSpec, path: str) -> tuple[int, ...]:
  """The length-1 axes to drop for a model with fewer spatial dimensions (the last ones)."""
  if spec.spatial_dims is None or len(spatial) == spec.spatial_dims:
    return ()
  ones = [a for a, n in enumerate(spatial) if n == 1]
  extra = len(spatial) - spec.spatial_dims
  if extra < 0 or len(ones) < extra:
    raise ValueError(f"the model takes {spec.spatial_dims}-D images, but {path} has spatial shape {tuple(spatial)}")
  return tuple(ones[len(ones) - extra :])


def fit_image(
  image: Image,
  spec: InputSpec,
  normalization: Any,
  metadata: dict | None = None,
  crop: bool = False,
  slices: bool = False,
) -> Fitted:
  """Orders axes, adapts channels, crops to the non-zero region (``crop`` and a model that crops, see
  :func:`scribblejax.pipeline.spec.crops_to_nonzero`), normalises as the model expects, and drops
  length-1 axes the model lacks.

  Args:
    image: as read.
    spec: what the model takes.
    normalization: the model's normalisation spec.
    metadata: ``model.json``'s metadata (its ``input_axis_order``, see
      :func:`scribblejax.pipeline.spec.input_axis_order`).
    crop: crop as nnU-Net crops, where the model asks for it.
    slices: a 2-D model may take a volume without a length-1 axis slice by slice: along the model's
      first axis when the model states an axis order (nnU-Net), else along a medical image's last
      axis (NIfTI's k) or a TIFF stack's first; ``Fitted.slices`` says so.

  Returns:
    The fitted image.

  Raises:
    ValueError: the image has more (non-trivial) or fewer spatial dimensions than the model, or
      channels that cannot be adapted.
  """
  notes = [note for note in [exif_note(image.geometry)] if note]
  array, note = adapt_channels(image.array, spec.in_channels, image.path, image.family)
  bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
  if bad:
    raise ValueError(f"{image.path} contains {bad} NaN or Inf values; the network needs finite pixels")
  if note:
    notes.append(note)
  order = input_axis_order(metadata, image.family, array.ndim - 1)
  sliced = slices and spec.spatial_dims == 2 and array.ndim == 4 and 1 not in array.shape[:-1]
  if sliced and order is None and image.family in MEDICAL:
    order = (2, 0, 1)
  if order is not None:
    array = np.transpose(array, (*order, array.ndim - 1))
    notes.append(
      f"read the image's axes in the order {list(order)}, as the model was trained to read them "
      "(model.json metadata.input_axis_order)"
    )
  spatial = array.shape[:-1]
  squeezed: tuple[int, ...] = ()
  if sliced:
    notes.append(
      f"the model is 2-D: it segments the volume slice by slice along the image's axis "
      f"{order[0] if order is not None else 0} ({spatial[0]} slices of {tuple(spatial[1:])})"
    )
  else:
    squeezed = _squeezed_axes(spatial, spec, image.path)
    if squeezed:
      notes.append(f"dropped length-1 axis {list(squeezed)} of the image for a {spec.spatial_dims}-D model")
  box = None
  if crop and crops_to_nonzero(metadata):
    box = nonzero_box(array)
    if box is not None and tuple(b.stop - b.start for b in box) != array.shape[:-1]:
      notes.append(
        f"cropped the image to its non-zero region {span_text(box)} before normalising, as nnU-Net "
        "does; outside it the segmentation is background"
      )
      array = array[box]
    else:
      box = None
  array = normalize(array, normalization)
  if squeezed:
    array = np.squeeze(array, axis=squeezed)
  cropped = None if box is None else Crop(box, tuple(spatial))
  return Fitted(np.ascontiguousarray(array, np.float32), squeezed, tuple(notes), order, crop=cropped, slices=sliced)


def nonzero_box(array: np.ndarray) -> tuple[slice, ...] | None:
  """The bounding box of the voxels where any channel is non-zero, holes filled (nnU-Net's
  ``crop_to_nonzero``); ``None`` for an image that is zero everywhere."""
  mask = nonzero_mask(array)
  if not mask.any():
    return None
  where = np.argwhere(mask)
  return tuple(slice(int(a), int(b) + 1) for a, b in zip(where.min(axis=0), where.max(axis=0)))


def pipeline_spacing(geometry: Any) -> tuple[tuple[float, ...], str | None]:
  """The pixel spacing resampling reads from an image, and a note when it is not the file's.

  As nnU-Net's readers: a 2-D PNG, JPEG or TIFF has spacing 1 (its natural-image reader ignores TIFF
  resolution tags, which are mostly a print resolution in dots per inch); a 3-D TIFF stack has the
  physical spacing its ImageJ or OME metadata states (nnU-Net's 3-D TIFF reader takes it from a
  sidecar file), else 1.
  """
  spacing = tuple(float(s) for s in geometry.spacing)
  if geometry.family not in RASTER:
    return spacing, None
  header = geometry.header if isinstance(geometry.header, dict) else {}
  if len(spacing) == 3 and header.get("imagej"):
    return spacing, None
  ones = (1.0,) * len(spacing)
  if spacing == ones:
    return ones, None
  return ones, (
    f"took the raster image's pixel spacing as 1 for resampling, as nnU-Net reads such images, "
    f"not its resolution tags' {_rounded(spacing)}"
  )


def _resample_schemes(metadata: dict | None) -> dict:
  """The image's and the logits' :class:`ResampleScheme`: ``metadata.resampling``'s, else nnU-Net's."""
  stated = (metadata or {}).get("resampling") or {}
  schemes = {}
  for key, default in (("image", IMAGE), ("logits", LOGITS)):
    given = stated.get(key) if isinstance(stated, dict) else None
    try:
      schemes[key] = default if given is None else ResampleScheme(**given)
    except (TypeError, ValueError) as err:
      raise ValueError(f"model.json metadata.resampling.{key}: {err}") from None
  return schemes


def resample_to_model(fitted: Fitted, image: Image, metadata: dict | None) -> Fitted:
  """Resamples a fitted image to the model's voxel spacing (``metadata.spacing``), as nnU-Net does
  after normalising (:mod:`scribblejax.pipeline.resampling`); unchanged when the model states no
  spacing or the resampled shape equals the image's."""
  ndim = fitted.image.ndim - 1
  target = stated_sizes(metadata, "spacing", ndim - 1 if fitted.slices else ndim, float)
  if target is None:
    return fitted
  spacing, spacing_note = pipeline_spacing(image.geometry)
  if fitted.order is not None:
    spacing = tuple(spacing[a] for a in fitted.order)
  spacing = tuple(s for a, s in enumerate(spacing) if a not in fitted.squeezed)
  if fitted.slices:  # nnU-Net's 2-D configurations leave the slice axis alone
    target = (spacing[0], *target)
  shape = tuple(fitted.image.shape[:-1])
  new = resampled_shape(shape, spacing, target)
  if spacing_note:
    fitted = fitted._replace(notes=(*fitted.notes, spacing_note))
  if new == shape:
    return fitted
  schemes = _resample_schemes(metadata)
  array = resample(fitted.image, new, spacing, target, schemes["image"])
  note = (
    f"resampled the image from spacing {_rounded(spacing)} ({shape}) to the model's {_rounded(target)} "
    f"({new}); results are resampled back"
  )
  return fitted._replace(
    image=array, notes=(*fitted.notes, note), resampling=Resampling(shape, spacing, target, schemes["logits"])
  )


def _patch_of(fitted: Fitted, metadata: dict | None, options: InferenceOptions) -> tuple[int, ...] | None:
  """The patch the network runs on, before whole slices are filled in (``None``: not stated)."""
  ndim = fitted.image.ndim - 1 - fitted.slices
  if options.patch_size is None:
    return None
  if options.patch_size == "auto":
    return stated_sizes(metadata, "patch_size", ndim, int)
  patch = tuple(options.patch_size)
  if len(patch) != ndim or not all(is_integer(v) and v > 0 for v in patch):
    raise ValueError(f"the patch size must be {ndim} positive integers for a {ndim}-D model, got {list(patch)}")
  return patch


def fit_to_patch(fitted: Fitted, metadata: dict | None, options: InferenceOptions) -> Fitted:
  """Sets the patch the network runs on (``options.patch_size``, or the model's ``metadata.patch_size``)
  and pads axes shorter than it with zeros (half before, as nnU-Net pads); unchanged for whole-image
  inference.

  Raises:
    ValueError: the patch size is not one positive size per model axis.
  """
  if options.patch_size is None and not fitted.slices:
    return fitted
  patch = _patch_of(fitted, metadata, options)
  if fitted.slices:  # one slice at a time: whole slices unless the model states a patch
    patch = (1, *(patch or fitted.image.shape[1:-1]))
  if patch is None:
    return fitted
  pad = pad_to_patch(fitted.image.shape[:-1], patch)
  padded = any(a or b for a, b in pad)
  notes = list(fitted.notes)
  if padded:
    notes.append(
      f"padded the image from {tuple(fitted.image.shape[:-1])} with zeros (after normalisation) to at "
      f"least the patch {patch}; results are cropped back"
    )
  try:
    grid = np.pad(fitted.image, (*pad, (0, 0))) if padded else fitted.image
  except MemoryError:
    raise ValueError(
      f"padding the image {tuple(fitted.image.shape[:-1])} to the patch {patch} needs more memory "
      "than there is; choose a smaller --patch-size"
    ) from None
  count = int(np.prod([len(window_starts(n, p, options.step)) for n, p in zip(grid.shape[:-1], patch)]))
  if fitted.slices and patch[1:] == grid.shape[1:-1]:
    notes.append(f"the network runs one whole slice at a time ({count} slices)")
  else:
    notes.append(f"the network runs patch by patch: {count} patch(es) of {patch}, Gaussian-weighted where they overlap")
  return fitted._replace(image=grid, pad=pad if padded else None, patch=patch, notes=tuple(notes))


def network_input(fitted: Fitted) -> tuple[int, ...]:
  """The shape ``[*spatial, C]`` one network call takes: a patch, or the whole fitted image."""
  return fitted.image.shape if fitted.patch is None else (*fitted.patch, fitted.image.shape[-1])


def accepts(split: Any, shape: tuple[int, ...]) -> bool:
  """Whether the network takes an image of ``shape`` ``[*spatial, C]`` (traced, not run)."""
  try:
    num_classes_of(split, shape)
    return True
  except ValueError:
    return False


def fit_network(split: Any, fitted: Fitted) -> Fitted:
  """Pads the image to a size the network accepts (:func:`pad_to_fit`); with patches, checks that the
  network accepts the patch instead.

  Raises:
    ValueError: the network refuses the patch (its own error).
  """
  if fitted.patch is None:
    return pad_to_fit(split, fitted)
  if fitted.slices and fitted.patch[1:] == fitted.image.shape[1:-1] and not accepts(split, network_input(fitted)):
    padded = pad_to_fit(split, fitted, fixed=(0,))  # whole slices: pad them in-plane instead
    return padded._replace(patch=(1, *padded.image.shape[1:-1]))
  try:
    num_classes_of(split, network_input(fitted))
  except ValueError as err:
    raise ValueError(f"the network refuses patches of {fitted.patch}: {err}") from None
  return fitted


def pad_to_fit(split: Any, fitted: Fitted, most: int = 7, fixed: tuple[int, ...] = ()) -> Fitted:
  """Pads the image with zeros (after normalisation, as nnU-Net pads) to a size the network accepts.

  Networks whose downsampling needs sizes divisible by some factor (nnU-Net, MONAI's UNet and
  SegResNet) refuse other sizes. Each axis is padded to the smallest multiple of a power of two
  (at most ``2**most``) that the network accepts, half before and half after;
  :func:`scribblejax.pipeline.grid.to_model` pads marks with "unmarked" and
  :func:`scribblejax.pipeline.grid.to_image` crops results back. Axes in ``fixed`` keep their size (a
  volume's slice axis for a 2-D network).

  Raises:
    ValueError: no such padding makes the network accept the image (its own error).
  """
  shape = fitted.image.shape
  if accepts(split, shape):
    return fitted
  spatial = list(shape[:-1])
  up = lambda n, m, axis: n if axis in fixed else -(-n // m) * m
  for k in range(1, most + 1):
    target = [up(n, 2**k, a) for a, n in enumerate(spatial)]
    if accepts(split, (*target, shape[-1])):
      break
  else:
    num_classes_of(split, shape)  # the model's own error
  for axis in range(len(spatial)):  # then each axis as little as it needs
    for j in range(k):
      trial = target[:axis] + [up(spatial[axis], 2**j, axis)] + target[axis + 1 :]
      if accepts(split, (*trial, shape[-1])):
        target = trial
        break
  pad = tuple(((t - n) // 2, t - n - (t - n) // 2) for n, t in zip(spatial, target))
  note = (
    f"padded the image from {tuple(spatial)} to {tuple(target)} with zeros (after normalisation) for the "
    "network's downsampling; results are cropped back"
  )
  image = np.pad(fitted.image, (*pad, (0, 0)))
  return fitted._replace(image=image, pad=pad, notes=(*fitted.notes, note))
