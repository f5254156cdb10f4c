"""What a refinement is given, checked before anything is compiled: the image, the marks, the trunk.

:func:`prepare_inputs` validates an image and its marks against a split's model (shapes, dtypes,
labels, finite pixels) and says what is wrong in terms of the caller's arrays. :func:`compute_trunk`
computes the frozen trunk of one image once, for every interaction on it, and :func:`trunk_mismatch`
says why a trunk cannot serve a call.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scribblejax import marks as marks_lib
from scribblejax.config import RefineConfig
from scribblejax.params import Split
from scribblejax.refinement import drivers, network
from scribblejax.refinement import trunk as trunk_lib
from scribblejax.refinement.backend import Backend


class Trunk(NamedTuple):
  """The frozen trunk's values for one image, computed once by :func:`compute_trunk` and reused by
  every :func:`~scribblejax.refinement.refine` call on that image (``refine(..., trunk=...)``; a
  :class:`~scribblejax.Session` does this for its rounds). The trunk's values do not depend on the
  tunable weights, so they serve a fresh round from W and a round continued from an earlier W_lam alike;
  the keep term's targets are W's labels, used only with the split that holds that W (``anchor``).

  Attributes:
    residuals: the trunk's values that the tunable tail reads (device arrays).
    image: the image they belong to, float32 ``[*spatial, channels]`` (a host copy; each call's
      image must equal it).
    frozen: the split's frozen parameters they were computed with (each call's split must hold
      this very object).
    graphdef: the split's :class:`~scribblejax.refinement.network.GraphKey`.
    compute_dtype: the network's compute dtype (``None`` for float32).
    conv_backend: the resolved convolution backend.
    keep_targets: the keep term's targets, int32 ``[*spatial]``: the labels of the network W
      (:func:`~scribblejax.refinement.drivers.keep_targets`, the whole network in float32, as a refinement
      without a trunk computes them every call), or ``None`` when the config had no keep term.
    anchor: the tunable weights W they were computed with (a refinement whose split holds other ones
      computes its own).
  """

  residuals: list
  image: np.ndarray
  frozen: Any
  graphdef: Any
  compute_dtype: str | None
  conv_backend: str
  keep_targets: Any = None
  anchor: Any = None


def _check_image(image: Any) -> np.ndarray:
  """The image as float32 (not necessarily a copy), refused if not real numbers or not finite in float32."""
  arr = np.asarray(image)
  # jnp.issubdtype knows ml_dtypes' floats (bfloat16 ...), which NumPy does not count as numbers
  if not jnp.issubdtype(arr.dtype, jnp.number) or jnp.issubdtype(arr.dtype, jnp.complexfloating):
    raise ValueError(f"image must be a real numeric array, got dtype {arr.dtype}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"image contains {int(np.size(arr) - np.isfinite(arr).sum())} NaN or Inf values")
  with np.errstate(over="ignore"):
    as_f32 = np.asarray(arr, np.float32)
  if as_f32 is not arr and not np.all(np.isfinite(as_f32)):
    raise ValueError(
      f"image holds {int(np.size(as_f32) - np.isfinite(as_f32).sum())} values beyond float32's "
      f"range (largest magnitude {float(np.abs(arr).max()):.3g}); rescale it first"
    )
  return as_f32


@functools.lru_cache(maxsize=256)
def _output_shape(graphdef: Any, tunable_key: tuple, frozen_key: tuple, image_shape: tuple, dtype: str):
  """The logits' shape (by abstract evaluation, cached per model structure and image shape), or the
  model's own error."""
  structs = [jax.tree.unflatten(key[0], trunk_lib.key_leaves(key)) for key in (tunable_key, frozen_key)]
  try:
    return tuple(
      jax.eval_shape(
        functools.partial(network.forward, graphdef), *structs, jax.ShapeDtypeStruct(image_shape, np.dtype(dtype))
      ).shape
    ), None
  except Exception as err:  # noqa: BLE001 (the model's own shape checks, reported by the caller)
    return None, f"{type(err).__name__}: {err}"


