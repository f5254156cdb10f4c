"""Algorithm 1 of Sambaturu et al. (MICCAI 2021): scribble-conditioned refinement of one image's network.

Copy the weights W to W_lam; only the tunable part moves. Loop: forward; g = cross-entropy over the
marked pixels; stop when every marked pixel is predicted as its label (``satisfied``) or after
``max_steps`` steps; otherwise one optimiser step on ``g + prox_weight * ||W_lam - W||_2`` (plus, with
``keep_weight``, a cross-entropy that keeps unmarked pixels at the network's initial labels).

Two label maps enter, each an int32 ``[*spatial]``: ``marks``, the user's (-1 unmarked, k marked as
class k), and ``keep``, the keep term's targets (the network's initial labels, :func:`initial_labels`;
-1: no target). The keep term reads ``keep`` on the unmarked pixels only; nothing else reads it.

This module is the algorithm and nothing else: it sees the network only as ``logits_of(tunable)``,
a function of W_lam, and never asks which device it runs on. How the forward pass is evaluated (a
cached trunk, W_lam carried as one flat vector, a lazy backward pass) is decided in
:mod:`scribblejax.refinement.backend`; the loops that run :func:`step` live in
:mod:`scribblejax.refinement.drivers`.

Example (what a driver does, without the compiled loop)::

  state = init_state(W, settings, hyper)
  while not (state.done or state.step >= max_steps):
    state, logits = step(state, logits_of, W, marks, keep, settings, hyper)
  result = finalize(state, logits_of, marks, settings)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scribblejax.config import RefineConfig, builtin_optimizer


class Hyper(NamedTuple):
  """The traced settings: changing them never recompiles."""

  max_steps: jax.Array  # int32[]
  learning_rate: jax.Array  # f32[]
  momentum: jax.Array  # f32[]
  prox_weight: jax.Array  # f32[]
  keep_weight: jax.Array  # f32[]

  @classmethod
  def of(cls, config: RefineConfig) -> Hyper:
    """The traced settings of ``config``, as NumPy scalars: they travel with the compiled call's
    arguments (no dispatch of their own)."""
    return cls(
      np.asarray(config.max_steps, np.int32),
      np.asarray(config.learning_rate, np.float32),
      np.asarray(config.momentum, np.float32),
      np.asarray(config.prox_weight, np.float32),
      np.asarray(config.keep_weight, np.float32),
    )


@dataclasses.dataclass(frozen=True)
class Settings:
  """The algorithm's static settings: part of the compilation cache key."""

  optimizer: Any  # a name of config.BUILTIN_OPTIMIZERS (None: "sgd"), or an optax.GradientTransformation
  class_balance: bool  # every marked class contributes its own mean cross-entropy equally
  trace_length: int  # length of RefineState.loss_trace
  output: str  # "logits" or "probabilities"
  early_stop: bool = True  # stop once every marked pixel is predicted as its label

  @classmethod
  def of(cls, config: RefineConfig) -> Settings:
    """The algorithm's static settings of ``config``."""
    return cls(config.optimizer, config.class_balance, config.trace_length, config.output, bool(config.early_stop))


class RefineState(NamedTuple):
  """The carry of the refinement loop."""

  tunable: Any  # pytree like W's tunable part: the current W_lam
  previous: Any  # the W_lam before the last update (returned if `tunable` gives a non-finite loss)
  opt_state: Any  # optax state
  step: jax.Array  # int32[]: optimiser steps taken
  done: jax.Array  # bool[]: the stop rule fired (satisfied or non-finite)
  satisfied: jax.Array  # bool[]: every marked pixel predicted as its label at `tunable`
  nonfinite: jax.Array  # bool[]: the loss, a gradient or an update became non-finite
  loss_trace: jax.Array  # f32[trace_length]: objective at step i (NaN where not evaluated)


class RefineResult(NamedTuple):
  """What a refinement returns.

  Attributes:
    logits: f32[*spatial, classes], logits (or probabilities, per ``RefineConfig.output``) of W_lam.
    labels: int32[*spatial], argmax of the logits.
    tunable: the refined tunable parameters W_lam (same structure as ``split.tunable``).
    num_steps: int32[], optimiser steps taken.
    satisfied: bool[], every marked pixel is predicted as its label.
    nonfinite: bool[], the loop stopped because the objective became non-finite; ``tunable`` then
      holds the last finite weights.
    loss_trace: f32[trace_length], objective before step i; NaN after the loop ended.
  """

  logits: jax.Array
  labels: jax.Array
  tunable: Any
  num_steps: jax.Array
  satisfied: jax.Array
  nonfinite: jax.Array
  loss_trace: jax.Array


def _check_pairs(logits: jax.Array, marks: jax.Array, what: str) -> None:
  if tuple(logits.shape[:-1]) != tuple(marks.shape):
    raise ValueError(
      f"{what}: logits of shape {tuple(logits.shape)} are not [*marks.shape, classes] for marks of "
      f"shape {tuple(marks.shape)}"
    )


