"""scribblejax: turn any pre-trained segmentation network into an interactive one.

Scribble-conditioned test-time refinement (Sambaturu et al., MICCAI 2021, Algorithm 1) in JAX/Flax:
the user marks pixels with their true class; the last layers of one image's copy of the network are
fine-tuned until every marked pixel is predicted as its label, and a round changes the segmentation
where its marks asked for it (:func:`progressive_merge`).

Example:
  >>> import scribblejax as sj
  >>> model, info = sj.load_model("nuclei2d")           # or any Flax NNX segmentation model
  >>> split = sj.split_params(model, sj.last_layers(5))
  >>> marks = sj.encode_marks(image.shape, [sj.Scribble([(10, 10), (10, 40)], label=1, radius=1)])
  >>> result = sj.refine(split, image, marks, sj.RefineConfig(max_steps=100))
  >>> result.labels, int(result.num_steps), bool(result.satisfied)
"""

from scribblejax import config, io, kernels, marks, models, params, pipeline, refinement, session  # noqa: F401 (the namespaces: sj.marks, sj.models, sj.refinement, ...)
from scribblejax.config import RefineConfig
from scribblejax.marks import UNMARKED, Box, LabelMap, Point, Polygon, Scribble, encode_marks, grow_marks
from scribblejax.models import ModelInfo, UNet, load_model, save_model
from scribblejax.params import Split, head, last_layers, norm_affine, split_params
from scribblejax.pipeline import normalize
from scribblejax.refinement import (
  RefineResult,
  compute_trunk,
  marks_report,
  predict,
  progressive_merge,
  refine,
  refine_batch,
  refine_sharded,
)
from scribblejax.session import Session, add_marks, current_labels, start_session, undo

__version__ = "0.1.0"

# The curated API; everything else lives in its namespace: sj.marks, sj.params, sj.models,
# sj.refinement, sj.pipeline, sj.session, sj.io, sj.kernels, sj.config.
__all__ = [
  "Box",
  "LabelMap",
  "ModelInfo",
  "Point",
  "Polygon",
  "RefineConfig",
  "RefineResult",
  "Scribble",
  "Session",
  "Split",
  "UNMARKED",
  "UNet",
  "add_marks",
  "compute_trunk",
  "current_labels",
  "encode_marks",
  "grow_marks",
  "head",
  "last_layers",
  "load_model",
  "marks_report",
  "norm_affine",
  "normalize",
  "predict",
  "progressive_merge",
  "refine",
  "refine_batch",
  "refine_sharded",
  "save_model",
  "split_params",
  "start_session",
  "undo",
]
