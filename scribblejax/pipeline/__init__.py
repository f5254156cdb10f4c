"""The image pipeline between an image and the network, nnU-Net style, with no files and no CLI.

What a model takes and states (:mod:`~scribblejax.pipeline.spec`), an image fitted to it: axes,
channels, crop, normalisation, spacing, patches (:mod:`~scribblejax.pipeline.preprocess`, with
:mod:`~scribblejax.pipeline.normalization` and :mod:`~scribblejax.pipeline.resampling`), marks to the
model's grid and results back (:mod:`~scribblejax.pipeline.grid`), the network made ready and its
logits (:mod:`~scribblejax.pipeline.network`), sliding-window patches with their Gaussian blend
(:mod:`~scribblejax.pipeline.sliding_window`), and one round's refine-and-segment on the model's grid, as
``refine`` and the evaluation harness run it (:mod:`~scribblejax.pipeline.round`).
"""

from scribblejax.pipeline.grid import (
  check_marks_inside_crop,
  cover_marks,
  image_on_image_grid,
  inside,
  labels_from_logits,
  masks_on_image,
  to_image,
  to_model,
  to_model_counted,
)
from scribblejax.pipeline.network import (
  DEFAULT_LAYERS,
  Loop,
  Network,
  loop_split,
  network_logits,
  network_passes,
  prepare,
  refined_logits,
  resolve_layers,
  same_tree,
  split_network,
)
from scribblejax.pipeline.normalization import normalize
from scribblejax.pipeline.preprocess import (
  Crop,
  Fitted,
  Resampling,
  adapt_channels,
  fit_image,
  fit_network,
  fit_to_patch,
  network_input,
  nonzero_box,
  pad_to_fit,
  pipeline_spacing,
  resample_to_model,
)
from scribblejax.pipeline.resampling import ResampleScheme, resample_label_map, resampled_shape
from scribblejax.pipeline.sliding_window import (
  MarkedPatches,
  PatchBlend,
  marked_patches,
  marked_windows,
  patch_chunk,
  sliding_window_logits,
  sliding_window_logits_of,
)
from scribblejax.pipeline.spec import (
  InferenceOptions,
  InputSpec,
  crops_to_nonzero,
  input_axis_order,
  mirroring_axes,
  nnunet_axis_order,
  pipeline_of,
  spec_from_info,
  spec_of,
)

__all__ = [
  "Crop",
  "DEFAULT_LAYERS",
  "Fitted",
  "InferenceOptions",
  "InputSpec",
  "Loop",
  "MarkedPatches",
  "Network",
  "PatchBlend",
  "ResampleScheme",
  "Resampling",
  "adapt_channels",
  "check_marks_inside_crop",
  "cover_marks",
  "crops_to_nonzero",
  "fit_image",
  "fit_network",
  "fit_to_patch",
  "input_axis_order",
  "inside",
  "labels_from_logits",
  "masks_on_image",
  "image_on_image_grid",
  "loop_split",
  "marked_patches",
  "marked_windows",
  "mirroring_axes",
  "network_input",
  "network_logits",
  "network_passes",
  "nnunet_axis_order",
  "nonzero_box",
  "normalize",
  "pad_to_fit",
  "patch_chunk",
  "pipeline_of",
  "pipeline_spacing",
  "prepare",
  "refined_logits",
  "resample_label_map",
  "resample_to_model",
  "resampled_shape",
  "resolve_layers",
  "same_tree",
  "sliding_window_logits",
  "sliding_window_logits_of",
  "spec_from_info",
  "spec_of",
  "split_network",
  "to_image",
  "to_model",
  "to_model_counted",
]
