"""The predict, refine and info workflows behind the command line, as plain functions.

Each reads files, runs the network and writes its outputs atomically; none modifies an input. Bad
input raises ``ValueError`` with a one-line message naming the problem, before any heavy work where
possible (files and model description are checked before the network is loaded).

Images are fitted to the model: the model's stored normalisation is applied
(:func:`scribblejax.pipeline.normalization.normalize`), length-1 spatial axes are dropped when the model has fewer
spatial dimensions (a NIfTI slice ``[i, j, 1]`` for a 2-D model), and channels are adapted where
that is unambiguous (RGB(A) -> grey by luminance for a one-channel model, RGBA -> RGB, grey -> RGB);
each adaptation is reported in ``notes``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from scribblejax.io import fileio

from scribblejax.io import session_store
from scribblejax.io.images import MEDICAL, RASTER, Image, _suffix, image_digest, output_format, read_image, write_label_map
from scribblejax.io.marks_files import RECTANGLE_MODES, read_marks

Log = Callable[[str], None]
DEFAULT_LAYERS = 5
# refine segments the image with W and with the refined weights in one pass over the patches when their
# two float32 logits volumes take at most this many bytes (else one pass after the other)
JOINT_LOGITS_BYTES = 4 * 2 ** 30
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
COMPILE_NOTE = ("compile_seconds: time JAX reported spending on tracing, lowering and XLA compilation during "
                "the timed call (jax.monitoring events); seconds includes it")


def _silent(message: str) -> None:
  del message


# ----------------------------------------------------------------------------------------------
# What the model expects, and fitting an image to it.

class InputSpec(NamedTuple):
  """What a model takes and gives (``None`` where the model does not say)."""
  spatial_dims: int | None
  in_channels: int | None
  num_classes: int | None


_KWARG_NAMES = {"spatial_dims": ("spatial_dims",), "in_channels": ("in_channels", "input_channels"),
                "num_classes": ("num_classes", "out_channels", "classes")}


def spec_from_info(info: Any) -> InputSpec:
  """The input spec as far as ``model.json``'s constructor arguments state it (no model built; ``info``
  ``None``: nothing stated)."""
  return _spec_from_kwargs(getattr(info, "family", None), getattr(info, "kwargs", None) or {})


def _spec_from_kwargs(family: str | None, kwargs: dict) -> InputSpec:
  if family in ("scribblejax.models.Ensemble", "scribblejax.models.Regions") and isinstance(kwargs.get("kwargs"), dict):
    inner = _spec_from_kwargs(kwargs.get("family"), kwargs["kwargs"])   # the wrapped network states it
    if family == "scribblejax.models.Regions":
      order = kwargs.get("order")
      inner = inner._replace(num_classes=len(order) + 1 if isinstance(order, list) else None)
    return inner
  found = {}
  for field, names in _KWARG_NAMES.items():
    found[field] = next((int(kwargs[n]) for n in names if isinstance(kwargs.get(n), (int, np.integer))), None)
  return InputSpec(**found)


def spec_of(model: Any, info: Any) -> InputSpec:
  """The input spec from the model's attributes, else from ``model.json``."""
  stated = spec_from_info(info)
  found = {}
  for field in InputSpec._fields:
    value = getattr(model, field, None)
    found[field] = int(value) if isinstance(value, (int, np.integer)) else getattr(stated, field)
  return InputSpec(**found)


class Fitted(NamedTuple):
  """An image made ready for a model."""
  image: np.ndarray               # float32[*model_spatial, C]: channels adapted and normalised
  squeezed: tuple[int, ...]       # spatial axes (after `order`) dropped (each of length 1)
  notes: tuple[str, ...]          # what was adapted, in words
  order: tuple[int, ...] | None = None   # the image's spatial axes in the order the model reads them
  pad: tuple[tuple[int, int], ...] | None = None   # zeros added before/after each model axis (see pad_to_fit)
  resampling: "Resampling | None" = None  # the image was resampled to the model's spacing (see resample_to_model)
  patch: tuple[int, ...] | None = None   # the network runs patch by patch (see fit_to_patch)
  crop: "Crop | None" = None     # the image was cropped to its non-zero region (see nonzero_box)
  slices: bool = False           # a 2-D model segments the volume slice by slice along model axis 0
  regions: tuple[int, ...] | None = None  # the network gives region logits: the class each region writes


class Crop(NamedTuple):
  """The box an image was cropped to, in the model's axis order before length-1 axes are dropped."""
  box: tuple[slice, ...]
  shape: tuple[int, ...]          # the uncropped spatial shape


class Resampling(NamedTuple):
  """How an image went to the model's voxel spacing, to bring results back."""
  shape: tuple[int, ...]          # the model-layout spatial shape before resampling
  spacing: tuple[float, ...]      # the image's spacing, in model layout
  target: tuple[float, ...]       # the model's spacing
  logits: Any                     # ResampleScheme of logits on the way back


def input_axis_order(metadata: dict | None, family: str, ndim: int) -> tuple[int, ...] | None:
  """The order in which a model reads an image's spatial axes, when it is not the image's own.

  A model states it in ``model.json`` ``metadata.input_axis_order``: ``{"medical": [...], "raster":
  [...]}``, a permutation of the spatial axes as :func:`read_image` gives them, per family group
  (``None`` or absent: as given). nnU-Net networks read volumes in SimpleITK's order (the reverse of
  NIfTI's ``(i, j, k)``) and then apply the plans' ``transpose_forward``; models converted before
  the key existed are recognised by ``metadata.source == "nnunetv2"``.

  Raises:
    ValueError: the stated order is not a permutation of the image's spatial axes.
  """
  orders = stated_axis_orders(metadata)
  if not orders:
    return None
  order = orders.get("medical" if family in MEDICAL else "raster")
  if order is None:
    return None
  order = tuple(int(a) for a in order)
  if len(order) == 3 and ndim == 2 and order[0] == 0:     # a 3-D order over (1, y, x) for a 2-D raster image
    order = (order[1] - 1, order[2] - 1)
  if sorted(order) != list(range(ndim)):
    raise ValueError(f"the model reads images with axis order {list(order)}, which does not fit an image with "
                     f"{ndim} spatial axes (model.json metadata.input_axis_order)")
  return None if order == tuple(range(ndim)) else order


def stated_axis_orders(metadata: dict | None) -> dict | None:
  """``metadata.input_axis_order``, or an nnU-Net model's order for models converted before the key."""
  metadata = metadata or {}
  orders = metadata.get("input_axis_order")
  if orders is None and metadata.get("source") == "nnunetv2":
    orders = nnunet_axis_order(metadata.get("transpose_forward"))
  return orders


def nnunet_axis_order(transpose_forward: Any) -> dict:
  """``metadata.input_axis_order`` of an nnU-Net network (see :func:`input_axis_order`)."""
  forward = [int(a) for a in (transpose_forward or (0, 1, 2))]
  if len(forward) == 2:                 # a 2-D plans' order over (y, x): z stays first
    forward = [0, forward[0] + 1, forward[1] + 1]
  return {"medical": [(2, 1, 0)[a] for a in forward], "raster": forward}


def adapt_channels(array: np.ndarray, want: int | None, what: str,
                   family: str | None = None) -> tuple[np.ndarray, str | None]:
  """Makes ``array`` ``[*spatial, C]`` have ``want`` channels where that is unambiguous.

  Colour conversions (RGB(A) to grey, dropping alpha, grey to RGB) apply only to raster images
  (``images.RASTER``: PNG, JPEG, TIFF) or images of unknown ``family``. A NIfTI, NRRD or DICOM image's
  channels are separate volumes or modalities: never converted.

  Raises:
    ValueError: the channel counts cannot be reconciled.
  """
  have = array.shape[-1]
  if want is None or have == want:
    return array, None
  if family is not None and family not in RASTER:
    raise ValueError(f"the model takes {want} channel(s), but {what} has {have}; the channels of a {family} "
                     "image are separate volumes or modalities, not colours: save the one(s) the model "
                     "takes as an image of their own")
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