def marked_cross_entropy(logits: jax.Array, marks: jax.Array, class_balance: bool = False) -> jax.Array:
  """Mean cross-entropy over marked pixels (``marks >= 0``); 0 when nothing is marked.

  With ``class_balance`` every marked class contributes its own mean equally. Labels must be below
  ``logits.shape[-1]``: concrete marks with a larger label are refused; under ``jit`` (where the
  values are unknown) the loss is NaN instead, never a silently wrong number.

  Raises:
    ValueError: ``logits`` is not ``[*marks.shape, classes]``, or concrete marks hold a label of no class.
  """
  _check_pairs(logits, marks, "marked_cross_entropy")
  num_classes = logits.shape[-1]
  if not isinstance(marks, jax.core.Tracer):
    top = int(np.max(np.asarray(marks))) if np.size(marks) else -1
    if top >= num_classes:
      raise ValueError(f"marks hold label {top}, but the logits have {num_classes} classes (0..{num_classes - 1})")
  marked = marks >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(marked, marks, 0))
  ce = jnp.where(marked, ce, 0.0)
  if not class_balance:
    loss = ce.sum() / jnp.maximum(marked.sum(), 1)
  else:
    onehot = (marks[..., None] == jnp.arange(num_classes)) & marked[..., None]
    per_class_count = onehot.sum(axis=tuple(range(marks.ndim)))
    per_class = (ce[..., None] * onehot).sum(axis=tuple(range(marks.ndim))) / jnp.maximum(per_class_count, 1)
    present = per_class_count > 0
    loss = jnp.where(present, per_class, 0.0).sum() / jnp.maximum(present.sum(), 1)
  return jnp.where(jnp.any(marks >= num_classes), jnp.nan, loss)


def marks_satisfied(logits: jax.Array, marks: jax.Array) -> jax.Array:
  """True when every marked pixel's argmax equals its label (vacuously true with no marks).

  Raises:
    ValueError: ``logits`` is not ``[*marks.shape, classes]``.
  """
  _check_pairs(logits, marks, "marks_satisfied")
  return jnp.all((marks < 0) | (jnp.argmax(logits, axis=-1) == marks))


def proximal_norm(tunable: Any, anchor: Any) -> jax.Array:
  """``||tunable - anchor||_2`` over all leaves, with a finite (zero) gradient at ``tunable == anchor``.

  Raises:
    ValueError: the two trees differ in structure or in a leaf's shape.
  """
  if jax.tree.structure(tunable) != jax.tree.structure(anchor) or any(
    np.shape(a) != np.shape(b) for a, b in zip(jax.tree.leaves(tunable), jax.tree.leaves(anchor))
  ):
    raise ValueError("proximal_norm needs two trees of the same structure and leaf shapes")
  sq = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(tunable), jax.tree.leaves(anchor)))
  sq = jnp.asarray(sq, jnp.float32)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def initial_labels(initial_logits: jax.Array) -> jax.Array:
  """The keep term's targets: int32 ``[*spatial]``, the argmax of the network's initial logits (under W)."""
  return jnp.argmax(initial_logits, axis=-1).astype(jnp.int32)


def no_keep(marks: jax.Array) -> jax.Array:
  """Keep targets that hold none (-1 at every pixel), shaped and placed like ``marks``: the keep term is
  then 0 (what a driver passes when ``keep_weight`` is 0, so that the same compiled program serves both)."""
  return jnp.full_like(marks, -1)


def optimizer(settings: Settings, hyper: Hyper) -> optax.GradientTransformation:
  """The named optimiser (:data:`scribblejax.config.BUILTIN_OPTIMIZERS`) with the traced learning rate
  (and momentum), or the user's own transformation."""
  builtin = builtin_optimizer(settings.optimizer)
  if builtin is None:
    return settings.optimizer
  return builtin.make(hyper.learning_rate, hyper.momentum)


# ---------------------------------------------------------------------------------------------
# Algorithm 1
# ---------------------------------------------------------------------------------------------


def objective(
  logits_of: Callable,
  anchor: Any,
  marks: jax.Array,
  keep: jax.Array | None,
  settings: Settings,
  hyper: Hyper,
  tunable: Any,
) -> tuple[jax.Array, jax.Array]:
  """The loss of W_lam = ``tunable`` and its logits: marked cross-entropy + keep term + proximal term.

  ``g = CE(marked pixels vs marks) + keep_weight * CE(unmarked pixels vs keep) + prox_weight * ||W_lam - W||_2``.

  Args:
    logits_of: ``logits_of(tunable) -> f32[*spatial, classes]``, the network on this image.
    anchor: W's tunable part, which the proximal term pulls towards (same form as ``tunable``).
    marks: int32 ``[*spatial]``, the user's map: k >= 0 marked as class k, -1 unmarked.
    keep: int32 ``[*spatial]``, the label each unmarked pixel is kept at (:func:`initial_labels`; -1: none,
      :func:`no_keep`); read on the unmarked pixels only. ``None``: no keep term.
    settings, hyper: the static and the traced settings.
    tunable: W_lam (the argument differentiated).
  """
  logits = logits_of(tunable)
  loss = marked_cross_entropy(logits, marks, settings.class_balance)
  if keep is not None:
    loss = loss + hyper.keep_weight * marked_cross_entropy(logits, jnp.where(marks < 0, keep, -1))
  return loss + hyper.prox_weight * proximal_norm(tunable, anchor), logits


