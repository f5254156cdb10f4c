"""The network made ready for one image, and the logits it gives: the image fitted
(:mod:`scribblejax.pipeline.preprocess`), the model wrapped (mirrored, slice by slice, region scores),
its parameters split, and what the refinement loop runs (the marked patches, or the whole image)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scribblejax.io.images import Image
from scribblejax.models.ensemble import Ensemble
from scribblejax.models.ordering import layer_order
from scribblejax.models.regions import Regions
from scribblejax.params import last_layers, split_params
from scribblejax.pipeline.preprocess import (
  Fitted,
  fit_image,
  fit_network,
  fit_to_patch,
  network_input,
  resample_to_model,
)
from scribblejax.pipeline.sliding_window import (
  MarkedPatches,
  Mirrored,
  SliceWise,
  marked_patches,
  patch_chunk,
  sliding_window_logits,
  windows_region,
)
from scribblejax.pipeline.spec import InferenceOptions, InputSpec, mirroring_axes
from scribblejax.refinement import predict

# tunable last layers when none are asked for (at most the model's)
DEFAULT_LAYERS = 5


class Network(NamedTuple):
  """A model with what its folder states about it."""

  model: Any  # the Flax NNX module
  info: Any  # its scribblejax.models.ModelInfo (normalisation, metadata, class names)
  spec: InputSpec  # what it takes and gives


class Loop(NamedTuple):
  """What the refinement loop runs (:func:`loop_split`)."""

  split: Any  # the network (on the marked patches, or the whole image)
  image: np.ndarray  # its input
  marks: np.ndarray  # the marks, in the input's layout
  patches: int  # marked patches (0: the whole image)
  per_call: int  # patches per network call
  region: tuple[slice, ...] | None = None  # the box of the model's grid the patches cover


def resolve_layers(model: Any, example: Any, layers: int | None) -> int:
  """The tunable last layers: ``layers``, or :data:`DEFAULT_LAYERS` at most the model's layers.

  Raises:
    ValueError: ``layers`` is not between 1 and the model's layers.
  """
  count = len(layer_order(model, example))
  if layers is None:
    return min(DEFAULT_LAYERS, count)
  if not 1 <= layers <= count:
    raise ValueError(f"--layers must be between 1 and {count} (the model's layers), got {layers}")
  return layers


def split_network(network: Network, fitted: Fitted, layers: int | None) -> tuple[Any, int]:
  """The network's parameters split with its last ``layers`` layers tunable (see :func:`resolve_layers`),
  traced on one network call's input: ``(split, layers)``."""
  example = jax.ShapeDtypeStruct((1, *network_input(fitted)), jnp.float32)
  layers = resolve_layers(network.model, example, layers)
  return split_params(network.model, last_layers(layers), example=example), layers


def mirrored(network: Network, fitted: Fitted, metadata: dict | None) -> Network:
  """The network averaged over its input flipped along the model's mirroring axes."""
  ndim = fitted.image.ndim - 1 - fitted.slices
  axes = mirroring_axes(metadata, ndim)
  example = (*(fitted.patch or fitted.image.shape[:-1])[fitted.slices :], fitted.image.shape[-1])
  return network._replace(model=Mirrored(network.model, axes, example))


def prepare(
  network: Network, img: Image, info: Any, layers: int | None, options: InferenceOptions
) -> tuple[Network, Any, Fitted, int]:
  """The image made ready for the network (axes, channels, normalisation, spacing, patches or
  padding), the network (mirrored if asked) and its split.

  A region-based network (:class:`scribblejax.models.Regions`) is unwrapped: the pipeline blends,
  mirrors and resamples its region logits as nnU-Net does, ``fitted.regions`` holds its class order,
  and :func:`loop_split` wraps it again for the refinement loop.

  Returns:
    ``(network, split, fitted, layers)``.
  """
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
    network = mirrored(network, fitted, info.metadata)
    axes = network.model.axes
    fitted = fitted._replace(
      notes=(
        *fitted.notes,
        f"mirrored along the model's axes {list(axes)}: {2 ** len(axes)} passes averaged, as nnU-Net predicts",
      )
    )
  if fitted.slices:
    network = network._replace(model=SliceWise(network.model, (*fitted.patch[1:], fitted.image.shape[-1])))
  split, layers = split_network(network, fitted, layers)
  return network, split, fit_network(split, fitted), layers


