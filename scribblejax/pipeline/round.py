"""One round's refine-and-segment on the model's grid, with no files: the step that ``scribblejax refine``
(:mod:`scribblejax.app.refine_round`) and the evaluation harness's methods through the model's pipeline
(:mod:`scribblejax.research.evaluate_image`) share, so that the harness measures what ``refine`` does.

A round, once its marks are on the model's grid and its loop is chosen (:func:`scribblejax.pipeline.loop_split`):

1. :func:`round_config`: the settings the loop runs with (no keep term with patches);
2. :func:`refine_on_model_grid`: the refinement loop, and the refined network's logits on the model's grid;
3. :func:`round_labels`: those logits as labels on the image's grid, merged into the previous segmentation
   (the progressive merge);
4. :func:`honoured_fraction`: what the labels honour of the marks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from scribblejax.config import RefineConfig
from scribblejax.pipeline.grid import image_on_image_grid, labels_from_logits, masks_on_image
from scribblejax.pipeline.network import Loop, refined_logits, same_tree
from scribblejax.pipeline.preprocess import Fitted
from scribblejax.pipeline.sliding_window import sliding_window_logits_of
from scribblejax.refinement import RefineResult, refine
from scribblejax.refinement.merge import merge_with_reasons, new_marks_of


class Refinement(NamedTuple):
  """What :func:`refine_on_model_grid` returns.

  Attributes:
    result: the loop's :class:`scribblejax.refinement.RefineResult`.
    logits: the refined network's model-layout logits on the whole image.
    before: the network's own model-layout logits, when they came in the same pass over the patches
      (``joint``), else ``None``.
  """

  result: RefineResult
  logits: np.ndarray
  before: np.ndarray | None = None


def round_config(config: RefineConfig, fitted: Fitted) -> RefineConfig:
  """The config a round through the pipeline runs with: ``config`` itself, or without the keep term
  where the network runs patch by patch (the term needs the network's logits at every voxel; with
  patches the loop has them at the marked voxels only)."""
  if config.keep_weight and fitted.patch is not None:
    return dataclasses.replace(config, keep_weight=0.0)
  return config


def honoured_fraction(labels: np.ndarray, marks: np.ndarray) -> float:
  """The fraction of marked pixels (``marks >= 0``) that ``labels`` gives their mark's class (1 with no marks)."""
  marked = marks >= 0
  return float((labels[marked] == marks[marked]).mean()) if marked.any() else 1.0


def refine_on_model_grid(
  split: Any,
  fitted: Fitted,
  loop: Loop,
  config: RefineConfig,
  step: float = 0.5,
  *,
  start: Any = None,
  trunk: Any = None,
  progress: Any = None,
  patch_progress: Any = None,
  joint: bool = False,
  nothing: bool = False,
) -> Refinement:
  """The refinement loop on the marks of ``loop``, and the refined network's logits on the model's grid.

  Args:
    split: the network made ready for the image (:func:`scribblejax.pipeline.prepare`), whole-image.
    fitted: the image on the model's grid.
    loop: what the loop runs (:func:`scribblejax.pipeline.loop_split`), its marks on the model's grid.
    config: the round's settings (:func:`round_config`'s).
    step: the sliding window's step, in patches.
    start: tunable parameters to start from (in ``loop.split.tunable``'s structure), else W.
    trunk: the frozen trunk of a whole-image loop, computed before (:func:`scribblejax.refinement.compute_trunk`).
    progress: ``progress(steps_taken, max_steps)`` during the loop.
    patch_progress: ``patch_progress(done, total)`` after each patch of a sliding-window segmentation.
    joint: with patches, the network's own logits in the same pass over the patches as the refined ones.
    nothing: no mark to refine on: no step, the network (``start``, else W) as it stands.

  Returns:
    The :class:`Refinement`.
  """
  if nothing:
    tunable = split.tunable if start is None else start
    result = RefineResult(None, None, tunable, np.int32(0), np.bool_(True), np.bool_(False), None)
  else:
    result = refine(loop.split, loop.image, loop.marks, config, start=start, progress=progress, trunk=trunk)
  if joint:
    before, logits = sliding_window_logits_of(
      split,
      fitted.image,
      fitted.patch,
      [None, same_tree(split.tunable, result.tunable)],
      step=step,
      progress=patch_progress,
    )
    return Refinement(result, logits, before)
  return Refinement(
    result, refined_logits(split, fitted, result, max(loop.patches, int(nothing)), step, patch_progress)
  )


class RoundLabels(NamedTuple):
  """What :func:`round_labels` returns, on the image's grid.

  Attributes:
    labels: ``int32[*image_spatial]``, the round's segmentation.
    network_labels: ``int32[*image_spatial]``, the refined network's own labels.
    reasons: ``uint8[*image_spatial]``, why each pixel of ``labels`` has its label, an index into
      :data:`scribblejax.refinement.merge.REASONS` (``None``: no merge).
  """

  labels: np.ndarray
  network_labels: np.ndarray
  reasons: np.ndarray | None


def round_labels(
  logits: np.ndarray,
  fitted: Fitted,
  config: RefineConfig,
  previous_labels: np.ndarray | None,
  marks: np.ndarray,
  previous_marks: np.ndarray | None,
  free: np.ndarray | None = None,
  protected: np.ndarray | None = None,
  new_classes: tuple[int, ...] = (),
) -> RoundLabels:
  """The round's segmentation on the image's grid (with ``config.merge_contrast`` the merge reads the
  image as the model does, brought back to that grid: :func:`image_on_image_grid`).

  Args:
    logits: the refined network's model-layout logits (:func:`refine_on_model_grid`'s).
    fitted: the image on the model's grid.
    config: the round's settings (``progressive_merge``).
    previous_labels: ``int32[*image_spatial]``, the segmentation before this round (the merge's base).
    marks: ``int32[*image_spatial]``, every round's marks so far, ``-1`` unmarked.
    previous_marks: the marks of the rounds before (``None``: none), so that marks a round repeats are
      not new.
    free: ``bool[*image_spatial]``, where the network was unsure (the merge may change it), or ``None``;
      the pixels where the refined network is sure (``config.merge_far``) are added to it.
    protected: ``bool[*image_spatial]``, where the network was sure (``config.merge_protect``: the merge
      keeps its label unless marked), or ``None``.
    new_classes: the classes appended to the network's head (``--new-class``): a change into one is not
      protected (:func:`scribblejax.refinement.merge.progressive_merge`).

  Returns:
    The segmentation (with the progressive merge, the refined labels in the regions of change that touch
    this round's new marks where the refined network is sure of them, wherever it is very sure, and where
    the image says so; every mark honoured), the refined network's own labels, and why each pixel has its
    label.
  """
  network_labels = labels_from_logits(logits, fitted)
  if not config.progressive_merge:
    return RoundLabels(network_labels, network_labels, None)
  new_marks = new_marks_of(marks, previous_marks)
  far, near, _ = masks_on_image(logits, None, fitted, config)
  free = far if free is None else (free if far is None else free | far)
  merged = merge_with_reasons(
    previous_labels,
    network_labels,
    new_marks,
    marks,
    free=free,
    near=near,
    protected=protected,
    new_classes=new_classes,
    image=None if fitted.regions is not None or config.merge_contrast >= 1 else image_on_image_grid(fitted),
    contrast=config.merge_contrast,
  )
  return RoundLabels(merged.labels, network_labels, merged.reasons)