def value_and_grad(loss: Callable, tunable: Any) -> tuple[jax.Array, jax.Array, Callable]:
  """The loss, its logits and ``gradient(wanted)``, with the backward pass always run.

  ``wanted`` is a thunk saying whether the update will be taken; this eager form ignores it (see
  :func:`scribblejax.refinement.backend.lazy_value_and_grad` for the form that reads it).
  """
  (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(tunable)
  return value, logits, lambda wanted: grads


def init_state(start: Any, settings: Settings, hyper: Hyper) -> RefineState:
  """The loop's initial state: W_lam = start (W itself for a fresh round), fresh optimiser state."""
  tunable = jax.tree.map(jnp.asarray, start)
  opt_state = optimizer(settings, hyper).init(tunable)
  return RefineState(
    tunable,
    tunable,
    opt_state,
    jnp.zeros((), jnp.int32),
    jnp.zeros((), bool),
    jnp.zeros((), bool),
    jnp.zeros((), bool),
    jnp.full((settings.trace_length,), jnp.nan, jnp.float32),
  )


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def step(
  state: RefineState,
  logits_of: Callable,
  anchor: Any,
  marks: jax.Array,
  keep: jax.Array | None,
  settings: Settings,
  hyper: Hyper,
  differentiate: Callable = value_and_grad,
) -> tuple[RefineState, jax.Array]:
  """One guarded step: evaluate; stop if satisfied or non-finite; else one optimiser update.

  A step taken when the loop is already done, or at ``max_steps``, changes nothing, so a driver may
  run extra steps. When the objective at the current weights is non-finite, the loop stops and steps
  back to the previous (finite) weights.

  Args:
    state: the carry (``state.tunable`` and ``anchor`` in the form ``logits_of`` takes).
    logits_of, anchor, marks, keep, settings, hyper: as for :func:`objective`.
    differentiate: how the gradient is computed: :func:`value_and_grad`, or a backend's equivalent.

  Returns:
    The next state, and the logits this step evaluated (those of ``state.tunable``).
  """
  loss = functools.partial(objective, logits_of, anchor, marks, keep, settings, hyper)
  active = ~state.done & (state.step < hyper.max_steps)
  value, logits, gradient = differentiate(loss, state.tunable)
  satisfied = marks_satisfied(logits, marks)
  grads = gradient(
    lambda: active & jnp.isfinite(value) & jnp.all(jnp.isfinite(logits)) & ~(satisfied & settings.early_stop)
  )
  updates, new_opt_state = optimizer(settings, hyper).update(grads, state.opt_state, state.tunable)
  new_tunable = optax.apply_updates(state.tunable, updates)
  evaluated_finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(logits)) & _all_finite(grads)
  finite = evaluated_finite & _all_finite(new_tunable)
  stop = (satisfied & settings.early_stop) | ~finite
  take = active & ~stop
  step_back = active & ~evaluated_finite & (state.step > 0)
  new_opt_state = optax.tree.cast_like(new_opt_state, state.opt_state)
  trace = jnp.where(
    active & (state.step < settings.trace_length),
    state.loss_trace.at[state.step].set(value.astype(jnp.float32)),
    state.loss_trace,
  )
  tunable = _select(take, new_tunable, _select(step_back, state.previous, state.tunable))
  return RefineState(
    tunable=tunable,
    previous=_select(take, state.tunable, state.previous),
    opt_state=_select(take, new_opt_state, state.opt_state),
    step=state.step + take.astype(jnp.int32) - step_back.astype(jnp.int32),
    done=state.done | (active & stop),
    satisfied=jnp.where(active, satisfied, state.satisfied),
    nonfinite=state.nonfinite | (active & ~finite),
    loss_trace=trace,
  ), logits


def finalize(
  state: RefineState, logits_of: Callable, marks: jax.Array, settings: Settings, last_logits: jax.Array | None = None
) -> RefineResult:
  """Evaluates W_lam = ``state.tunable`` once more and packs the result.

  ``last_logits``, the logits the last :func:`step` evaluated, are W_lam's own when that step stopped
  the loop because every mark was honoured (it took no update); then they are used as they are.
  """
  evaluate = lambda: logits_of(state.tunable)
  if last_logits is None:
    logits = evaluate()
  else:
    logits = jax.lax.cond(state.done & state.satisfied & ~state.nonfinite, lambda: last_logits, evaluate)
  out = jax.nn.softmax(logits, axis=-1) if settings.output == "probabilities" else logits
  return RefineResult(
    out,
    jnp.argmax(logits, axis=-1).astype(jnp.int32),
    state.tunable,
    state.step,
    marks_satisfied(logits, marks),
    state.nonfinite,
    state.loss_trace,
  )