def fit_image(image: Image, spec: InputSpec, normalization: Any, metadata: dict | None = None,
              crop: bool = False, slices: bool = False) -> Fitted:
  """Orders axes, adapts channels, crops to the non-zero region (``crop`` and a model that crops, see
  :func:`crops_to_nonzero`), normalises as the model expects, and drops length-1 axes the model lacks.

  Args:
    image: as read.
    spec: what the model takes.
    normalization: the model's normalisation spec.
    metadata: ``model.json``'s metadata (its ``input_axis_order``, see :func:`input_axis_order`).
    crop: crop as nnU-Net crops, where the model asks for it.
    slices: a 2-D model may take a volume without a length-1 axis slice by slice: along the model's
      first axis when the model states an axis order (nnU-Net), else along a medical image's last
      axis (NIfTI's k) or a TIFF stack's first; ``Fitted.slices`` says so.

  Raises:
    ValueError: the image has more (non-trivial) or fewer spatial dimensions than the model, or
      channels that cannot be adapted.
  """
  from scribblejax.io.images import exif_note
  from scribblejax.pipeline.normalization import normalize
  notes = [note for note in [exif_note(image.geometry)] if note]
  array, note = adapt_channels(image.array, spec.in_channels, image.path, image.family)
  bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
  if bad:
    raise ValueError(f"{image.path} contains {bad} NaN or Inf values; the network needs finite pixels")
  if note:
    notes.append(note)
  order = input_axis_order(metadata, image.family, array.ndim - 1)
  sliced = (slices and spec.spatial_dims == 2 and array.ndim == 4 and 1 not in array.shape[:-1])
  if sliced and order is None and image.family in MEDICAL:
    order = (2, 0, 1)
  if order is not None:
    array = np.transpose(array, (*order, array.ndim - 1))
    notes.append(f"read the image's axes in the order {list(order)}, as the model was trained to read them "
                 "(model.json metadata.input_axis_order)")
  spatial = array.shape[:-1]
  squeezed: tuple[int, ...] = ()
  if sliced:
    notes.append(f"the model is 2-D: it segments the volume slice by slice along the image's axis "
                 f"{order[0] if order is not None else 0} ({spatial[0]} slices of {tuple(spatial[1:])})")
  elif spec.spatial_dims is not None and len(spatial) != spec.spatial_dims:
    ones = [a for a, n in enumerate(spatial) if n == 1]
    extra = len(spatial) - spec.spatial_dims
    if extra < 0 or len(ones) < extra:
      raise ValueError(f"the model takes {spec.spatial_dims}-D images, but {image.path} has spatial shape "
                       f"{tuple(spatial)}")
    squeezed = tuple(ones[len(ones) - extra:])
    notes.append(f"dropped length-1 axis {list(squeezed)} of the image for a {spec.spatial_dims}-D model")
  box = None
  if crop and crops_to_nonzero(metadata):
    box = nonzero_box(array)
    if box is not None and tuple(b.stop - b.start for b in box) != array.shape[:-1]:
      notes.append(f"cropped the image to its non-zero region {_span(box)} before normalising, as nnU-Net does; "
                   "outside it the segmentation is background")
      array = array[box]
    else:
      box = None
  array = normalize(array, normalization)
  if squeezed:
    array = np.squeeze(array, axis=squeezed)
  cropped = None if box is None else Crop(box, tuple(spatial))
  return Fitted(np.ascontiguousarray(array, np.float32), squeezed, tuple(notes), order, crop=cropped, slices=sliced)


def crops_to_nonzero(metadata: dict | None) -> bool:
  """Whether a model's images are cropped to their non-zero region (``metadata.crop_to_nonzero``; nnU-Net
  models, also those converted before the key existed)."""
  metadata = metadata or {}
  return bool(metadata.get("crop_to_nonzero", metadata.get("source") == "nnunetv2"))


def nonzero_box(array: np.ndarray) -> tuple[slice, ...] | None:
  """The bounding box of the voxels where any channel is non-zero, holes filled (nnU-Net's
  ``crop_to_nonzero``); ``None`` for an image that is zero everywhere."""
  from scribblejax.pipeline.normalization import nonzero_mask
  mask = nonzero_mask(array)
  if not mask.any():
    return None
  where = np.argwhere(mask)
  return tuple(slice(int(a), int(b) + 1) for a, b in zip(where.min(axis=0), where.max(axis=0)))


def _span(box: Sequence[slice]) -> str:
  return "[" + ", ".join(f"{b.start}:{b.stop}" for b in box) + "]"


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
    from scribblejax.pipeline.resampling import resample_label_map
    array, lost = resample_label_map(array, _resampled_shape(fitted), fill=fill)
  return (np.pad(array, fitted.pad, constant_values=fill) if fitted.pad else array), lost


def _before_resampling(array: np.ndarray, fitted: Fitted) -> np.ndarray:
  """An image-layout array in the model's axis order, cropped and squeezed as the image was."""
  if fitted.order is not None:
    array = np.transpose(array, fitted.order)
  if fitted.crop is not None:
    array = array[fitted.crop.box]
  return np.squeeze(array, axis=fitted.squeezed) if fitted.squeezed else array


def _logit_orders(resampling: Resampling) -> tuple[int, ...] | None:
  """Per model axis, the interpolation order that brings logits back to the image's grid, when each is
  0 or 1 (convex blends of the voxels read); ``None`` otherwise."""
  from scribblejax.pipeline.resampling import separate_axis
  axis = separate_axis(resampling.target, resampling.spacing, resampling.logits)     # as labels_from_logits
  orders = tuple(resampling.logits.order_z if a == axis else resampling.logits.order
                 for a in range(len(resampling.shape)))
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
  from scribblejax.pipeline.resampling import cover_label_map
  out = np.array(model_marks, copy=True)
  region = inside(fitted)
  out[region] = cover_label_map(_before_resampling(image_marks, fitted), out[region], orders)
  return out


def _resampled_shape(fitted: Fitted) -> tuple[int, ...]:
  """The model-layout spatial shape after resampling, before padding."""
  pad = fitted.pad or ((0, 0),) * (fitted.image.ndim - 1)
  return tuple(n - a - b for n, (a, b) in zip(fitted.image.shape[:-1], pad))


def inside(fitted: Fitted) -> tuple[slice, ...]:
  """The slices of the model's layout that hold the image (all of it when nothing was padded)."""
  if not fitted.pad:
    return (slice(None),) * (fitted.image.ndim - 1)
  return tuple(slice(a, n - b) for (a, b), n in zip(fitted.pad, fitted.image.shape[:-1]))


def to_image(array: np.ndarray, fitted: Fitted) -> np.ndarray:
  """A ``[*model_spatial]`` label map or marks (``-1`` unmarked) back in the image's spatial layout
  (nearest neighbour where the image was resampled; logits go back by :func:`labels_from_logits`)."""
  array = array[inside(fitted)]
  if fitted.resampling is not None:
    from scribblejax.pipeline.resampling import resample_label_map
    array, _ = resample_label_map(array, fitted.resampling.shape, fill=-1)
  return _image_layout(array, fitted, fill=-1)


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


def unsure_on_image(logits: Any, fitted: Fitted, confidence: float) -> np.ndarray | None:
  """Where the network's top class probability is below ``confidence``, on the image's grid
  (:func:`scribblejax.refinement.merge.unsure`); ``None`` for a region-based network (its sigmoids are no
  distribution over classes) or ``confidence`` 0."""
  if fitted.regions is not None or confidence <= 0:
    return None
  from scribblejax.refinement.merge import unsure
  logits = np.asarray(logits, np.float32)
  shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
  mask = unsure(shifted / shifted.sum(axis=-1, keepdims=True), confidence)
  return to_image(np.where(mask, 1, -1).astype(np.int32), fitted) >= 0


def labels_from_logits(logits: Any, fitted: Fitted) -> np.ndarray:
  """The labels ``int32[*image_spatial]`` of model-layout logits: cropped, resampled back to the
  image's grid (the model's logits scheme, as nnU-Net exports) where the image was resampled, then
  the largest logit's class (for region logits, nnU-Net's rule: :func:`scribblejax.models.region_labels`)."""
  logits = np.asarray(logits)[inside(fitted)]
  if fitted.resampling is not None:
    from scribblejax.pipeline.resampling import resample
    r = fitted.resampling
    logits = resample(logits, r.shape, r.target, r.spacing, r.logits)
  if fitted.regions is not None:
    from scribblejax.models.regions import region_labels
    labels = region_labels(logits, fitted.regions)
  else:
    labels = np.argmax(logits, axis=-1).astype(np.int32)
  return _image_layout(labels, fitted, fill=0)


# ----------------------------------------------------------------------------------------------
# Spacing and patches.

