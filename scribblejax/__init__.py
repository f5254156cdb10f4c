"""scribblejax: turn any pre-trained segmentation network into an interactive one.

Scribble-conditioned test-time refinement (Sambaturu et al., MICCAI 2021, Algorithm 1) in JAX/Flax:
the user marks pixels with their true class; the last layers of one image's copy of the network are
fine-tuned until every marked pixel is predicted as its label, and a round changes the segmentation
where its marks asked for it (:mod:`scribblejax.merge`).

Example:
  >>> import scribblejax as sj
  >>> model, info = sj.load_model("nuclei2d")           # or any Flax NNX segmentation model
  >>> split = sj.split_params(model, sj.last_layers(5))
  >>> marks = sj.encode_marks(image.shape, [sj.Scribble([(10, 10), (10, 40)], label=1, radius=1)])
  >>> result = sj.refine(split, image, marks, sj.RefineConfig(max_steps=100))
  >>> result.labels, int(result.num_steps), bool(result.satisfied)
"""

from scribblejax.kernels import KernelStatus, kernel_status, resolve_conv_backend
from scribblejax.marks import (UNMARKED, Box, LabelMap, Mark, Point, Polygon, Scribble, accumulate,
                               encode_marks, grow_marks, validate_mark_map)
from scribblejax.models.ensemble import Ensemble
from scribblejax.models.layer_order import check_layer_order, layer_order, traced_layer_order
from scribblejax.models.regions import Regions, region_labels, region_scores
from scribblejax.models.store import ModelInfo, builtin_models, load_model, read_info, save_model
from scribblejax.models.unet import UNet
from scribblejax.normalize import normalize
from scribblejax.params import (Split, biases, by_predicate, by_regex, check_tunable, count_params, head,
                                last_layers, merge_params, norm_affine, split_params, tunable_paths)
from scribblejax.merge import progressive_merge
from scribblejax.refine import (MarksReport, RefineConfig, RefineResult, RefineState, Trunk, compute_trunk,
                                describe_marks, forward, marked_cross_entropy, marks_report, marks_satisfied,
                                memory_analysis, predict, proximal_norm, refine, refine_batch, resolve_batch_scheme,
                                resolve_driver)
from scribblejax.resample import ResampleScheme, resample_label_map, resampled_shape
from scribblejax.sharding import batch_mesh, refine_sharded
from scribblejax.sliding_window import (MarkedPatches, PatchBlend, marked_patches, marked_windows, patch_chunk,
                                        sliding_window_logits, sliding_window_logits_of)
from scribblejax.session import (Round, Session, add_marks, current_labels, current_logits, current_marks,
                                 start_session, undo)

__version__ = "0.1.0"

__all__ = [
    "Box",
    "Ensemble",
    "KernelStatus",
    "LabelMap",
    "MarksReport",
    "Mark",
    "ModelInfo",
    "MarkedPatches",
    "PatchBlend",
    "Point",
    "Polygon",
    "RefineConfig",
    "RefineResult",
    "RefineState",
    "Regions",
    "ResampleScheme",
    "Round",
    "Scribble",
    "Session",
    "Split",
    "Trunk",
    "UNMARKED",
    "UNet",
    "accumulate",
    "add_marks",
    "biases",
    "builtin_models",
    "by_predicate",
    "by_regex",
    "check_layer_order",
    "compute_trunk",
    "check_tunable",
    "count_params",
    "current_labels",
    "current_logits",
    "current_marks",
    "describe_marks",
    "encode_marks",
    "forward",
    "memory_analysis",
    "grow_marks",
    "head",
    "kernel_status",
    "last_layers",
    "layer_order",
    "load_model",
    "marked_cross_entropy",
    "marked_patches",
    "marked_windows",
    "marks_satisfied",
    "marks_report",
    "merge_params",
    "progressive_merge",
    "norm_affine",
    "patch_chunk",
    "normalize",
    "predict",
    "proximal_norm",
    "read_info",
    "refine",
    "refine_batch",
    "resolve_batch_scheme",
    "resolve_conv_backend",
    "resolve_driver",
    "save_model",
    "batch_mesh",
    "refine_sharded",
    "region_labels",
    "region_scores",
    "resample_label_map",
    "resampled_shape",
    "sliding_window_logits",
    "sliding_window_logits_of",
    "split_params",
    "start_session",
    "traced_layer_order",
    "tunable_paths",
    "undo",
    "validate_mark_map",
]
