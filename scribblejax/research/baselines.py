"""Interactive methods compared in one harness, and model surgery for the experiments.

A method is a :class:`Method`: a NamedTuple of pure functions over an explicit state, so the harness
(:mod:`scribblejax.research.evaluate`) can feed every method the same kind of marks and time each call:

* :func:`initial_method`: the network's prediction, never changed (the floor);
* :func:`random_walker_method`: scikit-image's random walker seeded by all marks so far (no network);
* :func:`refine_method`: refinement (Algorithm 1) of a chosen tunable set: ``head()`` (the
  classifier only), ``last_layers(l)`` or any selector, with the library's defaults or
  ``RefineConfig.paper()``;
* :func:`fbrs_method`: f-BRS-style tuning (Sofiiuk et al., CVPR 2020) of per-channel scales and
  biases of the intermediate features (the normalisation affines and biases of the last layers);
* :func:`graph_cut_method` (in :mod:`scribblejax.research.graphcut`): a graph cut whose unaries are the
  network's probabilities, with the marks as hard constraints (MONAI Label's scribbles app).

Model surgery for the experiments (a class the network never learnt, a class it missed) lives in
:mod:`scribblejax.models.surgery`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scribblejax import marks as marks_lib
from scribblejax.config import RefineConfig
from scribblejax.params import head, last_layers, norm_affine, split_params
from scribblejax.refinement import compute_trunk, predict, refine
from scribblejax.refinement.merge import merge_round, new_marks_of


class Method(NamedTuple):
  """An interactive segmentation method as pure functions over an explicit state.

  Attributes:
    name: a short name for tables.
    init: ``image -> state``: the state before any interaction.
    labels: ``state -> int32[*spatial]``: the current segmentation.
    update: ``(state, marks) -> state``: one interaction; ``marks`` holds every mark so far
      (``int32[*spatial]``, -1 unmarked).
    warmup: ``image -> None``: compiles what ``init``/``update`` will run (timed apart); may do nothing.
    info: ``state -> dict``: per-interaction details (steps, satisfied), JSON-serialisable.
  """

  name: str
  init: Callable[[np.ndarray], Any]
  labels: Callable[[Any], np.ndarray]
  update: Callable[[Any, np.ndarray], Any]
  warmup: Callable[[np.ndarray], None]
  info: Callable[[Any], dict]


def _no_warmup(image: np.ndarray) -> None:
  del image


# ---------------------------------------------------------------------------------------------
# The initial prediction
# ---------------------------------------------------------------------------------------------


def initial_method(model: nnx.Module, *, example: Any = None) -> Method:
  """The network's own prediction, unchanged by any mark.

  Args:
    model: the network.
    example: an example batched input, for a model that states no layer order (see
      :func:`scribblejax.split_params`).
  """
  split = split_params(model, head(), example=example)

  def init(image):
    return np.asarray(jnp.argmax(predict(split, image), -1), np.int32)

  return Method(
    "initial",
    init,
    lambda s: s,
    lambda s, marks: s,
    lambda image: jax.block_until_ready(predict(split, image)),
    lambda s: {},
  )


# ---------------------------------------------------------------------------------------------
# Random walker
# ---------------------------------------------------------------------------------------------


class WalkerState(NamedTuple):
  """State of the random-walker baseline."""

  image: np.ndarray  # float[*spatial, C]
  labels: np.ndarray  # int32[*spatial]: current segmentation
  seeded: bool  # whether the last update ran the random walker (>= 2 classes marked)


def random_walker_labels(image: np.ndarray, marks: np.ndarray, beta: float = 130.0) -> np.ndarray | None:
  """Random walker (Grady 2006, ``skimage.segmentation.random_walker``) seeded by ``marks``.

  Args:
    image: ``[*spatial, C]`` or ``[*spatial]`` (2D or 3D).
    marks: ``int[*spatial]``, -1 unmarked, k = class k.
    beta: the walker's edge penalty (scikit-image's default).

  Returns:
    ``int32[*spatial]`` labels, or ``None`` when fewer than two classes are marked (the walker
    needs at least two seeds' classes to separate anything).
  """
  from skimage.segmentation import random_walker

  marks = np.asarray(marks)
  present = np.unique(marks[marks >= 0])
  if len(present) < 2:
    return None
  image = np.asarray(image, np.float64)
  if image.ndim == marks.ndim + 1:
    channel_axis = -1 if image.shape[-1] > 1 else None
    if channel_axis is None:
      image = image[..., 0]
  else:
    channel_axis = None
  # Seeds: classes 0..K-1 become 1..K (0 means unlabelled for scikit-image). Map to consecutive ids
  # so unmarked classes do not leave empty labels.
  seeds = np.zeros(marks.shape, np.int32)
  for i, c in enumerate(present, start=1):
    seeds[marks == c] = i
  # a direct solve is exact and, up to a few hundred thousand pixels, faster than scikit-image's default
  # conjugate gradients
  mode = "bf" if marks.size <= 300_000 else "cg_j"
  out = random_walker(image, seeds, beta=beta, mode=mode, tol=1e-3, channel_axis=channel_axis)
  return present[np.asarray(out) - 1].astype(np.int32)


def random_walker_method(
  model: nnx.Module | None,
  beta: float = 130.0,
  *,
  initial: Callable[[np.ndarray], np.ndarray] | None = None,
  example: Any = None,
) -> Method:
  """Random walker seeded by the marks so far.

  Before any interaction, and while fewer than two classes are marked, the segmentation is the
  network's prediction (or all background without a model) with the marked pixels set to their
  class: the walker alone cannot place a boundary from one class's seeds.

  Args:
    model: the network whose prediction the walker starts from, or ``None``.
    beta: the walker's edge penalty.
    initial: ``image -> int32[*spatial]``, the segmentation to start from instead of the model's
      prediction on the image (e.g. the model's pipeline of patches and resampling).
    example: an example batched input, for a model that states no layer order.
  """
  split = split_params(model, head(), example=example) if model is not None and initial is None else None

  def init(image):
    image = np.asarray(image)
    if initial is not None:
      labels = np.asarray(initial(image), np.int32)
    elif split is None:
      labels = np.zeros(image.shape[:-1], np.int32)
    else:
      labels = np.asarray(jnp.argmax(predict(split, image), -1), np.int32)
    return WalkerState(image, labels, False)

  def update(state, marks):
    walked = random_walker_labels(state.image, marks, beta)
    if walked is None:
      marks = np.asarray(marks)
      return state._replace(labels=np.where(marks >= 0, marks, state.labels).astype(np.int32), seeded=False)
    return state._replace(labels=walked, seeded=True)

  def warmup(image):
    if split is not None:
      jax.block_until_ready(predict(split, image))

  return Method("random_walker", init, lambda s: s.labels, update, warmup, lambda s: {"walker_ran": bool(s.seeded)})


# ---------------------------------------------------------------------------------------------
# Refinement (the paper's method), of the head only or of the last l layers
# ---------------------------------------------------------------------------------------------


class RefineMethodState(NamedTuple):
  """State of a refinement method."""

  image: np.ndarray  # float32[*spatial, C]
  labels: np.ndarray  # int32[*spatial]
  num_steps: int  # steps of the last refinement (0 before any)
  satisfied: bool  # every mark honoured after the last refinement
  tunable: Any  # W_lam of the last refinement (None before any)
  trunk: Any = None  # the frozen trunk's values for the image (computed once, with cache_trunk)
  marks: Any = None  # int32[*spatial]: the marks of the last refinement (None before any)
  initial: Any = None  # float32[*spatial, classes]: the network's logits, for the merge (None: region-based)
  proposed: Any = None  # int32[*spatial]: the last refined network's own labels (None before any round)
  sureness: Any = None  # float32[*spatial]: the last refined network's top class probability (None: none yet, regions)


@dataclasses.dataclass(frozen=True)
class scale_and_bias:  # noqa: N801 (reads as a function at the call site, like the params selectors)
  """The per-channel scales and biases in the last ``layers`` layers: normalisation affines and biases."""

  layers: int

  def predicate(self, model: nnx.Module, example: Any):
    within = last_layers(self.layers).predicate(model, example)
    norms = norm_affine().predicate(model, example)
    return lambda path: within(path) and (norms(path) or path[-1] == "bias")


def refine_method(
  model: nnx.Module,
  layers: Any = 5,
  config: RefineConfig = RefineConfig(),
  *,
  continue_weights: bool = False,
  name: str | None = None,
  example: Any = None,
  new_classes: tuple[int, ...] = (),
) -> Method:
  """Refinement; every interaction refines on all marks so far.

  Args:
    model: a Flax NNX segmentation model (not modified).
    layers: number of tunable last layers, ``"head"`` for the classifier only, or a selector (an
      object with ``predicate(model, example)``, as in :mod:`scribblejax.params`).
    config: the :class:`scribblejax.RefineConfig`.
    continue_weights: start each interaction from the previous W_lam (default: from W, the paper's reset).
    name: the method's name (default ``"refine_l{layers}"`` or ``"head"``).
    example: an example batched input, for a model that states no layer order (its last layers are
      then traced from the forward pass).
    new_classes: classes appended to the model's head that it never learnt (the round's merge does not
      protect against them, as :func:`scribblejax.start_session`'s).
  """
  if hasattr(layers, "predicate"):
    select = layers
  else:
    select = head() if layers == "head" else last_layers(int(layers))
  split = split_params(model, select, example=example)
  if name is None:
    name = "head" if layers == "head" else f"refine_l{layers}"

  def trunk_of(image):  # computed once per image, as an interactive session does
    return compute_trunk(split, image, config) if config.cache_trunk else None

  def init(image):
    image = np.asarray(image, np.float32)
    trunk = trunk_of(image)
    logits = predict(split, image, trunk=trunk)
    labels = np.asarray(jnp.argmax(logits, -1), np.int32)
    initial = None if _is_regions(model) else logits
    return RefineMethodState(image, labels, 0, True, None, trunk, None, initial)

  def update(state, marks):
    start = state.tunable if continue_weights else None
    result = refine(split, state.image, marks, config, start=start, trunk=state.trunk)
    labels = np.asarray(result.labels)
    if config.progressive_merge:
      scores = (None, None) if state.initial is None else (result.logits, state.initial)
      new = new_marks_of(marks, state.marks)
      labels = merge_round(state.labels, labels, new, marks, config, *scores, new_classes, image=state.image).labels
    sureness = None if state.initial is None else np.asarray(jax.nn.softmax(result.logits, axis=-1).max(axis=-1))
    return state._replace(
      labels=labels,
      proposed=np.asarray(result.labels),
      sureness=sureness,
      num_steps=int(result.num_steps),
      satisfied=bool(result.satisfied),
      tunable=result.tunable,
      marks=np.array(marks, np.int32),
    )

  def warmup(image):
    image = np.asarray(image, np.float32)
    empty = np.full(image.shape[:-1], marks_lib.UNMARKED, np.int32)
    trunk = trunk_of(image)
    jax.block_until_ready(predict(split, image, trunk=trunk))
    jax.block_until_ready(refine(split, image, empty, config, trunk=trunk).labels)

  return Method(
    name, init, lambda s: s.labels, update, warmup, lambda s: {"steps": s.num_steps, "satisfied": s.satisfied}
  )


def _is_regions(model: nnx.Module) -> bool:
  """A region-based network: its scores are sigmoids, no distribution over classes to be unsure in."""
  from scribblejax.models.regions import Regions

  return isinstance(model, Regions)


def fbrs_method(
  model: nnx.Module,
  layers: int = 5,
  config: RefineConfig | None = None,
  *,
  example: Any = None,
  new_classes: tuple[int, ...] = (),
) -> Method:
  """f-BRS-style correction: only the per-channel scales and biases of the last ``layers`` layers move.

  f-BRS (Sofiiuk et al., CVPR 2020) optimises a scale and a bias of intermediate features with
  L-BFGS and an inertia term. Here the same parameters (the normalisation affines and the biases)
  are tuned by Adam with the keep term as the inertia, in the library's loop.
  """
  config = (
    RefineConfig(optimizer="adam", learning_rate=1e-2, prox_weight=0.0, keep_weight=1.0) if config is None else config
  )
  return refine_method(
    model, scale_and_bias(layers), config, name="fbrs_scale_bias", example=example, new_classes=new_classes
  )


METHODS = ("refine", "paper", "head", "fbrs", "random_walker", "initial")


def make_method(
  kind: str,
  model: nnx.Module,
  *,
  layers: int = 5,
  config: RefineConfig = RefineConfig(),
  example: Any = None,
  new_classes: tuple[int, ...] = (),
) -> Method:
  """A method by name: "refine" (last ``layers`` layers, ``config``), "paper" (the same, named so; give
  it ``RefineConfig.paper()``, with any changes), "head", "fbrs" (its own settings), "random_walker"
  or "initial" (``example``: an example batched input, for a model that states no layer order;
  ``new_classes``: classes appended to its head, see :func:`refine_method`)."""
  if kind == "refine":
    return refine_method(model, layers, config, example=example, new_classes=new_classes)
  if kind == "paper":  # config: RefineConfig.paper() with the caller's changes, as evaluate resolves it
    return refine_method(model, layers, config, name="paper", example=example, new_classes=new_classes)
  if kind == "fbrs":
    return fbrs_method(model, layers, example=example, new_classes=new_classes)
  if kind == "head":
    return refine_method(model, "head", config, example=example, new_classes=new_classes)
  if kind == "random_walker":
    return random_walker_method(model, example=example)
  if kind == "initial":
    return initial_method(model, example=example)
  raise ValueError(f"method must be one of {METHODS}, got {kind!r}")
