"""The simulated user on your own image and label, through the model's own pipeline.

``predict`` and ``refine`` do not feed the network the image as read: they order its axes, crop it to
its non-zero region, normalise it, resample it to the model's voxel spacing, pad it and run the
network patch by patch, as nnU-Net does (:func:`scribblejax.pipeline.prepare`). A case given by
files (``scribblejax evaluate --image FILE --label FILE``) is evaluated the same way, so its numbers
are what a user of ``refine`` gets:

* the simulated user compares the segmentation on the image's own grid with the label file and marks
  that grid, as a clinician draws on the image;
* the marks go to the model's grid as ``refine`` sends a marks file there
  (:func:`scribblejax.pipeline.to_model`); with patches, the loop refines the network on the
  patches that hold marks, blended as the sliding window blends them (:class:`scribblejax.pipeline.MarkedPatches`);
* the refined network segments the whole image again, and the segmentation comes back to the image's
  grid (:func:`scribblejax.pipeline.labels_from_logits`), where Dice is measured.

Region growing and the random walker work on the image's grid, on the image normalised as the model
normalises it (without the crop to the non-zero region).

Example:
  >>> pipe = prepare_pipeline(model, info, read_image("ct.nii.gz"), layers=3)
  >>> case = image_case("ct", read_image("ct.nii.gz"), truth, pipe, num_classes=2)
  >>> run_case(case, pipeline_method("refine", pipe, RefineConfig(max_steps=100)))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scribblejax import marks as marks_lib
from scribblejax.app import compile_timer
from scribblejax.config import RefineConfig
from scribblejax.io.images import Image, read_image
from scribblejax.params import head, last_layers, split_params
from scribblejax.pipeline import (
  Fitted,
  InferenceOptions,
  Network,
  cover_marks,
  fit_image,
  labels_from_logits,
  loop_split,
  masks_on_image,
  network_input,
  network_logits,
  prepare,
  same_tree,
  spec_of,
  to_model,
)
from scribblejax.pipeline.round import honoured_fraction, refine_on_model_grid, round_config, round_labels
from scribblejax.refinement import compute_trunk, predict, refine
from scribblejax.research.baselines import METHODS, Method, random_walker_method
from scribblejax.research.evaluate import make_case


class Pipeline(NamedTuple):
  """A network made ready for one image: what ``predict`` and ``refine`` run on it.

  Attributes:
    network: the model (mirrored or slice by slice, as prepared) with its stored info and input spec.
    split: its parameters, the last ``layers`` layers tunable.
    fitted: the image on the model's grid, and how to bring results back.
    inference: the options it was prepared with.
    layers: the tunable last layers of ``split``.
  """

  network: Any
  split: Any
  fitted: Fitted
  inference: InferenceOptions
  layers: int


class PipelineRefineState(NamedTuple):
  """State of a refinement through the pipeline."""

  labels: np.ndarray  # int32[*image_spatial]: the current segmentation on the image's grid
  num_steps: int  # steps of the last refinement (0 before any)
  satisfied: bool  # the loop honoured every mark on the model's grid
  honoured: float  # the fraction of marked image pixels the segmentation gives their class
  patches: int  # patches the last loop ran (0: the whole image)
  compile_seconds: float  # of the last update (patches: each new set of patches compiles anew)
  tunable: Any = None  # W_lam of the last refinement, in the network's structure
  trunk: Any = None  # the frozen trunk on the whole image (no patches, cache_trunk)
  marks: Any = None  # int32[*image_spatial]: the marks so far, as the last update saw them
  model_marks: Any = None  # int32[*model_spatial]: those marks on the model's grid, newest on top
  free: Any = None  # bool[*image_spatial]: where the network was unsure (progressive merge)
  protected: Any = None  # bool[*image_spatial]: where the network was sure (progressive merge)


def prepare_pipeline(
  model: Any, info: Any, image: Image, layers: int | None = None, inference: InferenceOptions = InferenceOptions()
) -> Pipeline:
  """The model's pipeline on one image, as ``refine`` prepares it.

  Args:
    model: the network (e.g. with classes appended by :func:`scribblejax.models.add_classes`).
    info: its :class:`scribblejax.models.store.ModelInfo` (normalisation, spacing, patch size).
    image: as read by :func:`scribblejax.io.images.read_image`.
    layers: tunable last layers (``None``: the library's default, at most the model's layers).
    inference: how the network sees the image.

  Raises:
    ValueError: the image does not suit the model (dimensions, channels), or ``layers`` is out of range.
  """
  network = Network(model, info, spec_of(model, info))
  network, split, fitted, layers = prepare(network, image, info, layers, inference)
  return Pipeline(network, split, fitted, inference, layers)


def segment(pipe: Pipeline, split: Any = None) -> np.ndarray:
  """The segmentation ``int32[*image_spatial]`` the network (``split``, default the pipeline's) gives the
  image, on the image's grid."""
  split = pipe.split if split is None else split
  return labels_from_logits(network_logits(split, pipe.fitted, step=pipe.inference.step), pipe.fitted)


def image_grid_input(image: Image, pipe: Pipeline) -> np.ndarray:
  """``float32[*image_spatial, C]``: the image on its own grid and axes, channels adapted and normalised
  as the model normalises it (without cropping), for region growing and the random walker."""
  info = pipe.network.info
  fitted = fit_image(image, pipe.network.spec, info.normalization, info.metadata, slices=True)
  array = fitted.image
  if fitted.squeezed:
    array = np.expand_dims(array, fitted.squeezed)
  if fitted.order is not None:
    array = np.transpose(array, (*np.argsort(fitted.order), array.ndim - 1))
  return np.ascontiguousarray(array)


def image_case(
  name: str, image: Image, truth: np.ndarray, pipe: Pipeline, num_classes: int, class_names: Sequence[str] | None = None
):
  """A :class:`scribblejax.research.evaluate.Case` on the image's own grid: the label map as read and the
  image as :func:`image_grid_input` gives it.

  Raises:
    ValueError: the label map's shape differs from the image's, or its values are not classes.
  """
  return make_case(name, image_grid_input(image, pipe), truth, num_classes, class_names)


def read_label(image: Image, label_path: str, num_classes: int, add_classes: int = 0) -> np.ndarray:
  """A label file as ``int64[*image_spatial]``, checked against the image and the model's classes.

  Raises:
    ValueError: the label's shape is not the image's, or it holds values that are no class.
  """
  label = read_image(label_path, labels=True).array
  if label.ndim == image.array.ndim and label.shape[-1] == 1:
    label = label[..., 0]
  if label.shape != image.array.shape[:-1]:
    raise ValueError(
      f"image {image.path} has spatial shape {image.array.shape[:-1]} but label {label_path} has shape {label.shape}"
    )
  if label.dtype.kind == "f" and not np.all(label == np.round(label)):
    raise ValueError(f"label {label_path} holds non-integer values")
  label = label.astype(np.int64)
  if label.size and label.min() < 0:
    raise ValueError(f"label {label_path} holds negative values")
  top = int(label.max()) if label.size else 0
  n = num_classes
  if top >= n + add_classes:
    hint = "" if add_classes else "; pass --add-classes K to append output classes for them"
    raise ValueError(
      f"label {label_path} has values up to {top} but the model has {n} classes "
      f"(0..{n - 1}){' + ' + str(add_classes) + ' added' if add_classes else ''}{hint}"
    )
  return label


def file_case(
  image_path: str,
  label_path: str,
  backbone: Any,
  model: Any,
  layers: int | None,
  inference: InferenceOptions = InferenceOptions(),
  add_classes: int = 0,
):
  """A case given by an image file and a label file, and the model's pipeline on the image (axes,
  channels, crop, normalisation, spacing, patches: as ``scribblejax refine`` runs it).

  Args:
    image_path: the image file.
    label_path: its label map, in the image's geometry.
    backbone: a :class:`scribblejax.research.evaluate.Backbone` (its ``info``, ``num_classes``, ``class_names``).
    model: the network to refine (the backbone's, perhaps with ``add_classes`` classes appended).
    layers: tunable last layers (``None``: the library's default).
    inference: how the network sees the image.
    add_classes: classes appended to the backbone's.

  Returns:
    ``(case, pipeline)``.

  Raises:
    ValueError: a file is missing, the label does not fit the image or the classes, or the image the model.
  """
  for what, path in (("image", image_path), ("label", label_path)):
    if not Path(path).exists():
      raise ValueError(f"{what} file {path} does not exist")
  img = read_image(image_path)
  n = backbone.num_classes
  label = read_label(img, label_path, n, add_classes)
  pipe = prepare_pipeline(model, backbone.info, img, layers, inference)
  names = list(backbone.class_names or [f"class {c}" for c in range(n)]) + [
    f"added {c}" for c in range(n, n + add_classes)
  ]
  return image_case(Path(image_path).name, img, label, pipe, n + add_classes, names), pipe


def _head_split(pipe: Pipeline):
  example = jax.ShapeDtypeStruct((1, *network_input(pipe.fitted)), jnp.float32)
  return split_params(pipe.network.model, head(), example=example)


def pipeline_refine_method(
  pipe: Pipeline,
  config: Any = None,
  *,
  head_only: bool = False,
  continue_weights: bool = False,
  name: str | None = None,
  new_classes: tuple[int, ...] = (),
):
  """The paper's refinement through the model's pipeline; each interaction refines on all marks so
  far, on the model's grid (patches holding marks only, where the network runs patch by patch), with
  ``refine``'s own step (:mod:`scribblejax.pipeline.round`).

  Args:
    pipe: from :func:`prepare_pipeline`.
    config: the :class:`scribblejax.RefineConfig` (default: its defaults).
    head_only: tune the classifier only instead of the pipeline's last ``layers`` layers.
    continue_weights: start each interaction from the previous W_lam (default: from W, the paper's).
    name: the method's name (default ``"refine_l{layers}"`` or ``"head"``).
    new_classes: classes appended to the network's head (``--add-classes``): a change into one is not
      protected by the round's merge.

  Returns:
    A :class:`scribblejax.research.baselines.Method` whose ``init`` and ``warmup`` ignore the image they are
    given (the pipeline holds it). ``info`` gives ``steps``, ``satisfied``, ``marks_honoured`` (on
    the image's grid), ``refined_patches`` and ``compile_seconds``: with patches, a round whose counts
    of marked patches and voxels round up to an earlier round's reuses its compiled loop; otherwise
    it compiles, and that time is inside the interaction's seconds.
  """
  config = round_config(RefineConfig() if config is None else config, pipe.fitted)
  fitted = pipe.fitted
  split = _head_split(pipe) if head_only else pipe.split
  select = head() if head_only else last_layers(pipe.layers)
  whole = fitted.patch is None
  # the whole image's loop is the same every interaction (its frozen trunk is computed once)
  whole_loop = loop_split(pipe.network, fitted, split, None, select, pipe.inference) if whole else None
  cached = whole and config.cache_trunk

  def init(image):
    del image
    trunk = compute_trunk(whole_loop.split, fitted.image, config) if cached else None
    logits = network_logits(split, fitted, step=pipe.inference.step)
    free, _, protected = masks_on_image(None, logits, fitted, config) if config.progressive_merge else (None,) * 3
    labels = labels_from_logits(logits, fitted)
    return PipelineRefineState(labels, 0, True, 1.0, 0, 0.0, None, trunk, free=free, protected=protected)

  def update(state, marks):
    marks = np.array(marks, np.int32)  # a copy: the caller may change its array later
    previous_marks = state.marks
    # as a refine session does: each interaction's new marks go to the model's grid and over the earlier
    # ones there, so where marks of two interactions share a voxel of a coarser grid, the newer holds
    if state.marks is None:
      model_marks = to_model(marks, fitted)
    else:
      new = np.where(marks != state.marks, marks, -1)
      model_marks = marks_lib.accumulate(state.model_marks, to_model(new, fitted))
    state = state._replace(marks=marks, model_marks=model_marks)
    model_marks = cover_marks(model_marks, marks, fitted)  # as refine: the way back's voxels too
    if not (model_marks >= 0).any():  # every mark outside the crop: the pipeline gives background there
      return state._replace(
        num_steps=0, satisfied=False, honoured=honoured_fraction(state.labels, marks), patches=0, compile_seconds=0.0
      )
    with compile_timer() as compiled:
      if whole:
        loop = whole_loop._replace(marks=model_marks)
      else:
        loop = loop_split(pipe.network, fitted, split, model_marks, select, pipe.inference)
      start = same_tree(loop.split.tunable, state.tunable) if continue_weights and state.tunable is not None else None
      trunk = state.trunk if whole else None
      result, logits, _ = refine_on_model_grid(
        split, fitted, loop, config, pipe.inference.step, start=start, trunk=trunk
      )
    tunable = same_tree(split.tunable, result.tunable)
    labels = round_labels(
      logits, fitted, config, state.labels, marks, previous_marks, state.free, state.protected, new_classes
    ).labels
    return state._replace(
      labels=labels,
      num_steps=int(result.num_steps),
      satisfied=bool(result.satisfied),
      honoured=honoured_fraction(labels, marks),
      patches=loop.patches,
      compile_seconds=compiled[0],
      tunable=tunable,
    )

  def warmup(image):
    del image
    jax.block_until_ready(predict(split, np.zeros(network_input(fitted), np.float32)))
    if whole:
      trunk = compute_trunk(whole_loop.split, fitted.image, config) if cached else None
      empty = np.full(fitted.image.shape[:-1], -1, np.int32)
      jax.block_until_ready(refine(whole_loop.split, fitted.image, empty, config, trunk=trunk).labels)

  def info(state):
    return {
      "steps": state.num_steps,
      "satisfied": state.satisfied,
      "marks_honoured": state.honoured,
      "refined_patches": state.patches,
      "compile_seconds": state.compile_seconds,
    }

  if name is None:
    name = "head" if head_only else f"refine_l{pipe.layers}"
  return Method(name, init, lambda s: s.labels, update, warmup, info)


def pipeline_method(kind: str, pipe: Pipeline, config: Any = None, new_classes: tuple[int, ...] = ()):
  """A method by name through the model's pipeline: "refine" (the pipeline's last layers), "head",
  "random_walker" (from the pipeline's segmentation) or "initial" (the pipeline's segmentation);
  ``new_classes``: those appended to the network's head (:func:`pipeline_refine_method`)."""
  if kind in ("refine", "head"):
    return pipeline_refine_method(pipe, config, head_only=kind == "head", new_classes=new_classes)
  if kind == "paper":
    config = RefineConfig.paper() if config is None else config
    return pipeline_refine_method(pipe, config, name="paper", new_classes=new_classes)
  if kind == "fbrs":
    raise ValueError(
      "--method fbrs runs on built-in tasks (--task) only; a case given by --image/--label runs "
      "refine, paper, head, random_walker or initial through the model's pipeline"
    )
  if kind == "random_walker":
    return random_walker_method(None, initial=lambda image: segment(pipe))
  if kind == "initial":

    def warmup(image):
      del image
      jax.block_until_ready(predict(pipe.split, np.zeros(network_input(pipe.fitted), np.float32)))

    return Method("initial", lambda image: segment(pipe), lambda s: s, lambda s, marks: s, warmup, lambda s: {})
  raise ValueError(f"method must be one of {METHODS}, got {kind!r}")


def pipeline_summary(pipe: Pipeline) -> dict:
  """What the pipeline did to the image, for the results: the model's grid, the patch, the notes."""
  fitted = pipe.fitted
  return {
    "model_grid": list(fitted.image.shape[:-1]),
    "patch": None if fitted.patch is None else list(fitted.patch),
    "resampled": fitted.resampling is not None,
    "cropped": fitted.crop is not None,
    "patch_step": pipe.inference.step,
    "mirror": pipe.inference.mirror,
    "notes": list(fitted.notes),
  }
