"""Refinement: Algorithm 1 of Sambaturu et al. (MICCAI 2021) and the programs that run it.

:func:`refine` tunes one image's copy of the network until every marked pixel is predicted as its
label; :func:`refine_batch` runs several images at once (vmap) and :func:`refine_sharded` over a
device mesh. :func:`compute_trunk` caches the frozen part of the forward pass for every interaction
on one image; :func:`progressive_merge` turns a round's proposal into the segmentation it changes.

Modules: ``algorithm`` (Algorithm 1 itself), ``backend`` (every choice that depends on the device),
``drivers`` (the compiled programs and the loops that run them, over one image, a batch or a mesh),
``inputs`` (validation, the trunk), ``network`` (forward pass, trunk and tail), ``trunk`` (the jaxpr
unzip), ``api`` (the entry points), ``sharding`` (the device mesh), ``merge`` (progressive merge).
"""

from scribblejax.refinement.algorithm import (
  RefineResult,
  RefineState,
  marked_cross_entropy,
  marks_satisfied,
  proximal_norm,
)
from scribblejax.refinement.api import (
  MarksReport,
  describe_marks,
  marks_report,
  memory_analysis,
  predict,
  refine,
  refine_batch,
)
from scribblejax.refinement.backend import resolve_batch_scheme, resolve_driver
from scribblejax.refinement.inputs import Trunk, compute_trunk, num_classes_of, prepare_inputs, trunk_mismatch
from scribblejax.refinement.merge import progressive_merge
from scribblejax.refinement.network import forward
from scribblejax.refinement.sharding import batch_mesh, refine_sharded

__all__ = [
  "MarksReport",
  "RefineResult",
  "RefineState",
  "Trunk",
  "batch_mesh",
  "compute_trunk",
  "describe_marks",
  "forward",
  "marked_cross_entropy",
  "marks_report",
  "marks_satisfied",
  "memory_analysis",
  "num_classes_of",
  "predict",
  "prepare_inputs",
  "progressive_merge",
  "proximal_norm",
  "refine",
  "refine_batch",
  "refine_sharded",
  "resolve_batch_scheme",
  "resolve_driver",
  "trunk_mismatch",
]