def num_classes_of(split: Split, image_shape: tuple[int, ...], dtype=jnp.float32) -> int:
  """The number of output classes of the split's model for an unbatched image shape (no compile).

  Cached per model structure and image shape, so repeated interactions do not trace the model again.

  Raises:
    ValueError: the model does not accept such an image, or does not give one logit vector per pixel.
  """
  shape, error = _output_shape(
    network.graph_key(split.graphdef),
    trunk_lib.structure_key(split.tunable),
    trunk_lib.structure_key(split.frozen),
    tuple(int(n) for n in image_shape),
    jnp.dtype(dtype).str,
  )
  if error is not None:
    raise ValueError(f"the model does not accept an image of shape {tuple(image_shape)}: {error}")
  if tuple(shape[:-1]) != tuple(image_shape[:-1]):
    raise ValueError(
      f"the model maps an image of spatial shape {image_shape[:-1]} to logits of shape {shape}; "
      "refinement needs one logit vector per pixel"
    )
  return int(shape[-1])


_spatial_dims_cache: dict = {}


def split_spatial_dims(split: Split) -> int | None:
  """The model's spatial rank when it states one (``spatial_dims`` attribute), else ``None``."""
  key = network.graph_key(split.graphdef)
  if key not in _spatial_dims_cache:
    if len(_spatial_dims_cache) >= 256:
      _spatial_dims_cache.clear()
    model = nnx.merge(split.graphdef, split.tunable, split.frozen)
    _spatial_dims_cache[key] = getattr(model, "spatial_dims", None)
  return _spatial_dims_cache[key]


