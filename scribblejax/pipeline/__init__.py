"""The image pipeline between an image and the network, nnU-Net style, with no files and no CLI.

Intensity normalisation (:mod:`~scribblejax.pipeline.normalization`), resampling to the network's
spacing and back (:mod:`~scribblejax.pipeline.resampling`), and sliding-window patches with their
Gaussian blend (:mod:`~scribblejax.pipeline.sliding_window`).
"""

from scribblejax.pipeline.normalization import normalize
from scribblejax.pipeline.resampling import ResampleScheme, resample_label_map, resampled_shape
from scribblejax.pipeline.sliding_window import (MarkedPatches, PatchBlend, marked_patches, marked_windows,
                                                 patch_chunk, sliding_window_logits, sliding_window_logits_of)

__all__ = ["MarkedPatches", "PatchBlend", "ResampleScheme", "marked_patches", "marked_windows", "normalize",
           "patch_chunk", "resample_label_map", "resampled_shape", "sliding_window_logits",
           "sliding_window_logits_of"]