@dataclasses.dataclass(frozen=True)
class InferenceOptions:
  """How the network sees an image on the command line.

  Attributes:
    resample: resample the image to the model's voxel spacing (``model.json`` ``metadata.spacing``,
      in the model's axis order, as nnU-Net plans state it) and results back; no effect when the
      model states none.
    patch_size: ``"auto"``: patch by patch when the model states ``metadata.patch_size`` (nnU-Net),
      else the whole image at once; ``None``: the whole image at once; or one size per model axis.
    step: patches start at most ``step * patch`` apart (nnU-Net: 0.5).
    crop: crop the image to its non-zero region before normalising, where the model asks for it
      (:func:`crops_to_nonzero`); the segmentation is background outside it.
    mirror: average the network over its input flipped along the model's mirroring axes
      (:class:`scribblejax.pipeline.sliding_window.Mirrored`; up to 8 passes in 3-D), in the refinement loop too.
    patch_batch: with patches, the most marked patches one network call of the refinement loop runs
      (:class:`scribblejax.pipeline.MarkedPatches`: more run one batch after another, each rematerialised in the
      backward pass); ``None``: as many as :func:`scribblejax.pipeline.patch_chunk` allows (128^3 voxels
      per call, mirrored copies and an ensemble's networks counted).
  """
  resample: bool = True
  patch_size: Any = "auto"
  step: float = 0.5
  crop: bool = True
  mirror: bool = False
  patch_batch: int | None = None

  def __post_init__(self):
    from scribblejax._checks import is_finite_number
    for name in ("resample", "crop", "mirror"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"InferenceOptions.{name} must be True or False, got {getattr(self, name)!r}")
    if not (self.patch_size is None or self.patch_size == "auto" or isinstance(self.patch_size, (tuple, list))):
      raise ValueError(f"the patch size must be 'auto', None or one size per axis, got {self.patch_size!r}")
    if not is_finite_number(self.step) or not 0 < self.step <= 1:
      raise ValueError(f"the sliding-window step must be in (0, 1] (a fraction of the patch), got {self.step!r}")
    from scribblejax._checks import is_integer
    if self.patch_batch is not None and (not is_integer(self.patch_batch) or self.patch_batch < 1):
      raise ValueError(f"the patches per network call must be a positive integer, got {self.patch_batch!r}")


def _stated(metadata: dict | None, key: str, ndim: int, kind: type) -> tuple | None:
  """``metadata[key]`` as ``ndim`` positive numbers of ``kind``, or ``None`` when not stated.

  Raises:
    ValueError: stated, but not ``ndim`` positive numbers.
  """
  from scribblejax._checks import is_finite_number, is_integer
  value = (metadata or {}).get(key)
  if value is None:
    return None
  check = is_integer if kind is int else is_finite_number
  if not isinstance(value, (list, tuple)) or len(value) != ndim or not all(check(v) and v > 0 for v in value):
    raise ValueError(f"model.json metadata.{key} must be {ndim} positive {kind.__name__}s for a {ndim}-D "
                     f"model, got {value!r}")
  return tuple(kind(v) for v in value)


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
  return ones, (f"took the raster image's pixel spacing as 1 for resampling, as nnU-Net reads such images, "
                f"not its resolution tags' {_rounded(spacing)}")


def resample_to_model(fitted: Fitted, image: Image, metadata: dict | None) -> Fitted:
  """Resamples a fitted image to the model's voxel spacing (``metadata.spacing``), as nnU-Net does
  after normalising (:mod:`scribblejax.pipeline.resampling`); unchanged when the model states no spacing or the
  resampled shape equals the image's."""
  from scribblejax.pipeline.resampling import IMAGE, LOGITS, ResampleScheme, resample, resampled_shape
  ndim = fitted.image.ndim - 1
  target = _stated(metadata, "spacing", ndim - 1 if fitted.slices else ndim, float)
  if target is None:
    return fitted
  spacing, spacing_note = pipeline_spacing(image.geometry)
  if fitted.order is not None:
    spacing = tuple(spacing[a] for a in fitted.order)
  spacing = tuple(s for a, s in enumerate(spacing) if a not in fitted.squeezed)
  if fitted.slices:                      # nnU-Net's 2-D configurations leave the slice axis alone
    target = (spacing[0], *target)
  shape = tuple(fitted.image.shape[:-1])
  new = resampled_shape(shape, spacing, target)
  if spacing_note:
    fitted = fitted._replace(notes=(*fitted.notes, spacing_note))
  if new == shape:
    return fitted
  stated = (metadata or {}).get("resampling") or {}
  schemes = {}
  for key, default in (("image", IMAGE), ("logits", LOGITS)):
    given = stated.get(key) if isinstance(stated, dict) else None
    try:
      schemes[key] = default if given is None else ResampleScheme(**given)
    except (TypeError, ValueError) as err:
      raise ValueError(f"model.json metadata.resampling.{key}: {err}") from None
  array = resample(fitted.image, new, spacing, target, schemes["image"])
  note = (f"resampled the image from spacing {_rounded(spacing)} ({shape}) to the model's {_rounded(target)} "
          f"({new}); results are resampled back")
  return fitted._replace(image=array, notes=(*fitted.notes, note),
                         resampling=Resampling(shape, spacing, target, schemes["logits"]))


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
  return tuple(round(float(v), 4) for v in values)


def fit_to_patch(fitted: Fitted, metadata: dict | None, options: InferenceOptions) -> Fitted:
  """Sets the patch the network runs on (``options.patch_size``, or the model's ``metadata.patch_size``)
  and pads axes shorter than it with zeros (half before, as nnU-Net pads); unchanged for whole-image
  inference.

  Raises:
    ValueError: the patch size is not one positive size per model axis.
  """
  from scribblejax._checks import is_integer
  from scribblejax.pipeline.sliding_window import pad_to_patch, window_starts
  ndim = fitted.image.ndim - 1 - fitted.slices
  if options.patch_size is None and not fitted.slices:
    return fitted
  if options.patch_size is None:
    patch = None
  elif options.patch_size == "auto":
    patch = _stated(metadata, "patch_size", ndim, int)
  else:
    patch = tuple(options.patch_size)
    if len(patch) != ndim or not all(is_integer(v) and v > 0 for v in patch):
      raise ValueError(f"the patch size must be {ndim} positive integers for a {ndim}-D model, got {list(patch)}")
  if fitted.slices:                      # one slice at a time: whole slices unless the model states a patch
    patch = (1, *(patch or fitted.image.shape[1:-1]))
  if patch is None:
    return fitted
  pad = pad_to_patch(fitted.image.shape[:-1], patch)
  padded = any(a or b for a, b in pad)
  notes = list(fitted.notes)
  if padded:
    notes.append(f"padded the image from {tuple(fitted.image.shape[:-1])} with zeros (after normalisation) to at "
                 f"least the patch {patch}; results are cropped back")
  try:
    grid = np.pad(fitted.image, (*pad, (0, 0))) if padded else fitted.image
  except MemoryError:
    raise ValueError(f"padding the image {tuple(fitted.image.shape[:-1])} to the patch {patch} needs more memory "
                     "than there is; choose a smaller --patch-size") from None
  count = int(np.prod([len(window_starts(n, p, options.step)) for n, p in zip(grid.shape[:-1], patch)]))
  if fitted.slices and patch[1:] == grid.shape[1:-1]:
    notes.append(f"the network runs one whole slice at a time ({count} slices)")
  else:
    notes.append(f"the network runs patch by patch: {count} patch(es) of {patch}, Gaussian-weighted where they "
                 "overlap")
  return fitted._replace(image=grid, pad=pad if padded else None, patch=patch, notes=tuple(notes))


def network_logits(split, fitted: Fitted, tunable: Any = None, step: float = 0.5, progress: Any = None) -> np.ndarray:
  """The network's model-layout logits on a fitted image: patch by patch when ``fitted.patch`` is set
  (``progress(done, total)`` after each), else at once."""
  from scribblejax.refinement import predict
  from scribblejax.pipeline.sliding_window import sliding_window_logits
  if fitted.patch is not None:
    return sliding_window_logits(split, fitted.image, fitted.patch, tunable, step=step, progress=progress)
  return np.asarray(predict(split, fitted.image, tunable))


# ----------------------------------------------------------------------------------------------
# Settings.

# RefineConfig fields a round's settings (and a model's stored "metadata.refine") may give
TUNED = ("max_steps", "learning_rate", "momentum", "prox_weight", "keep_weight", "optimizer", "progressive_merge")