def validate(split: Split, image: Any, marks: Any, *, batched: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """:func:`prepare_inputs` on the host: float32 image and int32 marks as NumPy arrays."""
  arr = _check_image(image)
  mk = np.asarray(marks)
  lead = 1 if batched else 0
  spatial_dims = split_spatial_dims(split)
  if batched and spatial_dims is not None and mk.ndim == spatial_dims:
    raise ValueError(
      f"a batch needs a leading batch axis, but marks of shape {mk.shape} are one "
      f"{spatial_dims}D map; add one (marks[None], image[None]) or refine one image with refine"
    )
  if batched and (arr.ndim < 1 or mk.ndim < 1 or arr.shape[0] != mk.shape[0]):
    raise ValueError(f"images and marks must share a leading batch axis, got shapes {arr.shape} and {mk.shape}")
  if batched and mk.shape[0] == 0:
    raise ValueError(f"a batch needs at least one image, got images of shape {arr.shape}")
  if spatial_dims is not None and mk.ndim - lead != spatial_dims:
    raise ValueError(f"marks of shape {mk.shape} have {mk.ndim - lead} spatial axes but the model is {spatial_dims}D")
  if arr.shape == mk.shape:
    arr = arr[..., None]
  if arr.ndim != mk.ndim + 1 or arr.shape[:-1] != mk.shape:
    raise ValueError(
      f"image of shape {arr.shape} and marks of shape {mk.shape} do not match: the image must be "
      "[*spatial, channels] (or [*spatial]) with marks [*spatial]"
    )
  num_classes = num_classes_of(split, arr.shape[lead:])
  if batched:
    mk = np.stack([marks_lib.validate_mark_map(m, arr.shape[1:-1], num_classes) for m in mk])
  else:
    mk = marks_lib.validate_mark_map(mk, arr.shape[:-1], num_classes)
  return np.asarray(arr, np.float32), np.asarray(mk, np.int32)


def prepare_inputs(split: Split, image: Any, marks: Any, *, batched: bool = False) -> tuple[jax.Array, jax.Array]:
  """Validates an image and its marks; returns float32 image ``[*spatial, C]`` and int32 marks.

  An image without a channel axis (same shape as the marks) gets one.

  Raises:
    ValueError: naming the problem: rank or shape mismatch, non-integer marks, labels out of range,
      NaN/Inf pixels.
  """
  arr, mk = validate(split, image, marks, batched=batched)
  return jnp.asarray(arr), jnp.asarray(mk)


def one_image(split: Split, image: Any) -> np.ndarray:
  """A checked float32 image ``[*spatial, channels]`` (a channel axis added for a model that states its
  ``spatial_dims``), which the model accepts; not necessarily a copy.

  Raises:
    ValueError: as :func:`prepare_inputs`.
  """
  arr = _check_image(image)
  if arr.ndim == split_spatial_dims(split):
    arr = arr[..., None]
  num_classes_of(split, arr.shape)
  return np.asarray(arr, np.float32)


def compute_trunk(split: Split, image: Any, config: RefineConfig = RefineConfig()) -> Trunk:
  """The frozen trunk's values for ``image``, for every later refinement of it.

  One interaction computes the trunk (the part of the forward pass that only the frozen weights
  and the image decide) once; with this, a series of interactions on one image computes it once
  in all. Pass the result as ``refine(..., trunk=...)`` with the same split, the same image and a
  config with the same ``compute_dtype`` and ``conv_backend``. It holds device memory (the values
  the tail reads) for as long as it is kept.

  Args:
    split: from :func:`scribblejax.split_params`.
    image: ``[*spatial, channels]``, or ``[*spatial]`` for a model that states its
      ``spatial_dims``.
    config: needs ``cache_trunk=True``; its ``compute_dtype`` and ``conv_backend`` apply. With a keep
      term (``keep_weight`` above 0) the network W's labels, the term's targets, are computed here too,
      once, instead of at every refinement.

  Raises:
    ValueError: bad image (as for ``refine``), or ``config.cache_trunk`` is off.
  """
  if not config.cache_trunk:
    raise ValueError("compute_trunk needs config.cache_trunk=True (without it every step runs the whole network)")
  arr = np.array(one_image(split, image))  # a copy: later changes to the caller's array cannot reach it
  backend = Backend.of(config)
  graphdef = network.graph_key(split.graphdef)
  residuals = drivers.trunk_program(
    graphdef, backend.compute_dtype, backend.conv_backend, drivers.SINGLE, split.tunable, split.frozen, jnp.asarray(arr)
  )
  targets = None
  if config.keep_weight > 0:
    targets = drivers.keep_targets(split, jnp.asarray(arr), None, config.keep_weight)
  return Trunk(
    residuals, arr, split.frozen, graphdef, backend.compute_dtype, backend.conv_backend, targets, split.tunable
  )


def trunk_mismatch(
  trunk: Trunk, split: Split, config: RefineConfig | None = None, image: np.ndarray | None = None
) -> str | None:
  """Why ``trunk`` cannot serve ``split`` (a refinement with ``config``, of the prepared ``image``,
  float32 ``[*spatial, channels]``, for those given); ``None`` when it can."""
  if not isinstance(trunk, Trunk):
    return f"trunk must come from compute_trunk, got {type(trunk).__name__}"
  if config is not None and not config.cache_trunk:
    return "a trunk was given but config.cache_trunk is off"
  if trunk.frozen is not split.frozen or trunk.graphdef != network.graph_key(split.graphdef):
    return "the trunk was computed for another split (compute it again with this one)"
  backend = Backend.of(config) if config is not None else None
  if backend is not None and (trunk.compute_dtype, trunk.conv_backend) != (backend.compute_dtype, backend.conv_backend):
    return (
      f"the trunk was computed with compute_dtype={trunk.compute_dtype or 'float32'}, conv_backend="
      f"{trunk.conv_backend}; this config has {backend.compute_dtype or 'float32'}, {backend.conv_backend}"
    )
  if image is not None and trunk.image.shape != image.shape:
    return (
      f"the trunk was computed for another image: of shape {trunk.image.shape}, this one is {image.shape} "
      "(pass compute_trunk the image with its channel axis)"
    )
  if image is not None and not np.array_equal(trunk.image, image):
    return "the trunk was computed for another image (compute it again for this one)"
  return None