def network_passes(model: Any) -> int:
  """Network passes per patch: mirrored copies times an ensemble's members."""
  passes = 1
  while isinstance(model, (Mirrored, SliceWise)):
    passes *= 2 ** len(model.axes) if isinstance(model, Mirrored) else 1
    model = model.net
  return passes * model.members if isinstance(model, Ensemble) else passes


def network_logits(
  split: Any, fitted: Fitted, tunable: Any = None, step: float = 0.5, progress: Any = None
) -> np.ndarray:
  """The network's model-layout logits on a fitted image: patch by patch when ``fitted.patch`` is set
  (``progress(done, total)`` after each), else at once."""
  if fitted.patch is not None:
    return sliding_window_logits(split, fitted.image, fitted.patch, tunable, step=step, progress=progress)
  return np.asarray(predict(split, fitted.image, tunable))


def same_tree(
  like: Any, leaves_of: Any, problem: str = "the patch blend's tunable layers are not the network's"
) -> Any:
  """``leaves_of``'s leaves in ``like``'s structure: a network's and its MarkedPatches' tunable layers,
  or a session's stored weights.

  Raises:
    ValueError: ``problem``, when the leaves' shapes differ.
  """
  leaves = jax.tree.leaves(leaves_of)
  if [np.shape(a) for a in leaves] != [np.shape(b) for b in jax.tree.leaves(like)]:
    raise ValueError(problem)
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def loop_split(
  network: Network, fitted: Fitted, split: Any, marks: np.ndarray, select: Any, inference: InferenceOptions
) -> Loop:
  """What the refinement loop runs, with the parameters ``select`` picks tunable.

  With patches, the network on the sliding-window patches that hold marks, blended at the marked
  voxels as the sliding window blends them (:class:`scribblejax.pipeline.sliding_window.MarkedPatches`:
  the compiled loop depends on the counts of patches and marked voxels, rounded up, not on where they
  are); else ``split`` itself on the whole image. A region-based network is read as classes
  (:class:`scribblejax.models.Regions`) around either.
  """
  if fitted.patch is None and fitted.regions is None:
    return Loop(split, fitted.image, marks, 0, 0)
  module, image, loop_marks, patches, per_call, region = network.model, fitted.image, marks, 0, 0, None
  if fitted.patch is not None:
    image, loop_marks, kwargs = marked_patches(fitted.image, marks, fitted.patch, inference.step)
    starts = kwargs.pop("starts")
    per_call = inference.patch_batch or patch_chunk(fitted.patch, network_passes(network.model))
    module = MarkedPatches(network.model, fitted.patch, fitted.image.shape[-1], chunk=per_call, **kwargs)
    patches, region = len(starts), windows_region(starts, fitted.patch)[0]
  if fitted.regions is not None:
    module = Regions.of(module, fitted.regions)
  example = jax.ShapeDtypeStruct((1, *image.shape), jnp.float32)
  return Loop(split_params(module, select, example=example), image, loop_marks, patches, per_call, region)


def refined_logits(
  split: Any, fitted: Fitted, result: Any, patches: int, step: float = 0.5, progress: Any = None
) -> np.ndarray:
  """The model-layout logits of the network refined by ``result`` (a :func:`loop_split` loop's): the
  loop's own on the whole image, else the refined network's on every patch (and raw region logits for
  a region-based network, to blend and resample as nnU-Net does)."""
  if not patches and fitted.regions is None:
    return np.asarray(result.logits)
  return network_logits(split, fitted, same_tree(split.tunable, result.tunable), step=step, progress=progress)
