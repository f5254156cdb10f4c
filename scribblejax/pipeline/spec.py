"""What a model takes and how it wants an image read: the input spec, the axis order, the crop, the
mirroring axes and the options of the pipeline, as ``model.json`` and the model's attributes state them."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from scribblejax._checks import is_finite_number, is_integer
from scribblejax.io.images import MEDICAL


class InputSpec(NamedTuple):
  """What a model takes and gives (``None`` where the model does not say)."""

  spatial_dims: int | None
  in_channels: int | None
  num_classes: int | None


_KWARG_NAMES = {
  "spatial_dims": ("spatial_dims",),
  "in_channels": ("in_channels", "input_channels"),
  "num_classes": ("num_classes", "out_channels", "classes"),
}
_WRAPPERS = ("scribblejax.Ensemble", "scribblejax.Regions")


def spec_from_info(info: Any) -> InputSpec:
  """The input spec as far as ``model.json``'s constructor arguments state it (no model built; ``info``
  ``None``: nothing stated)."""
  return _spec_from_kwargs(getattr(info, "family", None), getattr(info, "kwargs", None) or {})


def _spec_from_kwargs(family: str | None, kwargs: dict) -> InputSpec:
  if family in _WRAPPERS and isinstance(kwargs.get("kwargs"), dict):
    inner = _spec_from_kwargs(kwargs.get("family"), kwargs["kwargs"])  # the wrapped network states it
    if family == "scribblejax.Regions":
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


def input_axis_order(metadata: dict | None, family: str, ndim: int) -> tuple[int, ...] | None:
  """The order in which a model reads an image's spatial axes, when it is not the image's own.

  A model states it in ``model.json`` ``metadata.input_axis_order``: ``{"medical": [...], "raster":
  [...]}``, a permutation of the spatial axes as :func:`scribblejax.io.read_image` gives them, per
  family group (``None`` or absent: as given). nnU-Net networks read volumes in SimpleITK's order (the
  reverse of NIfTI's ``(i, j, k)``) and then apply the plans' ``transpose_forward``; models converted
  before the key existed are recognised by ``metadata.source == "nnunetv2"``.

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
  if len(order) == 3 and ndim == 2 and order[0] == 0:  # a 3-D order over (1, y, x) for a 2-D raster image
    order = (order[1] - 1, order[2] - 1)
  if sorted(order) != list(range(ndim)):
    raise ValueError(
      f"the model reads images with axis order {list(order)}, which does not fit an image with "
      f"{ndim} spatial axes (model.json metadata.input_axis_order)"
    )
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
  if len(forward) == 2:  # a 2-D plans' order over (y, x): z stays first
    forward = [0, forward[0] + 1, forward[1] + 1]
  return {"medical": [(2, 1, 0)[a] for a in forward], "raster": forward}


def crops_to_nonzero(metadata: dict | None) -> bool:
  """Whether a model's images are cropped to their non-zero region (``metadata.crop_to_nonzero``; nnU-Net
  models, also those converted before the key existed)."""
  metadata = metadata or {}
  return bool(metadata.get("crop_to_nonzero", metadata.get("source") == "nnunetv2"))


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
  if not isinstance(axes, (list, tuple)) or not all(is_integer(a) and 0 <= a < ndim for a in axes):
    raise ValueError(f"model.json metadata.mirroring_axes must list spatial axes 0..{ndim - 1}, got {axes!r}")
  return tuple(axes)


def stated_sizes(metadata: dict | None, key: str, ndim: int, kind: type) -> tuple | None:
  """``metadata[key]`` as ``ndim`` positive numbers of ``kind``, or ``None`` when not stated.

  Raises:
    ValueError: stated, but not ``ndim`` positive numbers.
  """
  value = (metadata or {}).get(key)
  if value is None:
    return None
  check = is_integer if kind is int else is_finite_number
  if not isinstance(value, (list, tuple)) or len(value) != ndim or not all(check(v) and v > 0 for v in value):
    raise ValueError(
      f"model.json metadata.{key} must be {ndim} positive {kind.__name__}s for a {ndim}-D model, got {value!r}"
    )
  return tuple(kind(v) for v in value)


def pipeline_of(metadata: dict | None) -> dict:
  """What ``predict`` and ``refine`` do to an image for this model before and after the network
  (see :class:`InferenceOptions`), as the model states it."""
  metadata = metadata or {}
  return {
    "axis_order": stated_axis_orders(metadata),
    "crop_to_nonzero": crops_to_nonzero(metadata),
    "spacing": metadata.get("spacing"),
    "patch_size": metadata.get("patch_size"),
    "mirroring_axes": metadata.get("mirroring_axes", "all"),
  }


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
  """How the network sees an image.

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
      (:class:`scribblejax.pipeline.sliding_window.Mirrored`; up to 8 passes in 3-D), in the refinement
      loop too.
    patch_batch: with patches, the most marked patches one network call of the refinement loop runs
      (:class:`scribblejax.pipeline.MarkedPatches`: more run one batch after another, each rematerialised
      in the backward pass); ``None``: as many as :func:`scribblejax.pipeline.patch_chunk` allows (128^3
      voxels per call, mirrored copies and an ensemble's networks counted).
  """

  resample: bool = True
  patch_size: Any = "auto"
  step: float = 0.5
  crop: bool = True
  mirror: bool = False
  patch_batch: int | None = None

  def __post_init__(self):
    for name in ("resample", "crop", "mirror"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"InferenceOptions.{name} must be True or False, got {getattr(self, name)!r}")
    if not (self.patch_size is None or self.patch_size == "auto" or isinstance(self.patch_size, (tuple, list))):
      raise ValueError(f"the patch size must be 'auto', None or one size per axis, got {self.patch_size!r}")
    if not is_finite_number(self.step) or not 0 < self.step <= 1:
      raise ValueError(f"the sliding-window step must be in (0, 1] (a fraction of the patch), got {self.step!r}")
    if self.patch_batch is not None and (not is_integer(self.patch_batch) or self.patch_batch < 1):
      raise ValueError(f"the patches per network call must be a positive integer, got {self.patch_batch!r}")

  def record(self) -> dict:
    """The options that decide what the network sees (not how many patches one call runs), as a
    session stores them."""
    size = self.patch_size
    return {
      "resample": self.resample,
      "crop": self.crop,
      "mirror": self.mirror,
      "patch_size": list(size) if isinstance(size, (tuple, list)) else size,
      "step": self.step,
    }

  @classmethod
  def from_record(cls, stored: dict | None) -> InferenceOptions:
    """The options a session's :meth:`record` states (defaults for a session stored before it)."""
    if not stored:
      return cls()
    size = stored.get("patch_size", "auto")
    return cls(
      resample=stored.get("resample", True),
      crop=stored.get("crop", True),
      mirror=stored.get("mirror", False),
      step=stored.get("step", 0.5),
      patch_size=tuple(size) if isinstance(size, list) else size,
    )