@dataclasses.dataclass(frozen=True)
class RefineSettings:
  """The knobs of one refinement round; ``None`` means the model's stored default (``model.json``
  ``metadata.refine``), else the library's.

  Attributes:
    preset: "default" (the library's defaults) or "paper" (Algorithm 1 exactly,
      ``RefineConfig.paper()``): the settings every field left ``None`` takes.
    layers: tunable last layers l.
    max_steps: M, the most optimiser steps.
    learning_rate: the optimiser's step size.
    momentum: SGD's momentum.
    prox_weight: alpha, the weight of ``||W_lam - W||_2``.
    keep_weight: the weight of the keep term (``RefineConfig.keep_weight``).
    optimizer: "sgd" or "adam" (``RefineConfig.optimizer``).
    progressive_merge: ``RefineConfig.progressive_merge``: change the segmentation only in the regions
      of change that touch the round's new marks, and honour every mark in it.
    region_growing: T: grow this round's marks into neighbours whose normalised intensity differs by
      less than T (:func:`scribblejax.grow_marks`); ``None`` or 0: no growing.
    driver: "auto", "loop" or "host".
    check_every: steps per compiled chunk of the host driver.
    class_balance: weight every marked class equally in the loss.
    continue_weights: start from the previous round's W_lam instead of W (sessions only).
    compute_dtype: "float32" or "bfloat16" (``RefineConfig.compute_dtype``).
    remat: rematerialise the tail's activations in the backward pass (``RefineConfig.remat``).
    conv_backend: "auto", "xla" or "onednn" (``RefineConfig.conv_backend``).
    new_classes: names of output classes to append to the network's head for structures it was never
      trained for (:func:`scribblejax.research.baselines.add_classes`: each starts as the background's logit
      less 4, so the first segmentation is the network's own); they follow the model's classes. A
      session keeps the classes it started with.
  """
  layers: int | None = None
  max_steps: int | None = None
  learning_rate: float | None = None
  momentum: float | None = None
  prox_weight: float | None = None
  keep_weight: float | None = None
  optimizer: str | None = None
  progressive_merge: bool | None = None
  preset: str = "default"
  region_growing: float | None = None
  driver: str = "auto"
  check_every: int = 1
  class_balance: bool = False
  continue_weights: bool = False
  compute_dtype: str = "float32"
  remat: bool = False
  conv_backend: str = "auto"
  new_classes: tuple[str, ...] = ()

  def resolve(self, metadata: dict) -> tuple[int | None, Any, float | None]:
    """``(layers, RefineConfig, region_growing)`` with the defaults filled in."""
    from scribblejax.config import PAPER, PRESETS, RefineConfig
    stored = (metadata or {}).get("refine", {}) if isinstance(metadata, dict) else {}
    if self.preset not in PRESETS:
      raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
    if self.preset == "paper":      # the paper's settings, whatever the model stores
      stored = {}
    pick = lambda name: getattr(self, name) if getattr(self, name) is not None else stored.get(name)
    fields = {k: pick(k) for k in TUNED}
    if fields["optimizer"] == "sgd" and fields["learning_rate"] is None:
      fields["learning_rate"] = PAPER["learning_rate"]      # Adam's default step would barely move SGD
    base = RefineConfig.paper if self.preset == "paper" else RefineConfig
    config = base(**{k: v for k, v in fields.items() if v is not None}, driver=self.driver,
                  check_every=self.check_every, compute_dtype=self.compute_dtype, remat=self.remat,
                  conv_backend=self.conv_backend, **({"class_balance": True} if self.class_balance else {}))
    grow = pick("region_growing")
    if grow is not None and (not np.isfinite(grow) or grow < 0):
      raise ValueError(f"the region growing threshold must be finite and >= 0, got {grow}")
    return pick("layers"), config, grow or None


@dataclasses.dataclass(frozen=True)
class MarkOptions:
  """How marks files are read (see :mod:`scribblejax.io.marks_files`)."""
  class_names: tuple[str, ...] | None = None
  background_value: int = 255
  unmarked_value: int = 0
  radius: float = 1.0
  rectangle: str = "box"

  def __post_init__(self):
    if self.rectangle not in RECTANGLE_MODES:
      raise ValueError(f"rectangle must be one of {RECTANGLE_MODES}, got {self.rectangle!r}")
    if self.background_value == self.unmarked_value:
      raise ValueError(f"the background value and the unmarked value are both {self.background_value}")


def resolve_class_names(given: Sequence[str] | None, info: Any, num_classes: int | None) -> tuple[str, ...] | None:
  """``--classes`` if given (checked against the model's class count), else the model's names."""
  if given is None:
    return info.class_names
  names = tuple(n.strip() for n in given)
  if any(not n for n in names) or len(set(names)) != len(names):
    raise ValueError(f"--classes must be distinct non-empty names, got {','.join(given)!r}")
  if num_classes is not None and len(names) != num_classes:
    raise ValueError(f"--classes lists {len(names)} names, but the model predicts {num_classes} classes")
  return names


# ----------------------------------------------------------------------------------------------
# Paths and writing.

def companion_paths(out: str | os.PathLike) -> tuple[Path, Path]:
  """The report and overlay next to an output: ``seg.nii.gz`` -> ``seg.report.json``, ``seg.overlay.png``."""
  p = Path(out)
  suffix = _suffix(p)
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
    if any(_same(o, p) for p in outputs[n + 1:]):
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
def compile_timer():
  """Collects the seconds JAX reports for tracing, lowering and compiling inside the block.

  Yields:
    A one-element list whose entry grows as JAX compiles.
  """
  import jax
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


def _device() -> dict:
  import jax
  device = jax.devices()[0]
  return {"device": str(device.device_kind), "platform": str(device.platform)}


def _model_ref(model: str) -> str:
  """A model as stored in reports and sessions: a folder as an absolute path, a built-in by name."""
  from scribblejax.models.store import resolve_model_path
  path = resolve_model_path(model)
  return str(model) if not (Path(model) / "model.json").is_file() else str(path.resolve())


class _Network(NamedTuple):
  model: Any
  info: Any
  spec: InputSpec


def _load(model: str, log: Log) -> _Network:
  from scribblejax.models.store import load_model
  log(f"loading model {model}")
  net, info = load_model(model)
  return _Network(net, info, spec_of(net, info))


def resolve_layers(model: Any, example: Any, layers: int | None) -> int:
  """The tunable last layers: ``layers``, or :data:`DEFAULT_LAYERS` at most the model's layers.

  Raises:
    ValueError: ``layers`` is not between 1 and the model's layers.
  """
  from scribblejax.models.layer_order import layer_order
  count = len(layer_order(model, example))
  if layers is None:
    return min(DEFAULT_LAYERS, count)
  if not 1 <= layers <= count:
    raise ValueError(f"--layers must be between 1 and {count} (the model's layers), got {layers}")
  return layers


def _split(network: _Network, fitted: Fitted, layers: int | None):
  import jax
  import jax.numpy as jnp
  from scribblejax.params import last_layers, split_params
  example = jax.ShapeDtypeStruct((1, *_network_input(fitted)), jnp.float32)
  layers = resolve_layers(network.model, example, layers)
  return split_params(network.model, last_layers(layers), example=example), layers


def _accepts(split, shape: tuple[int, ...]) -> bool:
  from scribblejax.refinement import num_classes_of
  try:
    num_classes_of(split, shape)
    return True
  except ValueError:
    return False


def _network_input(fitted: Fitted) -> tuple[int, ...]:
  """The shape ``[*spatial, C]`` one network call takes: a patch, or the whole fitted image."""
  return fitted.image.shape if fitted.patch is None else (*fitted.patch, fitted.image.shape[-1])


def fit_network(split, fitted: Fitted) -> Fitted:
  """Pads the image to a size the network accepts (:func:`pad_to_fit`); with patches, checks that the
  network accepts the patch instead.

  Raises:
    ValueError: the network refuses the patch (its own error).
  """
  from scribblejax.refinement import num_classes_of
  if fitted.patch is None:
    return pad_to_fit(split, fitted)
  if fitted.slices and fitted.patch[1:] == fitted.image.shape[1:-1] and not _accepts(split, _network_input(fitted)):
    padded = pad_to_fit(split, fitted, fixed=(0,))          # whole slices: pad them in-plane instead
    return padded._replace(patch=(1, *padded.image.shape[1:-1]))
  try:
    num_classes_of(split, _network_input(fitted))
  except ValueError as err:
    raise ValueError(f"the network refuses patches of {fitted.patch}: {err}") from None
  return fitted


