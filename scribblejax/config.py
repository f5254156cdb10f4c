"""The refinement's settings: :class:`RefineConfig`, the one schema for every setting.

The command line's flags, a model folder's ``model.json`` defaults and the reports all derive from its
fields. Two presets: the library's defaults (``RefineConfig()``, chosen on the correction benchmark,
see ``docs/correction.md``) and Algorithm 1 of Sambaturu et al. exactly (:meth:`RefineConfig.paper`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import optax

from scribblejax import kernels
from scribblejax._checks import INT32_MAX, is_integer, is_number

DRIVERS = ("auto", "loop", "host")
BATCH_SCHEMES = ("auto", "vmap", "matmul", "shifted", "sequential")
COMPUTE_DTYPES = ("float32", "bfloat16")
# Algorithm 1 as the paper states it (RefineConfig.paper()): the settings the library used before the
# correction benchmark (benchmarks/correction) chose its defaults.
PAPER = {
  "max_steps": 100,
  "optimizer": "sgd",
  "learning_rate": 0.01,
  "momentum": 0.9,
  "prox_weight": 1.0,
  "keep_weight": 0.0,
  "class_balance": False,
  "progressive_merge": False,
}
PRESETS = ("default", "paper")
MERGE_PROBABILITIES = ("merge_confidence", "merge_near", "merge_far", "merge_protect")


@dataclasses.dataclass(frozen=True)
class BuiltinOptimizer:
  """A named optimiser of :data:`BUILTIN_OPTIMIZERS`.

  Attributes:
    make: ``make(learning_rate, momentum) -> optax.GradientTransformation``, called inside the compiled
      programs with the traced hyperparameters (each optimiser reads those it uses).
    elementwise: the update of each parameter depends on that parameter (and its gradient) alone, so the
      loop may carry W_lam as one flat vector and get the same steps
      (:func:`scribblejax.refinement.backend.flattens`).
    default_learning_rate: the step size a caller that names this optimiser but gives no learning rate
      gets (the command line, a model's stored settings); ``None``: the preset's own.
  """

  make: Callable[[Any, Any], optax.GradientTransformation]
  elementwise: bool
  default_learning_rate: float | None


# The one table of named optimisers: adding one here makes it valid in RefineConfig and on the command line.
BUILTIN_OPTIMIZERS = {
  "sgd": BuiltinOptimizer(
    lambda learning_rate, momentum: optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=momentum),
    elementwise=True,
    default_learning_rate=PAPER["learning_rate"],  # Adam's default step would barely move SGD
  ),
  "adam": BuiltinOptimizer(
    lambda learning_rate, momentum: optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate),
    elementwise=True,
    default_learning_rate=None,
  ),
}
OPTIMIZERS = tuple(BUILTIN_OPTIMIZERS)


def builtin_optimizer(optimizer: Any) -> BuiltinOptimizer | None:
  """The table's entry for ``RefineConfig.optimizer`` (``None`` is ``"sgd"``); ``None`` for a user's own
  ``GradientTransformation`` or an unknown name."""
  if optimizer is None:
    optimizer = "sgd"
  return BUILTIN_OPTIMIZERS.get(optimizer) if isinstance(optimizer, str) else None


def default_learning_rate(optimizer: str | None) -> float | None:
  """The learning rate of a named optimiser when the caller names it but gives no learning rate.

  Args:
    optimizer: a name of :data:`OPTIMIZERS`, or ``None`` when the caller names none (the preset then
      chooses the optimiser and its learning rate).

  Returns:
    The optimiser's :attr:`BuiltinOptimizer.default_learning_rate`; ``None`` (the preset's own) for no
    name, a name whose entry has none, or a name that is not in the table (which ``RefineConfig`` refuses).
  """
  entry = BUILTIN_OPTIMIZERS.get(optimizer) if isinstance(optimizer, str) else None
  return None if entry is None else entry.default_learning_rate


@dataclasses.dataclass(frozen=True)
class RefineConfig:
  """Settings of one refinement (immutable, hashable).

  Changing ``max_steps``, ``learning_rate``, ``momentum``, ``prox_weight`` or ``keep_weight`` never recompiles: they
  enter the compiled function as traced scalars. The other fields are static.

  Attributes:
    max_steps: M, the most optimiser steps (the paper found 80 to 140 enough).
    learning_rate: the step size of the named optimiser (ignored for a ``GradientTransformation``).
    momentum: SGD's momentum (used by ``optimizer="sgd"`` only).
    prox_weight: alpha, the weight of ``||W_lam - W||_2`` (a plain, not squared, L2 norm). Its pull is
      the same however close W_lam is to W, so with SGD it keeps small remaining errors from being
      fixed; the defaults leave it at 0 and anchor the prediction with ``keep_weight`` instead.
    keep_weight: weight of a term that is not in the paper's Algorithm 1 (0 is the paper's
      objective): the mean cross-entropy of the unmarked pixels against the network's own initial
      labels (argmax under W), an inertia like BRS's, so that honouring the marks does not relabel
      the rest of the image. ``docs/correction.md`` says what it changed.
    class_balance: weight the cross-entropy so every marked class counts equally.
    optimizer: ``"sgd"`` (SGD with ``momentum``, the paper's), ``"adam"`` (Adam, Kingma & Ba 2015),
      both at ``learning_rate`` (the names of :data:`BUILTIN_OPTIMIZERS`); or any optax
      ``GradientTransformation``. ``None`` means ``"sgd"``.
    driver: "auto", "loop" (one compiled while_loop) or "host" (jitted chunks driven from Python).
    check_every: steps per jitted chunk between stop checks, for the host driver. The chunk's steps
      are unrolled into one program, so its compile time grows with ``check_every`` (keep it small).
    trace_length: length of the fixed-size loss trace in the result.
    output: "logits" or "probabilities" in the result.
    early_stop: stop as soon as every marked pixel is predicted as its label (Algorithm 1);
      ``False`` always takes ``max_steps`` steps (a non-finite objective still stops), for benchmarks.
    cache_trunk: compute the frozen trunk once per interaction and run only the tunable tail in
      the loop (:mod:`scribblejax.refinement.trunk`); ``False`` runs the whole forward pass at every step.
    batch_scheme: how :func:`refine_batch` runs a batch: "vmap" (one program over the batch; each
      tunable convolution becomes a grouped convolution), "matmul" (the same, with the tail's
      convolutions as patches and batched matrix products; needs ``cache_trunk``), "shifted" (the
      same, one batched matrix product per kernel tap over a shifted window, without patches), "sequential"
      (one image after another) or "auto" (see :func:`resolve_batch_scheme`).
    compute_dtype: "float32" or "bfloat16": the dtype the network computes in. Parameters, their
      gradients, the optimiser state and the loss stay float32 (the weights and the image are cast
      on the way in, the logits cast back). Meant for the bf16 tensor cores of recent GPUs; its
      effect on results and speed is in ``docs/performance.md``.
    remat: rematerialise activations in the backward pass instead of storing them: each layer of
      the tunable tail (from one convolution to the next) is one ``jax.checkpoint``, so only the values
      between layers are kept (with ``cache_trunk=False``, one checkpoint around the whole forward
      pass). Meant for large 3D volumes and batches where stored activations dominate the memory,
      for about one more forward of the tail per step. :func:`memory_analysis` reports what it
      saves on a given device (``docs/performance.md`` has measurements).
    progressive_merge: how a *round* (a session's, the command line's, the harness's) turns the
      refined labels into its segmentation: ``True`` keeps the previous segmentation except in the
      connected regions of change that touch the round's new marks (``merge_near``) and where the
      refined network is very sure (``merge_far``), and sets every marked pixel to its mark
      (:mod:`scribblejax.refinement.merge`); ``False`` takes the refined network's labels as they are
      (the paper). :func:`refine` itself, which knows no previous segmentation, ignores it.
    merge_confidence: with ``progressive_merge``, the pixels where the network (W) gave its top
      class less than this probability follow the refined network wherever they lie (0: none, the
      default).
    merge_near: with ``progressive_merge``, in a region of change that touches a new mark, a pixel
      takes the refined label only where the refined network gives it at least this probability (0:
      the whole region). A refinement that honours a click or a scribble often grows a fringe of weak
      labels around it; this keeps the part it is sure of.
    merge_far: with ``progressive_merge``, away from the new marks, a pixel takes the refined label
      where the refined network gives it at least this probability (1: never). A change the refined
      network is that sure of is a correction it learnt from the marks and applies elsewhere (the
      network's error was systematic); a change it is unsure of is drift. ``merge_protect`` keeps such
      a change off the pixels the network was sure of.
    merge_contrast: with ``progressive_merge``, after the thresholds above, each connected region where the round's
      segmentation and the refined network's own labels still differ takes the refined labels when its mean intensity
      (in the image as the network reads it: a session's image, or the command line's after the model's normalisation)
      is nearer its neighbours of the refined class than its neighbours of the class it has: the score of
      :func:`scribblejax.refinement.merge.contrast_scores`, in ``[-1, 1]``, above this (1: never). The thresholds
      cannot tell a right change away from the marks from drift; the image often can, where intensity tells the
      classes apart. Not on the pixels ``merge_protect`` keeps, nor the marked ones; not for a region-based network.
    merge_protect: with ``progressive_merge``, a pixel the network (W) gave its label at least this
      probability keeps its label unless it is marked, or the change is into or out of a class appended
      to its head (``start_session(new_classes=...)``, ``--new-class``), which W never learnt (1: none is
      protected).
    conv_backend: who computes the convolutions of the trunk and the tail: "xla", "onednn" (oneDNN
      through :mod:`scribblejax.kernels`, CPU only, float32 only; an error if the kernels cannot
      run here) or "auto" (oneDNN on the CPU whenever available, else XLA). What each costs:
      ``docs/performance.md``.
  """

  max_steps: int = 100
  learning_rate: float = 5e-3
  momentum: float = 0.9
  prox_weight: float = 0.0
  keep_weight: float = 1.0
  class_balance: bool = False
  optimizer: str | optax.GradientTransformation | None = "adam"
  driver: str = "auto"
  check_every: int = 1
  trace_length: int = 256
  output: str = "logits"
  early_stop: bool = True
  cache_trunk: bool = True
  batch_scheme: str = "auto"
  compute_dtype: str = "float32"
  remat: bool = False
  conv_backend: str = "auto"
  progressive_merge: bool = True
  merge_confidence: float = 0.0
  merge_near: float = 0.9
  merge_far: float = 0.995
  merge_protect: float = 0.999
  merge_contrast: float = 0.1

  @classmethod
  def paper(cls, **overrides: Any) -> RefineConfig:
    """Algorithm 1 of Sambaturu et al. exactly: SGD (learning rate 0.01, momentum 0.9) on the marked
    pixels' cross-entropy plus ``1.0 * ||W_lam - W||_2``, at most 100 steps, no keep term.

    These were the library's defaults before the correction benchmark chose today's; ``overrides``
    replace any field (e.g. ``RefineConfig.paper(max_steps=140)``).
    """
    return cls(**{**PAPER, **overrides})

  def __post_init__(self):
    if not is_integer(self.max_steps) or not 0 <= self.max_steps <= INT32_MAX:
      raise ValueError(f"max_steps must be a non-negative integer (at most {INT32_MAX}), got {self.max_steps!r}")
    for name in ("learning_rate", "momentum", "prox_weight", "keep_weight", *MERGE_PROBABILITIES):
      value = getattr(self, name)
      if not is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
      if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    for name in MERGE_PROBABILITIES:
      if getattr(self, name) > 1:
        raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)!r}")
    if not is_number(self.merge_contrast) or not -1 <= self.merge_contrast <= 1:
      raise ValueError(
        f"merge_contrast is a score in [-1, 1] (1: the merge takes no region by it), got {self.merge_contrast!r}"
      )
    if self.momentum >= 1:
      raise ValueError(f"momentum must be in [0, 1) (SGD with momentum >= 1 diverges), got {self.momentum!r}")
    for name in ("class_balance", "early_stop", "cache_trunk", "remat", "progressive_merge"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
    if isinstance(self.optimizer, str):
      if self.optimizer not in BUILTIN_OPTIMIZERS:
        raise ValueError(
          f"optimizer must be one of {tuple(BUILTIN_OPTIMIZERS)} or an optax GradientTransformation, "
          f"got {self.optimizer!r}"
        )
    elif self.optimizer is not None and not (
      callable(getattr(self.optimizer, "init", None)) and callable(getattr(self.optimizer, "update", None))
    ):
      raise ValueError(
        f"optimizer must be one of {tuple(BUILTIN_OPTIMIZERS)} or an optax GradientTransformation, "
        f"got {self.optimizer!r}"
      )
    for name in ("check_every", "trace_length"):
      value = getattr(self, name)
      if not is_integer(value) or not 1 <= value <= INT32_MAX:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if self.driver not in DRIVERS:
      raise ValueError(f"driver must be one of {DRIVERS}, got {self.driver!r}")
    if self.batch_scheme not in BATCH_SCHEMES:
      raise ValueError(f"batch_scheme must be one of {BATCH_SCHEMES}, got {self.batch_scheme!r}")
    if self.conv_backend not in kernels.CONV_BACKENDS:
      raise ValueError(f"conv_backend must be one of {kernels.CONV_BACKENDS}, got {self.conv_backend!r}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
    if self.conv_backend == "onednn" and self.compute_dtype != "float32":
      raise ValueError(
        f"conv_backend='onednn' computes float32 only, so it cannot run compute_dtype="
        f"{self.compute_dtype!r}; use conv_backend='auto' (XLA's convolutions then) or 'xla'"
      )
    if self.output not in ("logits", "probabilities"):
      raise ValueError(f"output must be 'logits' or 'probabilities', got {self.output!r}")
