"""Refinement: Algorithm 1 of Sambaturu et al. (MICCAI 2021) and the programs that run it.

:func:`refine` tunes one image's copy of the network until every marked pixel is predicted as its
label; :func:`refine_batch` runs several images at once (vmap) and :func:`refine_sharded` over a
device mesh. :func:`compute_trunk` caches the frozen part of the forward pass for every interaction
on one image; :func:`progressive_merge` turns a round's proposal into the segmentation it changes.
"""

from scribblejax.refinement.engine import (MarksReport, RefineResult, RefineState, Trunk, compute_trunk,
                                           describe_marks, forward, marked_cross_entropy, marks_report,
                                           marks_satisfied, memory_analysis, predict, proximal_norm, refine,
                                           refine_batch, resolve_batch_scheme, resolve_driver)
from scribblejax.refinement.merge import progressive_merge
from scribblejax.refinement.sharding import batch_mesh, refine_sharded

__all__ = ["MarksReport", "RefineResult", "RefineState", "Trunk", "batch_mesh", "compute_trunk", "describe_marks",
           "forward", "marked_cross_entropy", "marks_report", "marks_satisfied", "memory_analysis", "predict",
           "progressive_merge", "proximal_norm", "refine", "refine_batch", "refine_sharded",
           "resolve_batch_scheme", "resolve_driver"]