def pad_to_fit(split, fitted: Fitted, most: int = 7, fixed: tuple[int, ...] = ()) -> Fitted:
  """Pads the image with zeros (after normalisation, as nnU-Net pads) to a size the network accepts.

  Networks whose downsampling needs sizes divisible by some factor (nnU-Net, MONAI's UNet and
  SegResNet) refuse other sizes. Each axis is padded to the smallest multiple of a power of two
  (at most ``2**most``) that the network accepts, half before and half after; :func:`to_model` pads
  marks with "unmarked" and :func:`to_image` crops results back. Axes in ``fixed`` keep their size
  (a volume's slice axis for a 2-D network).

  Raises:
    ValueError: no such padding makes the network accept the image (its own error).
  """
  from scribblejax.refinement import num_classes_of
  shape = fitted.image.shape
  if _accepts(split, shape):
    return fitted
  spatial = list(shape[:-1])
  up = lambda n, m, axis: n if axis in fixed else -(-n // m) * m
  for k in range(1, most + 1):
    target = [up(n, 2 ** k, a) for a, n in enumerate(spatial)]
    if _accepts(split, (*target, shape[-1])):
      break
  else:
    num_classes_of(split, shape)          # the model's own error
  for axis in range(len(spatial)):        # then each axis as little as it needs
    for j in range(k):
      trial = target[:axis] + [up(spatial[axis], 2 ** j, axis)] + target[axis + 1:]
      if _accepts(split, (*trial, shape[-1])):
        target = trial
        break
  pad = tuple(((t - n) // 2, t - n - (t - n) // 2) for n, t in zip(spatial, target))
  note = (f"padded the image from {tuple(spatial)} to {tuple(target)} with zeros (after normalisation) for the "
          "network's downsampling; results are cropped back")
  image = np.pad(fitted.image, (*pad, (0, 0)))
  return fitted._replace(image=image, pad=pad, notes=(*fitted.notes, note))


def _class_counts(marks: np.ndarray, class_names: Sequence[str] | None, num_classes: int) -> dict:
  counts = np.bincount(marks[marks >= 0].ravel(), minlength=num_classes)
  names = class_names or [str(k) for k in range(num_classes)]
  return {str(names[k]) if k < len(names) else str(k): int(c) for k, c in enumerate(counts) if c}


def _finish(report: dict, out: str | None, image: Image, labels: np.ndarray, before: np.ndarray,
            after: np.ndarray | None, marks: np.ndarray | None, overlay: bool, log: Log, title: str) -> dict:
  """Writes the segmentation, the overlay and the report (each atomically)."""
  if out is None:
    return report
  report_path, overlay_path = companion_paths(out)
  report["out_format"] = write_label_map(out, labels, image.geometry)
  report["out"] = str(out)
  log(f"wrote {out}")
  if overlay:
    from scribblejax.io.overlay import save_overlay
    save_overlay(overlay_path, image.array, image.geometry, before, after, marks, title=title)
    report["overlay"] = str(overlay_path)
  report["report"] = str(report_path)
  write_json(report_path, report)
  return report


# ----------------------------------------------------------------------------------------------
# The workflows.

def prepare(network: _Network, img: Image, info: Any, layers: int | None,
            options: InferenceOptions) -> tuple[_Network, Any, Fitted, int]:
  """The image made ready for the network (axes, channels, normalisation, spacing, patches or
  padding), the network (mirrored if asked) and its split: ``(network, split, fitted, layers)``.

  A region-based network (:class:`scribblejax.models.Regions`) is unwrapped: the pipeline blends, mirrors
  and resamples its region logits as nnU-Net does, ``fitted.regions`` holds its class order, and
  :func:`loop_split` wraps it again for the refinement loop."""
  from scribblejax.models.regions import Regions
  regions = None
  if isinstance(network.model, Regions):
    regions = network.model.order
    network = network._replace(model=network.model.net)
  fitted = fit_image(img, network.spec, info.normalization, info.metadata, crop=options.crop, slices=True)
  fitted = fitted._replace(regions=regions)
  if options.resample:
    fitted = resample_to_model(fitted, img, info.metadata)
  fitted = fit_to_patch(fitted, info.metadata, options)
  if options.mirror:
    network = _mirrored(network, fitted, info.metadata)
    axes = network.model.axes
    fitted = fitted._replace(notes=(*fitted.notes, f"mirrored along the model's axes {list(axes)}: "
                                    f"{2 ** len(axes)} passes averaged, as nnU-Net predicts"))
  if fitted.slices:
    from scribblejax.pipeline.sliding_window import SliceWise
    network = network._replace(model=SliceWise(network.model, (*fitted.patch[1:], fitted.image.shape[-1])))
  split, layers = _split(network, fitted, layers)
  return network, split, fit_network(split, fitted), layers


def mirroring_axes(metadata: dict | None, ndim: int) -> tuple[int, ...]:
  """The axes a model may be mirrored along: ``metadata.mirroring_axes`` (nnU-Net's
  ``inference_allowed_mirroring_axes``, in the network's axis order), else every spatial axis.

  Raises:
    ValueError: the model allows no mirroring, or states axes it does not have.
  """
  metadata = metadata or {}
  if "mirroring_axes" not in metadata:
    return tuple(range(ndim))
  axes = metadata["mirroring_axes"]
  if not axes:
    raise ValueError("the model allows no mirroring (model.json metadata.mirroring_axes is empty); drop --mirror")
  from scribblejax._checks import is_integer
  if not isinstance(axes, (list, tuple)) or not all(is_integer(a) and 0 <= a < ndim for a in axes):
    raise ValueError(f"model.json metadata.mirroring_axes must list spatial axes 0..{ndim - 1}, got {axes!r}")
  return tuple(axes)


def _mirrored(network: _Network, fitted: Fitted, metadata: dict | None) -> _Network:
  from scribblejax.pipeline.sliding_window import Mirrored
  ndim = fitted.image.ndim - 1 - fitted.slices
  axes = mirroring_axes(metadata, ndim)
  example = (*(fitted.patch or fitted.image.shape[:-1])[fitted.slices:], fitted.image.shape[-1])
  return network._replace(model=Mirrored(network.model, axes, example))


def run_predict(model: str, image: str, out: str, *, overlay: bool = True, log: Log = _silent,
                inference: InferenceOptions = InferenceOptions(), progress: Any = None) -> dict:
  """The network's own segmentation of an image, written like the image (see :func:`write_label_map`).

  ``progress(done, total)`` is called after each patch when the network runs patch by patch.

  Returns:
    The report (also written as ``<out stem>.report.json``).
  """
  from scribblejax.models.store import read_info
  report_path, overlay_path = companion_paths(out)
  check_outputs([out, report_path, overlay_path if overlay else None], [image])
  info = read_info(model)
  log(f"reading {image}")
  img = read_image(image)
  output_format(out, img.geometry)
  network = _load(model, log)
  _, split, fitted, _ = prepare(network, img, info, 1, inference)
  for note in fitted.notes:
    log(f"note: {note}")
  log(f"predicting on {fitted.image.shape[:-1]} ({_device()['device']})")
  with compile_timer() as compiled:
    start = time.perf_counter()
    labels = labels_from_logits(network_logits(split, fitted, step=inference.step, progress=progress), fitted)
    seconds = time.perf_counter() - start
  num_classes = int(network.spec.num_classes or labels.max() + 1)
  report = {"command": "predict", "image": str(image), "image_format": img.family,
            "image_shape": list(img.spatial_shape), "model": _model_ref(model),
            "classes": list(info.class_names or [str(k) for k in range(num_classes)]),
            "class_pixels": _class_counts(labels, info.class_names, num_classes),
            "seconds": seconds, "compile_seconds": compiled[0], "compile_seconds_note": COMPILE_NOTE,
            **_device(), "notes": list(fitted.notes)}
  return _finish(report, out, img, labels, labels, None, None, overlay, log, f"{Path(image).name}: network")


def run_refine(*, model: str | None, image: str | None, marks: Sequence[str], out: str | None,
               session: str | None = None, undo: bool = False, settings: RefineSettings = RefineSettings(),
               mark_options: MarkOptions = MarkOptions(), overlay: bool = True, log: Log = _silent,
               progress: Any = None, inference: InferenceOptions = InferenceOptions(),
               patch_progress: Any = None) -> dict:
  """One refinement round (or an undo) on an image with marks files.

  Args:
    model: a model folder or built-in name (taken from the session when ``None``).
    image: the image file or DICOM folder (taken from the session when ``None``).
    marks: marks files, accumulated in order; in a session they accumulate over earlier rounds.
    out: the segmentation to write (optional only for an undo without new marks).
    session: a session folder: created on the first round, continued afterwards.
    undo: drop the session's latest round first (then add a round if ``marks`` are given).
    settings: the refinement's knobs.
    mark_options: how marks files are read.
    overlay: write ``<out stem>.overlay.png``.
    log: progress messages.
    progress: ``progress(steps_taken, max_steps)`` during the refinement (see :func:`scribblejax.refinement.engine`).
    patch_progress: ``patch_progress(done, total)`` after each patch of a sliding-window segmentation:
      after the refinement, when the network's own segmentation comes with the refined one (a first
      round, see :func:`scribblejax.pipeline.sliding_window_logits_of`), else before and after it (``done``
      starts again at 1 for the second).
    inference: crop, spacing, patches, mirroring (:class:`InferenceOptions`). With patches, the loop
      runs the patches that hold marks, blended as the sliding window blends them
      (:class:`scribblejax.pipeline.sliding_window.MarkedPatches`), and the refined network then segments the whole
      image patch by patch.

  Returns:
    The report (also written as ``<out stem>.report.json``).

  Raises:
    ValueError: bad input, with a message naming the problem.
  """
  from scribblejax.models.store import read_info
  doc = session_store.load_session(session) if session else None
  if undo and not session:
    raise ValueError("--undo needs --session (the folder of the rounds to undo)")
  if settings.continue_weights and not session:
    raise ValueError("--continue-weights needs --session (it starts a round from the previous round's weights)")
  if undo and (doc is None or not doc["rounds"]):
    raise ValueError(f"nothing to undo: session {session} has no rounds")
  if not marks and not undo:
    raise ValueError("refine needs at least one --marks file")
  if doc is not None:
    model = model or doc["model"]
    image = image or doc["image"]
  if model is None or image is None:
    raise ValueError(f"--{'model' if model is None else 'image'} is required (no session to take it from)")
  if out is None and marks:
    raise ValueError("--out is required")
  report_path, overlay_path = companion_paths(out) if out else (None, None)
  check_outputs([out, report_path, overlay_path if overlay else None], [image, *marks])
  info = read_info(model)
  model_ref = _model_ref(model)
  log(f"reading {image}")
  img = read_image(image)
  if out:
    output_format(out, img.geometry)
  digest = image_digest(img)
  if doc is not None:
    if doc["image_digest"] != digest:
      raise ValueError(f"image {image} is not the image of session {session} ({doc['image']})")
    if doc["model"] != model_ref:
      raise ValueError(f"model {model} is not the model of session {session} ({doc['model']})")
    _check_session_pipeline(doc, session, inference, bool(marks))
  stated = spec_from_info(info)
  class_names = resolve_class_names(mark_options.class_names, info, stated.num_classes)
  num_classes = stated.num_classes
  added = _new_classes(settings.new_classes, doc, session)
  if added:
    if num_classes is None:
      raise ValueError(f"model {model} does not state how many classes it predicts; --new-class needs that")
    class_names = _with_new_classes(class_names or tuple(str(k) for k in range(num_classes)), added)
    num_classes += len(added)
  new = None
  if marks:
    log(f"reading marks {', '.join(map(str, marks))}")
    new = read_marks(list(marks), img.geometry, num_classes=num_classes, class_names=class_names,
                     background_value=mark_options.background_value, unmarked_value=mark_options.unmarked_value,
                     radius=mark_options.radius, rectangle=mark_options.rectangle)
    if not (new >= 0).any():
      raise ValueError(f"the marks files {', '.join(map(str, marks))} mark no pixel")
  undone = None
  if undo:
    doc, undone = session_store.without_last_round(doc, session)
    log(f"undoing round {undone['round']} of session {session}")
  if new is None:
    return _after_undo(doc, session, undone, img, out, overlay, log, info, class_names)
  return _refine_round(model, model_ref, img, digest, list(marks), new, out, session, doc, undone, settings,
                       class_names, info, overlay, log, progress, inference, added, patch_progress)


_PIPELINE_FLAGS = {"resample": "--no-resample", "crop": "--no-crop", "mirror": "--mirror", "patch_size": "--patch-size",
                   "step": "--patch-step"}


def _pipeline_record(inference: InferenceOptions) -> dict:
  """The options that decide what the network sees (not how many patches one call runs)."""
  size = inference.patch_size
  return {"resample": inference.resample, "crop": inference.crop, "mirror": inference.mirror,
          "patch_size": list(size) if isinstance(size, (tuple, list)) else size, "step": inference.step}


def _check_session_pipeline(doc: dict, session: str | None, inference: InferenceOptions, new_round: bool) -> None:
  """Refuses a new round whose pipeline options differ from the session's first round (a session stored
  before they were recorded is not checked): its weights, its initial segmentation and its marks belong
  to that pipeline."""
  stored = doc.get("pipeline")
  if not new_round or stored is None:
    return
  current = _pipeline_record(inference)
  differ = [f"{_PIPELINE_FLAGS[k]} ({stored.get(k)!r} then, {current[k]!r} now)" for k in _PIPELINE_FLAGS
            if stored.get(k) != current[k]]
  if differ:
    raise ValueError(f"session {session} was refined with other pipeline options: {', '.join(differ)}; give its "
                     "rounds the same options, or start a new session")


def _new_classes(given: Sequence[str] | str, doc: dict | None, session: str | None) -> tuple[str, ...]:
  """The classes appended to the network's head this round: ``--new-class`` names, or the session's.

  Raises:
    ValueError: empty or repeated names, or names other than those the session started with.
  """
  given = tuple(str(n).strip() for n in ((given,) if isinstance(given, str) else given))
  if any(not n for n in given) or len({n.casefold() for n in given}) != len(given):
    raise ValueError(f"--new-class names must be distinct and non-empty, got {list(given)}")
  stored = tuple(doc.get("new_classes", ())) if doc is not None else ()
  if doc is not None and given and given != stored:
    started = f"with new classes {list(stored)}" if stored else "without new classes"
    raise ValueError(f"session {session} was started {started}; a session keeps its classes (pass the same "
                     "--new-class names, or none; a new session can add classes)")
  return given or stored


def _with_new_classes(names: Sequence[str], added: Sequence[str]) -> tuple[str, ...]:
  """The class names with ``added`` after them.

  Raises:
    ValueError: an added name that a marks file could take for one of the classes: the same name in
      any letter case (marks files match names ignoring case), or a number (a class index).
  """
  for name in added:
    same = [n for n in names if n.casefold() == name.casefold()]
    if same:
      raise ValueError(f"--new-class {name!r} is already a class of the model ({', '.join(names)}); marks files "
                       "match class names ignoring case")
    if name.lstrip("+-").isdigit():
      raise ValueError(f"--new-class {name!r} is a number, which marks files read as a class index; name it "
                       "with letters")
  return tuple(names) + tuple(added)


def _after_undo(doc, session, undone, img, out, overlay, log, info, class_names) -> dict:
  """Saves the session without its last round and writes the segmentation it now shows."""
  initial = session_store.load_initial(session)
  if doc["rounds"]:
    arrays = session_store.round_arrays(session, doc["rounds"][-1])
    labels, marks = arrays["labels"], arrays["marks"]
  else:
    labels, marks = initial, None
  if labels is None:
    raise ValueError(f"session {session} has lost its stored segmentation (initial.npz); start a new session")
  num_classes = int(max(labels.max(), 0 if initial is None else initial.max())) + 1
  report = {"command": "refine", "undo": True, "undone_round": undone["round"], "rounds": len(doc["rounds"]),
            "session": str(session), "image": doc["image"], "model": doc["model"],
            "class_pixels": _class_counts(labels, class_names or info.class_names, num_classes)}
  report = _finish(report, out, img, labels, initial if initial is not None else labels,
                   labels if doc["rounds"] else None, marks, overlay, log, f"{Path(img.path).name}: after undo")
  session_store.save_session(session, doc)
  session_store.remove_round_file(session, doc, undone)
  return report


def _refine_round(model, model_ref, img, digest, marks_files, new, out, session, doc, undone, settings,
                  class_names, info, overlay, log, progress=None, inference=InferenceOptions(), added=(),
                  patch_progress=None) -> dict:
  import jax
  from scribblejax import marks as marks_lib
  from scribblejax.kernels import resolve_conv_backend
  from scribblejax.refinement import RefineResult, refine, resolve_driver

  network = _load(model, log)
  if added:
    from scribblejax.models.surgery import add_classes
    log(f"appending class(es) {', '.join(added)} to the network's head")
    try:
      extended = add_classes(network.model, len(added))
    except ValueError as err:
      raise ValueError(f"--new-class cannot extend this model's head: {err}") from None
    network = network._replace(model=extended,
                               spec=network.spec._replace(num_classes=network.spec.num_classes + len(added)))
  num_classes = network.spec.num_classes
  layers, config, grow = settings.resolve(info.metadata)
  network, split, fitted, layers = prepare(network, img, info, layers, inference)
  for note in fitted.notes:
    log(f"note: {note}")
  if config.keep_weight and fitted.patch is not None:
    # the keep term reads the network's logits at every voxel; with patches the loop has them at the marked
    # voxels only (MarkedPatches)
    log("note: with patches the keep term is off (it needs the network's logits at every voxel)")
    config = dataclasses.replace(config, keep_weight=0.0)
  if num_classes is None:
    from scribblejax.refinement import num_classes_of
    num_classes = num_classes_of(split, _network_input(fitted))
  # The marks' truth is the image's grid: what the user drew, plus what region growing added. The
  # model's grid gets them by to_model, once per round.
  previous_image, previous_drawn, arrays = None, None, None
  if doc is not None and doc["rounds"]:
    arrays = session_store.round_arrays(session, doc["rounds"][-1])
    previous_image, previous_drawn = arrays["marks"], session_store.drawn_marks(arrays)
  _check_inside_crop(new if previous_image is None else marks_lib.accumulate(previous_image, new), fitted,
                     class_names)
  new_model, clashes = to_model_counted(new, fitted)
  if clashes:
    log(f"note: {clashes} marked voxel(s) share a voxel of the model's grid with a mark of another class; one "
        "label holds there")
  previous, start_leaves = None, None
  if previous_image is not None:
    previous = to_model(previous_image, fitted)
    if settings.continue_weights:
      start_leaves = session_store.tunable_leaves(arrays)
  new_image, grown = new, 0
  if grow:
    grown_marks = np.full_like(new_model, -1)              # never grown into the padding
    region = inside(fitted)
    # what the user drew in earlier rounds is their word: growth neither replaces nor crosses it (what
    # earlier growth inferred, a newer round's growth may relabel)
    blocked = None if previous_drawn is None else to_model(previous_drawn, fitted)[region] >= 0
    grown_marks[region] = marks_lib.grow_marks(new_model[region], fitted.image[region], grow, blocked=blocked)
    grown = int((grown_marks >= 0).sum() - (new_model >= 0).sum())
    new_model = grown_marks
    grown_image = to_image(grown_marks, fitted)
    if previous_drawn is not None:
      grown_image = np.where(previous_drawn >= 0, -1, grown_image)
    new_image = np.where(new >= 0, new, grown_image)
  drawn_image = new if previous_drawn is None else marks_lib.accumulate(previous_drawn, new)
  marks_image = new_image if previous_image is None else marks_lib.accumulate(previous_image, new_image)
  all_marks = new_model if previous is None else marks_lib.accumulate(previous, new_model)
  # where the image was resampled: also the voxels the segmentation's way back reads for each mark
  all_marks = cover_marks(all_marks, marks_image, fitted)
  all_marks = marks_lib.validate_mark_map(all_marks, fitted.image.shape[:-1], num_classes)
  initial = session_store.load_initial(session) if session else None
  # with patches, the network's own segmentation comes with the refined one, in one pass over the
  # patches that computes each patch's frozen trunk once, unless two volumes of logits would not fit
  joint = (initial is None and fitted.patch is not None
           and 2 * 4 * int(np.prod(fitted.image.shape[:-1])) * num_classes <= JOINT_LOGITS_BYTES)
  unsure_image = session_store.load_unsure(session) if initial is not None else None
  if initial is not None:
    before_image = initial
  elif not joint:
    before_logits = network_logits(split, fitted, step=inference.step, progress=patch_progress)
    before_image = labels_from_logits(before_logits, fitted)
    unsure_image = unsure_on_image(before_logits, fitted, config.merge_confidence)
    del before_logits
  from scribblejax.params import last_layers
  # every mark outside the crop (background marks, which the pipeline honours there): nothing to refine
  nothing = fitted.patch is not None and not (all_marks >= 0).any()
  if nothing:
    log("note: every mark lies outside the image's non-zero region, where the segmentation is background "
        "already: nothing to refine")
    loop = Loop(split, fitted.image, all_marks, 0, 0)
  else:
    loop = loop_split(network, fitted, split, all_marks, last_layers(layers), inference)
  count, per_call, region = loop.patches, loop.per_call, loop.region
  if count:
    batches = "" if per_call >= count else f", {per_call} per network call (rematerialised one call at a time)"
    log(f"note: the loop runs the {count} patch(es) that hold marks (region {_span(region)} of the model's grid"
        f"{batches}), blended as the sliding window blends them; the refined network then segments the whole image")
  start = None if start_leaves is None else _same_tree(
      loop.split.tunable, start_leaves, "--continue-weights needs the same --layers as the previous round")
  driver = resolve_driver(config.driver, config.conv_backend, config.compute_dtype, config.cache_trunk)
  log(f"refining the last {layers} layers: up to {config.max_steps} steps on {int((all_marks >= 0).sum())} marked "
      f"pixels (driver {driver}, {_device()['device']})")
  with compile_timer() as compiled:
    start_time = time.perf_counter()
    if nothing:               # the network (W, or the previous round's W_lam) as it stands: no step
      result = RefineResult(None, None, split.tunable if start is None else start, np.int32(0), np.bool_(True),
                            np.bool_(False), None)
    else:
      result = refine(loop.split, loop.image, loop.marks, config, start=start, progress=progress)
    if joint:
      from scribblejax.pipeline.sliding_window import sliding_window_logits_of
      before, logits = sliding_window_logits_of(split, fitted.image, fitted.patch,
                                                [None, _same_tree(split.tunable, result.tunable)],
                                                step=inference.step, progress=patch_progress)
      before_image = labels_from_logits(before, fitted)
      unsure_image = unsure_on_image(before, fitted, config.merge_confidence)
      del before
    else:
      logits = refined_logits(split, fitted, result, max(count, int(nothing)), inference.step, patch_progress)
    seconds = time.perf_counter() - start_time
  labels_image = network_labels = labels_from_logits(logits, fitted)
  steps, satisfied = int(result.num_steps), bool(result.satisfied)
  marked = marks_image >= 0
  network_honoured = float((labels_image[marked] == marks_image[marked]).mean()) if marked.any() else 1.0
  if config.progressive_merge:
    from scribblejax.refinement.merge import progressive_merge
    previous_labels = arrays["labels"] if arrays is not None and arrays.get("labels") is not None else before_image
    # what this round added: a marks file that holds earlier rounds' marks too does not make them new
    from scribblejax.refinement.merge import new_marks_of
    new_marks = new_marks_of(marks_image, previous_image)
    if unsure_image is None and initial is not None and config.merge_confidence > 0:
      log("note: this session was started before its network's unsure pixels were stored; the merge frees none")
    labels_image = progressive_merge(previous_labels, labels_image, new_marks, marks_image, free=unsure_image)
  honoured = float((labels_image[marked] == marks_image[marked]).mean()) if marked.any() else 1.0
  log(f"{steps} steps in {seconds:.2f}s ({compiled[0]:.2f}s compiling): "
      + round_line(satisfied, network_honoured, honoured, marks_image, network_labels,
                   class_names, steps, config.max_steps, bool(result.nonfinite)))
  if satisfied and network_honoured < 1.0:
    log("note: the loop honoured every mark on the model's grid, but the segmentation brought back to the "
        "image's grid misses some marked pixels (they lie between the model's voxels)")
  round_index = len(doc["rounds"]) + 1 if doc is not None else 1
  report = {"command": "refine", "image": img.path, "image_format": img.family, "image_shape": list(img.spatial_shape),
            "model": model_ref, "classes": list(class_names or [str(k) for k in range(num_classes)]),
            "marks_files": [str(m) for m in marks_files], "round": round_index,
            "new_marked_pixels": int((new >= 0).sum()), "grown_pixels": grown,
            "marked_pixels": _class_counts(marks_image, class_names, num_classes), "clashing_marks": clashes,
            "steps": steps, "max_steps": config.max_steps, "satisfied": satisfied,
            "nonfinite": bool(result.nonfinite), "marks_honoured": honoured,
            "network_marks_honoured": network_honoured,
            "changed_pixels": int((labels_image != before_image).sum()),
            "seconds": seconds, "compile_seconds": compiled[0], "compile_seconds_note": COMPILE_NOTE,
            **_device(), "driver": driver, "conv_backend": resolve_conv_backend(config.conv_backend),
            "settings": {"layers": layers, "max_steps": config.max_steps, "learning_rate": config.learning_rate,
                         "momentum": config.momentum, "prox_weight": config.prox_weight, "region_growing": grow,
                         "keep_weight": config.keep_weight, "optimizer": str(config.optimizer or "sgd"),
                         "progressive_merge": config.progressive_merge, "preset": settings.preset,
                         "class_balance": config.class_balance, "continue_weights": settings.continue_weights,
                         "check_every": config.check_every, "compute_dtype": config.compute_dtype,
                         "remat": config.remat, "conv_backend": config.conv_backend},
            "notes": list(fitted.notes)}
  if added:
    report["new_classes"] = list(added)
  if joint:
    report["notes"].append("the network's own segmentation (for changed_pixels and the overlay) was computed in "
                           "the same pass over the patches as the refined one; seconds includes it")
  if count:
    report["refined_region"] = [[r.start, r.stop] for r in region]
    report["refined_patches"] = count
    report["patches_per_call"] = min(per_call, count)
  if session:
    report["session"] = str(session)
    report["rounds"] = round_index
    if undone is not None:
      report["undone_round"] = undone["round"]
  report = _finish(report, out, img, labels_image, before_image, labels_image, marks_image, overlay, log,
                   f"{Path(img.path).name}: round {round_index}, {steps} steps, satisfied={satisfied}")
  if session:
    if doc is None:
      doc = session_store.new_session(str(Path(img.path).resolve()), digest, model_ref, img.spatial_shape)
      doc["pipeline"] = _pipeline_record(inference)
      if added:
        doc["new_classes"] = list(added)
    if initial is None:
      session_store.save_initial(session, before_image, unsure_image)
    record = {"marks_files": [str(Path(m).resolve()) for m in marks_files], "steps": steps, "satisfied": satisfied,
              "settings": report["settings"], "out": str(out)}
    doc = session_store.append_round(session, doc, record, marks=marks_image, new_marks=new_image,
                                     labels=labels_image, tunable=[np.asarray(x) for x in jax.tree.leaves(result.tunable)],
                                     drawn=drawn_image)
    if undone is not None:
      session_store.remove_round_file(session, doc, undone)
  return report


def round_line(satisfied: bool, network_honoured: float, honoured: float, marks: np.ndarray, network_labels: np.ndarray,
               class_names, steps: int, max_steps: int, nonfinite: bool) -> str:
  """The one line a round ends with: every mark honoured, or the fraction per class and why not."""
  if satisfied and network_honoured == 1.0:
    return "every mark honoured"
  marked = marks >= 0
  name = lambda c: class_names[c] if class_names and c < len(class_names) else f"class {c}"
  per_class = ", ".join(f"{name(int(c))} {np.mean(network_labels[marks == c] == c):.1%}"
                        for c in np.unique(marks[marked]))
  if satisfied:
    why = "the marks lie between the model's voxels"
  elif nonfinite:
    why = "the objective became non-finite"
  else:
    why = f"the step budget ({max_steps}) ran out after {steps} steps"
  shown = "; the segmentation honours every mark" if honoured == 1.0 else f"; the segmentation honours {honoured:.1%}"
  return f"the network honours {network_honoured:.1%} of marked pixels ({per_class}): {why}{shown}"


class Loop(NamedTuple):
  """What the refinement loop runs (:func:`loop_split`)."""
  split: Any                      # the network (on the marked patches, or the whole image)
  image: np.ndarray               # its input
  marks: np.ndarray               # the marks, in the input's layout
  patches: int                    # marked patches (0: the whole image)
  per_call: int                   # patches per network call
  region: tuple[slice, ...] | None = None   # the box of the model's grid the patches cover


def loop_split(network: _Network, fitted: Fitted, split: Any, marks: np.ndarray, select: Any,
               inference: InferenceOptions) -> Loop:
  """What the refinement loop runs, with the parameters ``select`` picks tunable.

  With patches, the network on the sliding-window patches that hold marks, blended at the marked
  voxels as the sliding window blends them (:class:`scribblejax.pipeline.sliding_window.MarkedPatches`: the
  compiled loop depends on the counts of patches and marked voxels, rounded up, not on where they
  are); else ``split`` itself on the whole image. A region-based network is read as classes
  (:class:`scribblejax.models.Regions`) around either.
  """
  import jax
  import jax.numpy as jnp
  from scribblejax.models.regions import Regions
  from scribblejax.params import split_params
  from scribblejax.pipeline.sliding_window import MarkedPatches, marked_patches, patch_chunk, windows_region
  if fitted.patch is None and fitted.regions is None:
    return Loop(split, fitted.image, marks, 0, 0)
  module, image, loop_marks, patches, per_call, region = network.model, fitted.image, marks, 0, 0, None
  if fitted.patch is not None:
    image, loop_marks, kwargs = marked_patches(fitted.image, marks, fitted.patch, inference.step)
    starts = kwargs.pop("starts")
    per_call = inference.patch_batch or patch_chunk(fitted.patch, _passes(network.model))
    module = MarkedPatches(network.model, fitted.patch, fitted.image.shape[-1], chunk=per_call, **kwargs)
    patches, region = len(starts), windows_region(starts, fitted.patch)[0]
  if fitted.regions is not None:
    module = Regions.of(module, fitted.regions)
  example = jax.ShapeDtypeStruct((1, *image.shape), jnp.float32)
  return Loop(split_params(module, select, example=example), image, loop_marks, patches, per_call, region)


def refined_logits(split: Any, fitted: Fitted, result: Any, patches: int, step: float = 0.5,
                   progress: Any = None) -> np.ndarray:
  """The model-layout logits of the network refined by ``result`` (a :func:`loop_split` loop's): the
  loop's own on the whole image, else the refined network's on every patch (and raw region logits for
  a region-based network, to blend and resample as nnU-Net does)."""
  if not patches and fitted.regions is None:
    return np.asarray(result.logits)
  return network_logits(split, fitted, _same_tree(split.tunable, result.tunable), step=step, progress=progress)


def _passes(model: Any) -> int:
  """Network passes per patch: mirrored copies times an ensemble's members."""
  from scribblejax.models.ensemble import Ensemble
  from scribblejax.pipeline.sliding_window import Mirrored, SliceWise
  passes = 1
  while isinstance(model, (Mirrored, SliceWise)):
    passes *= 2 ** len(model.axes) if isinstance(model, Mirrored) else 1
    model = model.net
  return passes * model.members if isinstance(model, Ensemble) else passes


def _check_inside_crop(marks: np.ndarray, fitted: Fitted, class_names: Sequence[str] | None) -> None:
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
    what = ", ".join(f"{counts[i]} voxel(s) of {names[k] if k < len(names) else f'class {k}'}"
                     for i, k in enumerate(labels))
    raise ValueError(f"marks lie outside the image's non-zero region ({what}), where this model's pipeline "
                     "(nnU-Net's crop to the non-zero region) always gives background; pass --no-crop to let "
                     "the network see the whole image")


def _same_tree(like: Any, leaves_of: Any, problem: str = "the patch blend's tunable layers are not the network's") -> Any:
  """``leaves_of``'s leaves in ``like``'s structure: a network's and its MarkedPatches' tunable layers,
  or a session's stored weights.

  Raises:
    ValueError: ``problem``, when the leaves' shapes differ.
  """
  import jax
  leaves = jax.tree.leaves(leaves_of)
  if [np.shape(a) for a in leaves] != [np.shape(b) for b in jax.tree.leaves(like)]:
    raise ValueError(problem)
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


# ----------------------------------------------------------------------------------------------
# Describing a model.

def pipeline_of(metadata: dict | None) -> dict:
  """What ``predict`` and ``refine`` do to an image for this model before and after the network
  (see :class:`InferenceOptions`), as the model states it."""
  metadata = metadata or {}
  return {"axis_order": stated_axis_orders(metadata), "crop_to_nonzero": crops_to_nonzero(metadata), "spacing": metadata.get("spacing"),
          "patch_size": metadata.get("patch_size"), "mirroring_axes": metadata.get("mirroring_axes", "all")}


def describe_model(model: str) -> dict:
  """Classes, layers in forward order with parameter counts, and what the model expects as input."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from scribblejax.models.layer_order import layer_order
  from scribblejax.params import count_params

  network = _load(model, _silent)
  spec, info = network.spec, network.info
  example = None
  if not callable(getattr(network.model, "layer_order", None)):
    if spec.spatial_dims is None or spec.in_channels is None:
      raise ValueError(f"model {model} states no layer order, and its input shape is unknown")
    example = jax.ShapeDtypeStruct((1, *(32,) * spec.spatial_dims, spec.in_channels), jnp.float32)
  order = layer_order(network.model, example)
  flat = [(tuple(p), v) for p, v in nnx.to_flat_state(nnx.state(network.model, nnx.Param))]
  layers = []
  for prefix in order:
    size = sum(int(np.prod(np.shape(v.get_value() if hasattr(v, "get_value") else v.value)))
               for p, v in flat if p[:len(prefix)] == prefix)
    layers.append({"name": "/".join(map(str, prefix)), "params": size})
  others = nnx.state(network.model, nnx.Not(nnx.Param))
  num_classes = spec.num_classes
  from scribblejax.models.ensemble import Ensemble
  from scribblejax.models.regions import Regions
  inner, regions = network.model, None
  if isinstance(inner, Regions):
    stated = (info.metadata or {}).get("regions") or {}
    regions = {"class_order": list(inner.order), "names": stated.get("names"), "labels": stated.get("labels")}
    inner = inner.net
  return {"model": _model_ref(model), "family": info.family, "kwargs": info.kwargs,
          "classes": list(info.class_names) if info.class_names else None, "num_classes": num_classes,
          "input": {"spatial_dims": spec.spatial_dims, "channels": spec.in_channels,
                    "layout": "[*spatial, channels], channels last", "normalization": info.normalization},
          "pipeline": pipeline_of(info.metadata),
          "layers": layers, "total_params": count_params(nnx.state(network.model, nnx.Param)),
          "members": inner.members if isinstance(inner, Ensemble) else None,
          "member_family": inner.family if isinstance(inner, Ensemble) else None, "regions": regions,
          "other_variables": count_params(others), "metadata": info.metadata}
