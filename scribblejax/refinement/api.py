"""The refinement's entry points: refine one image or a batch, predict, analyse memory, report on marks.

Each validates its inputs (:mod:`scribblejax.refinement.inputs`) before anything is compiled, then
hands them to a driver (:mod:`scribblejax.refinement.drivers`), which runs Algorithm 1
(:mod:`scribblejax.refinement.algorithm`) under the backend's choices
(:mod:`scribblejax.refinement.backend`).

Example:
  >>> split = split_params(model, last_layers(5))
  >>> result = refine(split, image, marks, RefineConfig(max_steps=100))
  >>> result.labels, result.num_steps, result.satisfied
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from scribblejax import kernels
from scribblejax import params as params_lib
from scribblejax.config import RefineConfig
from scribblejax.params import Split
from scribblejax.refinement import drivers, inputs, network
from scribblejax.refinement.algorithm import RefineResult
from scribblejax.refinement.backend import resolve_batch_scheme
from scribblejax.refinement.inputs import Trunk, trunk_mismatch


def refine(
  split: Split,
  image: Any,
  marks: Any,
  config: RefineConfig = RefineConfig(),
  *,
  start: Any = None,
  progress: Any = None,
  trunk: Trunk | None = None,
) -> RefineResult:
  """Refines the split's tunable parameters until the prediction honours every mark.

  Args:
    split: from :func:`scribblejax.split_params`; never modified.
    image: ``[*spatial, channels]`` or ``[*spatial]``; any real dtype; never modified.
    marks: int ``[*spatial]``, -1 = unmarked, k = class k (see :mod:`scribblejax.marks`).
    config: a :class:`~scribblejax.RefineConfig`.
    start: tunable parameters to start from instead of W (to continue an earlier round). The
      proximal term still pulls towards W, the split's own tunable parameters.
    progress: ``progress(steps_taken, max_steps)``, called from Python as the refinement runs: with
      the host driver before the first chunk and after each chunk of ``check_every`` steps; with
      the loop driver (one compiled loop) once, at the end. For progress bars; it cannot change
      the result.
    trunk: from :func:`~scribblejax.refinement.compute_trunk` for this split and image: the trunk is
      not computed again, nor the keep term's targets where it holds them and was computed with this very
      split's tunable weights (the same object, ``trunk.anchor is split.tunable``; weights changed in
      place are not noticed); the result is the same.

  Returns:
    A :class:`~scribblejax.refinement.RefineResult`.

  Raises:
    ValueError: bad input (see :func:`~scribblejax.refinement.inputs.prepare_inputs`) or a trunk that
      does not belong to this split, image and config, before anything is compiled.
  """
  arr, mk = inputs.validate(split, image, marks)
  if start is not None:
    start = params_lib.check_tunable(split, start, "start")
  residuals = targets = None
  if trunk is not None:
    problem = trunk_mismatch(trunk, split, config, arr)
    if problem:
      raise ValueError(problem)
    residuals = trunk.residuals
    targets = trunk.keep_targets if trunk.anchor is split.tunable else None  # W's own labels, computed once
  return drivers.drive(
    split,
    jnp.asarray(arr),
    jnp.asarray(mk),
    config,
    drivers.SINGLE,
    start,
    progress=progress,
    residuals=residuals,
    targets=targets,
  )


def refine_batch(
  split: Split, images: Any, marks: Any, config: RefineConfig = RefineConfig(), *, start: Any = None
) -> RefineResult:
  """Refines one copy of W per image: each has its own marks, weights, steps and flags.

  The result equals refining the images one by one (up to float rounding); ``config.batch_scheme``
  chooses how the batch runs (see :func:`~scribblejax.refinement.resolve_batch_scheme`).

  Args:
    split: from :func:`scribblejax.split_params`.
    images: ``[batch, *spatial, channels]`` or ``[batch, *spatial]``.
    marks: int ``[batch, *spatial]``.
    config: shared settings.
    start: per-image tunable parameters to start from (each leaf ``[batch, *shape]``, e.g. the
      ``tunable`` of an earlier batched result), instead of W for every image.

  Returns:
    A :class:`~scribblejax.refinement.RefineResult` whose every field has a leading batch axis.

  Raises:
    ValueError: bad input, as for :func:`refine`.
  """
  images, marks = inputs.prepare_inputs(split, images, marks, batched=True)
  if start is not None:
    start = params_lib.check_tunable(split, start, "start", batch=images.shape[0])
  if resolve_batch_scheme(config.batch_scheme) == "sequential":
    results = [
      drivers.drive(
        split,
        images[i],
        marks[i],
        config,
        drivers.SINGLE,
        None if start is None else jax.tree.map(lambda x, i=i: x[i], start),
      )
      for i in range(images.shape[0])
    ]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *results)
  return drivers.drive(split, images, marks, config, drivers.BATCH, start, batched_start=start is not None)


def predict(split: Split, image: Any, tunable: Any = None, *, trunk: Trunk | None = None) -> jax.Array:
  """Logits ``f32[*spatial, classes]`` of the network (W, or ``tunable`` when given) on one image.

  With ``trunk`` (:func:`~scribblejax.refinement.compute_trunk` of this split and image) only the tail
  runs, under the trunk's compute settings.

  Raises:
    ValueError: a bad image, or a trunk of another split or image.
  """
  arr = inputs.one_image(split, image)
  tunable = split.tunable if tunable is None else params_lib.check_tunable(split, tunable)
  if trunk is None:
    return drivers.predict_program(
      network.graph_key(split.graphdef), kernels.resolve_conv_backend("auto"), tunable, split.frozen, jnp.asarray(arr)
    )
  problem = trunk_mismatch(trunk, split, image=arr)
  if problem:
    raise ValueError(problem)
  return drivers.predict_program(
    trunk.graphdef,
    trunk.conv_backend,
    tunable,
    split.frozen,
    jnp.asarray(arr),
    trunk.residuals,
    compute_dtype=trunk.compute_dtype,
  )


def _memory_stats(lowered) -> dict:
  stats = lowered.compile().memory_analysis()
  out = {
    "argument_bytes": int(stats.argument_size_in_bytes),
    "output_bytes": int(stats.output_size_in_bytes),
    "alias_bytes": int(stats.alias_size_in_bytes),
    "temp_bytes": int(stats.temp_size_in_bytes),
  }
  out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  return out


def memory_analysis(split: Split, image: Any, marks: Any, config: RefineConfig = RefineConfig()) -> dict:
  """Device memory of the compiled programs that one :func:`refine` call runs, from XLA's own
  analysis of the compiled executables (compiles them; runs nothing).

  Args:
    split: from :func:`scribblejax.split_params`.
    image: as for :func:`refine` (only its shape and dtype matter).
    marks: as for :func:`refine`.
    config: the settings to analyse (``driver``, ``cache_trunk``, ``compute_dtype`` and ``remat``
      change the programs).

  Returns:
    ``{"driver": ..., "programs": {name: stats}, "peak_bytes": int}`` where each program's stats hold
    ``argument_bytes``, ``output_bytes``, ``alias_bytes`` (donated), ``temp_bytes`` (XLA's scratch:
    activations kept for the backward pass live here) and ``peak_bytes`` (their sum, less aliases);
    the top-level ``peak_bytes`` is the largest program's.

  Raises:
    ValueError: bad input, as for :func:`refine`.
  """
  image, marks = inputs.prepare_inputs(split, image, marks)
  driver, lowered = drivers.lowered_programs(split, image, marks, config)
  programs = {name: _memory_stats(program) for name, program in lowered.items()}
  return {"driver": driver, "programs": programs, "peak_bytes": max(p["peak_bytes"] for p in programs.values())}


class MarksReport(NamedTuple):
  """Whether a round honoured its marks, and if not, why (:func:`marks_report`).

  Attributes:
    satisfied: every marked pixel is predicted as its label.
    honoured: the fraction of marked pixels predicted as their label (1.0 with nothing marked).
    per_class: ``{class: fraction honoured}`` for every marked class.
    reason: ``None`` when satisfied, else why not: the step budget ran out, or the objective became
      non-finite (the last finite weights are kept).
  """

  satisfied: bool
  honoured: float
  per_class: dict
  reason: str | None


def marks_report(result: RefineResult, marks: Any, config: RefineConfig | None = None) -> MarksReport:
  """What a refinement did with its marks: honoured or not, per class, and why not.

  Args:
    result: from :func:`refine` (one image).
    marks: the marks it was given, ``int[*spatial]``, -1 unmarked.
    config: its config (for the step budget in the reason).

  Returns:
    A :class:`MarksReport`.
  """
  labels, marks = np.asarray(result.labels), np.asarray(marks)
  marked = marks >= 0
  per_class = {int(c): float(np.mean(labels[marks == c] == c)) for c in np.unique(marks[marked])}
  honoured = float(np.mean(labels[marked] == marks[marked])) if marked.any() else 1.0
  satisfied = honoured == 1.0
  reason = None
  if not satisfied:
    if bool(result.nonfinite):
      reason = "the objective became non-finite (the last finite weights are kept)"
    else:
      budget = f" ({config.max_steps})" if config is not None else ""
      reason = f"the step budget{budget} ran out after {int(result.num_steps)} steps"
  return MarksReport(satisfied, honoured, per_class, reason)


def describe_marks(report: MarksReport, class_names: Any = None) -> str:
  """One line for a person: "every mark honoured", or the fraction per class and the reason."""
  if report.satisfied:
    return "every mark honoured"
  name = lambda c: class_names[c] if class_names is not None and c < len(class_names) else f"class {c}"
  parts = ", ".join(f"{name(c)} {f:.1%}" for c, f in sorted(report.per_class.items()))
  return f"{report.honoured:.1%} of marked pixels honoured ({parts}): {report.reason}"
