"""Scribble-conditioned refinement: Algorithm 1 of Sambaturu et al. (MICCAI 2021).

Copy the weights W to W_lam; only the tunable part moves. Loop: forward; g = cross-entropy over the
marked pixels; stop when every marked pixel is predicted as its label (``satisfied``) or after
``max_steps`` steps; otherwise one optimiser step on ``g + prox_weight * ||W_lam - W||_2``.

Two drivers run the same guarded step function:

* ``"loop"``: one jit-compiled ``lax.while_loop`` runs the whole refinement on the device.
* ``"host"``: a jit-compiled chunk of ``check_every`` steps, driven from Python, which checks the stop
  rule between chunks. XLA:CPU runs convolution weight-gradients inside a ``while_loop`` body on a
  slow generic path, so this is what ``"auto"`` picks on CPU; GPUs and TPUs get ``"loop"``.

The frozen trunk is computed once per interaction (``cache_trunk``, on by default): the forward pass
is unzipped into the part that depends only on the frozen weights and the image, evaluated once, and
the tunable tail, the only part the loop runs (:mod:`scribblejax.refinement.trunk`, generic for any model).
:func:`compute_trunk` computes it once for every interaction on one image (sessions use it).

Both give the same result: each step is guarded (a step after the stop rule fired changes nothing),
so the host driver's extra steps inside its last chunk are no-ops.

Example:
  >>> split = split_params(model, last_layers(5))
  >>> result = refine(split, image, marks, RefineConfig(max_steps=100))
  >>> result.labels, result.num_steps, result.satisfied
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from scribblejax import kernels
from scribblejax import marks as marks_lib
from scribblejax import params as params_lib
from scribblejax.refinement import trunk as trunk_lib
from scribblejax._checks import INT32_MAX, is_integer, is_number
from scribblejax.params import Split
from scribblejax.config import (BATCH_SCHEMES, COMPUTE_DTYPES, DRIVERS, OPTIMIZERS, PAPER, PRESETS,  # noqa: F401
                                RefineConfig)

class RefineState(NamedTuple):
  """The carry of the refinement loop."""
  tunable: Any                # pytree like W's tunable part: the current W_lam
  previous: Any               # the W_lam before the last update (returned if `tunable` gives a non-finite loss)
  opt_state: Any              # optax state
  step: jax.Array             # int32[]: optimiser steps taken
  done: jax.Array             # bool[]: the stop rule fired (satisfied or non-finite)
  satisfied: jax.Array        # bool[]: every marked pixel predicted as its label at `tunable`
  nonfinite: jax.Array        # bool[]: the loss, a gradient or an update became non-finite
  loss_trace: jax.Array       # f32[trace_length]: objective at step i (NaN where not evaluated)


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


class Trunk(NamedTuple):
  """The frozen trunk's values for one image, computed once by :func:`compute_trunk` and reused by
  every :func:`refine` call on that image (``refine(..., trunk=...)``; a :class:`~scribblejax.Session`
  does this for its rounds). The values do not depend on the tunable weights, so they serve a fresh
  round from W and a round continued from an earlier W_lam alike.

  Attributes:
    residuals: the trunk's values that the tunable tail reads (device arrays).
    image: the image they belong to, float32 ``[*spatial, channels]`` (a host copy; each call's
      image must equal it).
    frozen: the split's frozen parameters they were computed with (each call's split must hold
      this very object).
    graphdef: the split's :class:`GraphKey`.
    compute_dtype: the network's compute dtype (``None`` for float32).
    conv_backend: the resolved convolution backend.
  """
  residuals: list
  image: np.ndarray
  frozen: Any
  graphdef: Any
  compute_dtype: str | None
  conv_backend: str


class _Hyper(NamedTuple):
  """The traced settings: changing them never recompiles."""
  max_steps: jax.Array        # int32[]
  learning_rate: jax.Array    # f32[]
  momentum: jax.Array         # f32[]
  prox_weight: jax.Array      # f32[]
  keep_weight: jax.Array      # f32[]


@dataclasses.dataclass(frozen=True)
class _Static:
  """The static settings: part of the compilation cache key."""
  optimizer: Any
  class_balance: bool
  trace_length: int
  output: str
  early_stop: bool = True
  cache_trunk: bool = True
  compute_dtype: str | None = None  # None: the parameters' own dtype (float32)
  remat: bool = False
  conv_backend: str = "xla"       # resolved: "xla" or "onednn"
  conv_rewrite: str | None = None  # batches: "conv_as_matmul" or "conv_as_shifted_matmul" in the tail
  flat_params: bool = False       # the loop driver carries W_lam as one flat vector (see _flattens)
  lazy_backward: bool = False     # the backward pass runs only when its update will be taken (see _static)


# XLA options of every compiled refinement program on GPUs: channels-last cuDNN convolutions. XLA:GPU's
# own choice for float32 3D convolutions on Hopper is channels-first, which cuDNN converts at every
# call; channels-last made a 3D 96^3 interaction 13% faster on an H100 (476 -> 413 ms for 50 steps,
# benchmarks/results/gpu_h100_2026-11-27). SCRIBBLEJAX_FORCE_CONV_NHWC=0 (read at import) leaves the
# layout to XLA.
_COMPILER_OPTIONS = ({"xla_gpu_force_conv_nhwc": True} if os.environ.get("SCRIBBLEJAX_FORCE_CONV_NHWC", "1") != "0"
                     else None)


class _jit:  # noqa: N801 (used as jax.jit is)
  """``jax.jit`` that compiles with :data:`_COMPILER_OPTIONS` when the default backend is a GPU and
  without them elsewhere (CPU and TPU programs stay as plain ``jax.jit`` makes them). The backend
  is looked up at each call, not at import, so importing never starts one."""

  def __init__(self, fn, **kwargs):
    self._plain = jax.jit(fn, **kwargs)
    self._gpu = jax.jit(fn, compiler_options=_COMPILER_OPTIONS, **kwargs) if _COMPILER_OPTIONS else self._plain
    functools.update_wrapper(self, fn)

  def _pick(self):
    return self._gpu if jax.default_backend() == "gpu" else self._plain

  def __call__(self, *args, **kwargs):
    return self._pick()(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._pick().lower(*args, **kwargs)

  def _cache_size(self) -> int:
    return self._pick()._cache_size()


class GraphKey:
  """A model's graphdef with its hash computed once.

  ``jax.jit`` hashes its static arguments at every call, and hashing an ``nnx`` graphdef walks the
  whole model in Python (about 2 ms for the benchmark U-Net on 2 cores, several times per
  interaction). Compiled functions here take this key instead; :func:`forward` unwraps it.
  """
  __slots__ = ("graphdef", "_hash")

  def __init__(self, graphdef: Any):
    self.graphdef = graphdef
    self._hash = hash(graphdef)

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: Any) -> bool:
    return self is other or (isinstance(other, GraphKey) and self._hash == other._hash
                             and self.graphdef == other.graphdef)

  def __repr__(self) -> str:
    return f"GraphKey({self.graphdef!r})"


_graph_keys: dict[int, GraphKey] = {}


def graph_key(graphdef: Any) -> GraphKey:
  """The :class:`GraphKey` of ``graphdef``, the same object for the same graphdef object."""
  if isinstance(graphdef, GraphKey):
    return graphdef
  key = _graph_keys.get(id(graphdef))
  if key is None or key.graphdef is not graphdef:
    if len(_graph_keys) >= 256:
      _graph_keys.clear()
    key = _graph_keys[id(graphdef)] = GraphKey(graphdef)
  return key


def _hyper(config: RefineConfig) -> _Hyper:
  # numpy scalars: they travel with the compiled call's arguments (no dispatch of their own)
  return _Hyper(np.asarray(config.max_steps, np.int32), np.asarray(config.learning_rate, np.float32),
                np.asarray(config.momentum, np.float32), np.asarray(config.prox_weight, np.float32),
                np.asarray(config.keep_weight, np.float32))


_SCHEME_REWRITES = {"matmul": "conv_as_matmul", "shifted": "conv_as_shifted_matmul"}


def _static(config: RefineConfig, batched: bool = False) -> _Static:
  rewrite = _SCHEME_REWRITES.get(resolve_batch_scheme(config.batch_scheme)) if batched else None
  compute_dtype = None if config.compute_dtype == "float32" else config.compute_dtype
  conv_backend = kernels.resolve_conv_backend(config.conv_backend)
  # The step that finds every mark honoured needs no gradient. Skipping its backward pass takes a
  # lax.cond, which costs nothing on the CPU but a device-to-host sync per step on a GPU; XLA:CPU's own
  # convolution gradients are only fast outside nested computations (inside the cond: 4378 against
  # 276 ms for 5 steps at 2D 128^2, measured on 2 cores), so: CPU with oneDNN only.
  lazy = jax.default_backend() == "cpu" and conv_backend == "onednn"
  return _Static(config.optimizer, config.class_balance, config.trace_length, config.output,
                 bool(config.early_stop), bool(config.cache_trunk), compute_dtype,
                 bool(config.remat), conv_backend, rewrite, _flat_carry(), lazy)


# ---------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------

def forward(graphdef: Any, tunable: Any, frozen: Any, image: jax.Array, compute_dtype: Any = None) -> jax.Array:
  """Logits ``f32[*spatial, classes]`` of one unbatched image ``[*spatial, channels]``.

  With ``compute_dtype`` (e.g. ``"bfloat16"``) every floating-point parameter and the image are cast
  to it first, so the network computes in that dtype; gradients still reach the float32 parameters.
  """
  if compute_dtype is not None:
    dtype = jnp.dtype(compute_dtype)
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
    tunable, frozen, image = jax.tree.map(cast, (tunable, frozen, image))
  model = nnx.merge(graphdef.graphdef if isinstance(graphdef, GraphKey) else graphdef, tunable, frozen)
  out = model(image[None])
  if not isinstance(out, jax.Array):
    raise ValueError(f"the model returns a {type(out).__name__}; refinement needs one array of logits "
                     "[batch, *spatial, classes] (wrap the model to return its segmentation output)")
  return out[0].astype(jnp.float32)


def _check_pairs(logits: jax.Array, marks: jax.Array, what: str) -> None:
  if tuple(logits.shape[:-1]) != tuple(marks.shape):
    raise ValueError(f"{what}: logits of shape {tuple(logits.shape)} are not [*marks.shape, classes] for marks of "
                     f"shape {tuple(marks.shape)}")


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
      np.shape(a) != np.shape(b) for a, b in zip(jax.tree.leaves(tunable), jax.tree.leaves(anchor))):
    raise ValueError("proximal_norm needs two trees of the same structure and leaf shapes")
  sq = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(tunable), jax.tree.leaves(anchor)))
  sq = jnp.asarray(sq, jnp.float32)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _optimizer(static: _Static, hyper: _Hyper) -> optax.GradientTransformation:
  if static.optimizer == "adam":
    return optax.inject_hyperparams(optax.adam)(learning_rate=hyper.learning_rate)
  if static.optimizer is None or static.optimizer == "sgd":
    return optax.inject_hyperparams(optax.sgd)(learning_rate=hyper.learning_rate, momentum=hyper.momentum)
  return static.optimizer


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _tree_select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


@dataclasses.dataclass(frozen=True)
class _Forward:
  """``forward`` bound to a graphdef and a compute dtype, hashable (the key under which the trunk's
  plan is cached)."""
  graphdef: Any
  compute_dtype: str | None = None

  def __call__(self, tunable, frozen, image):
    return forward(self.graphdef, tunable, frozen, image, self.compute_dtype)


def trunk_residuals(graphdef, tunable, frozen, image, compute_dtype: str | None = None,
                    conv_backend: str = "auto") -> list:
  """The frozen trunk's values that the tunable tail reads (once per interaction)."""
  return trunk_lib.partition(_Forward(graphdef, compute_dtype), tunable, frozen, image,
                             rewrites=trunk_lib.default_rewrites(conv_backend)).trunk(frozen, image)


def _logits(graphdef, tunable, frozen, image, residuals, static: _Static, remat: bool = False):
  """The forward pass: the tail alone on the trunk's ``residuals`` when given, else all of it.

  ``remat`` rematerialises layer by layer in the tail (:func:`scribblejax.refinement.trunk.partition`), or
  around the whole forward pass without residuals."""
  fn = _Forward(graphdef, static.compute_dtype)
  if residuals is None:
    return (jax.checkpoint(fn) if remat else fn)(tunable, frozen, image)
  rewrites = ((static.conv_rewrite,) if static.conv_rewrite else ()) + trunk_lib.default_rewrites(static.conv_backend)
  return trunk_lib.partition(fn, tunable, frozen, image, rewrites=rewrites, remat=remat).tail(tunable, residuals)


def _objective(graphdef, frozen, anchor, image, marks, static, hyper, tunable, residuals=None, unravel=None):
  tree = tunable if unravel is None else unravel(tunable)
  logits = _logits(graphdef, tree, frozen, image, residuals, static, static.remat)
  ce = marked_cross_entropy(logits, marks, static.class_balance)
  # Internally, unmarked pixels may carry the network's initial label k as -2 - k (see _keep_targets).
  keep = marked_cross_entropy(logits, jnp.where(marks <= -2, -2 - marks, -1))
  return ce + hyper.keep_weight * keep + hyper.prox_weight * proximal_norm(tunable, anchor), logits


def init_state(start, static: _Static, hyper: _Hyper) -> RefineState:
  """The loop's initial state: W_lam = start (W itself for a fresh round), fresh optimiser state."""
  tunable = jax.tree.map(jnp.asarray, start)
  opt_state = _optimizer(static, hyper).init(tunable)
  return RefineState(tunable, tunable, opt_state, jnp.zeros((), jnp.int32), jnp.zeros((), bool), jnp.zeros((), bool),
                     jnp.zeros((), bool), jnp.full((static.trace_length,), jnp.nan, jnp.float32))


def refine_step(graphdef, frozen, anchor, image, marks, static: _Static, hyper: _Hyper,
                state: RefineState, residuals: list | None = None, unravel: Any = None) -> RefineState:
  """One guarded step: evaluate; stop if satisfied or non-finite; else one optimiser update.

  A step taken when the loop is already done, or at ``max_steps``, changes nothing. When the
  objective at the current weights is non-finite, the loop stops and steps back to the previous
  (finite) weights. With ``residuals`` (from :func:`trunk_residuals`) only the tunable tail of the
  network runs. With ``unravel``, ``state.tunable`` and ``anchor`` are flat vectors
  (``jax.flatten_util.ravel_pytree``) and ``unravel`` rebuilds the tunable pytree from one. With
  ``static.lazy_backward`` the backward pass runs under ``lax.cond``, only when the update is taken.
  """
  return _step(graphdef, frozen, anchor, image, marks, static, hyper, state, residuals, unravel)[0]


def _step(graphdef, frozen, anchor, image, marks, static: _Static, hyper: _Hyper, state: RefineState,
          residuals: list | None = None, unravel: Any = None) -> tuple[RefineState, jax.Array]:
  """:func:`refine_step`, also returning the logits it evaluated (those of ``state.tunable``)."""
  objective = functools.partial(_objective, graphdef, frozen, anchor, image, marks, static, hyper,
                                residuals=residuals, unravel=unravel)
  active = ~state.done & (state.step < hyper.max_steps)
  if static.lazy_backward:
    value, pullback, logits = jax.vjp(objective, state.tunable, has_aux=True)
    satisfied = marks_satisfied(logits, marks)
    needed = active & jnp.isfinite(value) & jnp.all(jnp.isfinite(logits)) & ~(satisfied & static.early_stop)
    grads = jax.lax.cond(needed, lambda: pullback(jnp.ones_like(value))[0],
                         lambda: jax.tree.map(jnp.zeros_like, state.tunable))
  else:
    (value, logits), grads = jax.value_and_grad(objective, has_aux=True)(state.tunable)
    satisfied = marks_satisfied(logits, marks)
  updates, new_opt_state = _optimizer(static, hyper).update(grads, state.opt_state, state.tunable)
  new_tunable = optax.apply_updates(state.tunable, updates)
  evaluated_finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(logits)) & _all_finite(grads)
  finite = evaluated_finite & _all_finite(new_tunable)
  stop = (satisfied & static.early_stop) | ~finite
  take = active & ~stop
  step_back = active & ~evaluated_finite & (state.step > 0)
  new_opt_state = optax.tree.cast_like(new_opt_state, state.opt_state)
  trace = jnp.where(active & (state.step < static.trace_length),
                    state.loss_trace.at[state.step].set(value.astype(jnp.float32)), state.loss_trace)
  tunable = _tree_select(take, new_tunable, _tree_select(step_back, state.previous, state.tunable))
  return RefineState(
      tunable=tunable,
      previous=_tree_select(take, state.tunable, state.previous),
      opt_state=_tree_select(take, new_opt_state, state.opt_state),
      step=state.step + take.astype(jnp.int32) - step_back.astype(jnp.int32),
      done=state.done | (active & stop),
      satisfied=jnp.where(active, satisfied, state.satisfied),
      nonfinite=state.nonfinite | (active & ~finite),
      loss_trace=trace,
  ), logits


def finalize(graphdef, frozen, image, marks, static: _Static, state: RefineState,
             residuals: list | None = None, unravel: Any = None, last_logits: jax.Array | None = None
             ) -> RefineResult:
  """Evaluates W_lam once more (only the tail, when the trunk's ``residuals`` are given) and packs the
  result (``unravel``: as :func:`refine_step`).

  ``last_logits``, the logits the last step evaluated, are W_lam's own when that step stopped the
  loop because every mark was honoured (it took no update); then they are used as they are.
  """
  tunable = state.tunable if unravel is None else unravel(state.tunable)
  evaluate = lambda: _logits(graphdef, tunable, frozen, image, residuals, static)
  if last_logits is None:
    logits = evaluate()
  else:
    logits = jax.lax.cond(state.done & state.satisfied & ~state.nonfinite, lambda: last_logits, evaluate)
  out = jax.nn.softmax(logits, axis=-1) if static.output == "probabilities" else logits
  return RefineResult(out, jnp.argmax(logits, axis=-1).astype(jnp.int32), tunable, state.step,
                      marks_satisfied(logits, marks), state.nonfinite, state.loss_trace)


def _flat_carry() -> bool:
  """Whether the loop driver carries W_lam flat on this backend: on GPUs and TPUs. One kernel for the
  optimiser, the proximal term and the finiteness checks instead of one per parameter made a 2D 256^2
  interaction 9% faster on an H100 (66.5 -> 60.7 ms); on 2 CPU cores, where the slicing and
  concatenation are copies, it was no faster (102-138 against 111-119 ms per step, alternating runs)."""
  return jax.default_backend() != "cpu"


def _flattens(static: _Static, tunable: Any) -> bool:
  """Whether the loop carries W_lam flat: a built-in optimiser (SGD and Adam work element by element,
  so the same on one vector) and one dtype for every tunable leaf."""
  leaves = jax.tree.leaves(tunable)
  return (static.flat_params and static.optimizer in (None, "sgd", "adam") and len(leaves) > 1
          and len({jnp.result_type(x) for x in leaves}) == 1)


def _loop_one(graphdef, static, anchor, start, frozen, image, marks, hyper, residuals=None) -> RefineResult:
  if residuals is None and static.cache_trunk:
    residuals = trunk_residuals(graphdef, anchor, frozen, image, static.compute_dtype, static.conv_backend)
  unravel = None
  if _flattens(static, anchor):
    anchor, unravel = jax.flatten_util.ravel_pytree(anchor)
    start = jax.flatten_util.ravel_pytree(start)[0]
  step = functools.partial(_step, graphdef, frozen, anchor, image, marks, static, hyper, residuals=residuals,
                           unravel=unravel)
  state = init_state(start, static, hyper)
  tree = start if unravel is None else unravel(start)
  logits = jnp.zeros(jax.eval_shape(lambda: _logits(graphdef, tree, frozen, image, residuals, static)).shape,
                     jnp.float32)
  state, logits = jax.lax.while_loop(lambda c: ~c[0].done & (c[0].step < hyper.max_steps),
                                     lambda c: step(c[0]), (state, logits))
  return finalize(graphdef, frozen, image, marks, static, state, residuals, unravel, last_logits=logits)


def _chunk_one(graphdef, static, check_every, anchor, frozen, image, marks, hyper, state,
               residuals=None) -> RefineState:
  for _ in range(check_every):
    state = refine_step(graphdef, frozen, anchor, image, marks, static, hyper, state, residuals)
  return state


# ---------------------------------------------------------------------------------------------
# Compiled entry points (module-level so the compilation cache persists between calls)
# ---------------------------------------------------------------------------------------------

def _batched(fn, batched_args: tuple[bool, ...]):
  return jax.vmap(fn, in_axes=tuple(0 if b else None for b in batched_args))


@functools.partial(_jit, static_argnames=("graphdef", "static", "batched", "batched_start"))
def _run_loop(graphdef, static, batched, anchor, start, frozen, image, marks, hyper, batched_start=False,
              residuals=None):
  fn = functools.partial(_loop_one, graphdef, static)
  if batched:
    fn = _batched(fn, (False, batched_start, False, True, True, False))
    return fn(anchor, start, frozen, image, marks, hyper)
  return fn(anchor, start, frozen, image, marks, hyper, residuals)


@functools.partial(_jit, static_argnames=("static", "batched", "batch_size", "batched_start"))
def _run_init(static, batched, start, hyper, batch_size, batched_start=False):
  if batched_start:
    return jax.vmap(lambda s: init_state(s, static, hyper))(start)
  state = init_state(start, static, hyper)
  if batched:
    state = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch_size, *jnp.shape(x))), state)
  return state


@functools.partial(_jit, static_argnames=("graphdef", "static", "check_every", "batched"), donate_argnames=("state",))
def _run_chunk(graphdef, static, check_every, batched, anchor, frozen, image, marks, hyper, state, residuals=None):
  fn = functools.partial(_chunk_one, graphdef, static, check_every)
  if batched:
    fn = _batched(fn, (False, False, True, True, False, True, True))
  return fn(anchor, frozen, image, marks, hyper, state, residuals)


@functools.partial(_jit, static_argnames=("graphdef", "compute_dtype", "conv_backend", "batched"))
def _run_trunk(graphdef, compute_dtype, conv_backend, batched, tunable, frozen, image):
  fn = functools.partial(trunk_residuals, graphdef, compute_dtype=compute_dtype, conv_backend=conv_backend)
  if batched:
    fn = _batched(fn, (False, False, True))
  return fn(tunable, frozen, image)


@functools.partial(_jit, static_argnames=("graphdef", "static", "batched"))
def _run_finalize(graphdef, static, batched, frozen, image, marks, state, residuals=None):
  fn = functools.partial(finalize, graphdef)
  if batched:
    return jax.vmap(lambda i, m, s, r: fn(frozen, i, m, static, s, r))(image, marks, state, residuals)
  return fn(frozen, image, marks, static, state, residuals)


@functools.partial(_jit, static_argnames=("graphdef", "conv_backend", "compute_dtype"))
def _run_predict(graphdef, conv_backend, tunable, frozen, image, residuals=None, compute_dtype=None):
  # the trunk (unless its residuals are given) and the tail, as refine computes them (with the same
  # faster forms of some operations); conv_backend is resolved by the caller, outside any trace
  # (resolving may build the kernels)
  static = _Static(optimizer=None, class_balance=False, trace_length=1, output="logits", conv_backend=conv_backend,
                   compute_dtype=compute_dtype)
  if residuals is None:
    residuals = trunk_residuals(graphdef, tunable, frozen, image, compute_dtype, conv_backend)
  return _logits(graphdef, tunable, frozen, image, residuals, static)


def resolve_batch_scheme(scheme: str) -> str:
  """``"auto"`` -> ``"sequential"`` on CPU, ``"matmul"`` on GPU and TPU (the fastest measured).

  On CPU one image already keeps every core busy and both batched forms are slower per image
  (measured on 2 cores, 2D 256^2, batch 8, last 5 layers: "vmap" 3.9x and "matmul" 3.3x the time of
  "sequential"). On GPUs ``vmap`` over per-image weights makes each tunable convolution a grouped
  convolution (3.6 against 7.7 images/s on an H100, issue 6); "matmul" turns them into batched matrix
  products, "shifted" into one batched product per kernel tap. On an H100 (2D 256^2, 20 steps,
  ``benchmarks/results/gpu_h100_2026-11-27``), for 8 and 32 images: "matmul" 65.7 and 71.8 images/s,
  "sequential" 67.5 and 69.3, "shifted" 55.1 and 60.6, one image 54.6: one image already keeps the GPU
  busy, so no scheme gains much.
  """
  if scheme != "auto":
    return scheme
  return "sequential" if jax.default_backend() == "cpu" else "matmul"


def resolve_driver(driver: str, conv_backend: str = "auto", compute_dtype: str = "float32",
                   cache_trunk: bool = True) -> str:
  """What ``driver`` means here: ``"auto"`` is ``"loop"`` on GPU and TPU, and on the CPU too when
  every convolution runs on oneDNN (``conv_backend`` resolves to ``"onednn"``, ``compute_dtype`` is
  float32 and ``cache_trunk`` is on: without it every step runs the model's own forward pass, on
  XLA's convolutions); else ``"host"`` on the CPU.

  XLA:CPU runs its own convolution gradients inside a ``while_loop`` body on a slow generic path, so
  its CPU refinement is driven from Python. oneDNN's convolutions are custom calls that run at full
  speed in a loop body, where one compiled loop is the faster driver (``docs/performance.md``).
  """
  if driver != "auto":
    return driver
  if jax.default_backend() != "cpu":
    return "loop"
  onednn = kernels.resolve_conv_backend(conv_backend) == "onednn" and compute_dtype == "float32" and cache_trunk
  return "loop" if onednn else "host"


def _driver(config: RefineConfig) -> str:
  return resolve_driver(config.driver, config.conv_backend, config.compute_dtype, config.cache_trunk)


# ---------------------------------------------------------------------------------------------
# Validation (before anything is compiled)
# ---------------------------------------------------------------------------------------------

def _check_image(image: Any) -> np.ndarray:
  """The image as float32 (not necessarily a copy), refused if not real numbers or not finite in float32."""
  arr = np.asarray(image)
  # jnp.issubdtype knows ml_dtypes' floats (bfloat16 ...), which NumPy does not count as numbers
  if not jnp.issubdtype(arr.dtype, jnp.number) or jnp.issubdtype(arr.dtype, jnp.complexfloating):
    raise ValueError(f"image must be a real numeric array, got dtype {arr.dtype}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"image contains {int(np.size(arr) - np.isfinite(arr).sum())} NaN or Inf values")
  with np.errstate(over="ignore"):
    as_f32 = np.asarray(arr, np.float32)
  if as_f32 is not arr and not np.all(np.isfinite(as_f32)):
    raise ValueError(f"image holds {int(np.size(as_f32) - np.isfinite(as_f32).sum())} values beyond float32's "
                     f"range (largest magnitude {float(np.abs(arr).max()):.3g}); rescale it first")
  return as_f32


@functools.lru_cache(maxsize=256)
def _output_shape(graphdef: Any, tunable_key: tuple, frozen_key: tuple, image_shape: tuple, dtype: str):
  """The logits' shape (by abstract evaluation, cached per model structure and image shape), or the
  model's own error."""
  structs = [jax.tree.unflatten(key[0], trunk_lib.key_leaves(key)) for key in (tunable_key, frozen_key)]
  try:
    return tuple(jax.eval_shape(functools.partial(forward, graphdef), *structs,
                                jax.ShapeDtypeStruct(image_shape, np.dtype(dtype))).shape), None
  except Exception as err:  # noqa: BLE001 (the model's own shape checks, reported by the caller)
    return None, f"{type(err).__name__}: {err}"


def num_classes_of(split: Split, image_shape: tuple[int, ...], dtype=jnp.float32) -> int:
  """The number of output classes of the split's model for an unbatched image shape (no compile).

  Cached per model structure and image shape, so repeated interactions do not trace the model again.
  """
  shape, error = _output_shape(graph_key(split.graphdef), trunk_lib.structure_key(split.tunable),
                               trunk_lib.structure_key(split.frozen),
                               tuple(int(n) for n in image_shape), jnp.dtype(dtype).str)
  if error is not None:
    raise ValueError(f"the model does not accept an image of shape {tuple(image_shape)}: {error}")
  if tuple(shape[:-1]) != tuple(image_shape[:-1]):
    raise ValueError(f"the model maps an image of spatial shape {image_shape[:-1]} to logits of shape {shape}; "
                     "refinement needs one logit vector per pixel")
  return int(shape[-1])


def prepare_inputs(split: Split, image: Any, marks: Any, *, batched: bool = False) -> tuple[jax.Array, jax.Array]:
  """Validates an image and its marks; returns float32 image ``[*spatial, C]`` and int32 marks.

  An image without a channel axis (same shape as the marks) gets one. Raises ``ValueError`` naming
  the problem: rank or shape mismatch, non-integer marks, labels out of range, NaN/Inf pixels.
  """
  arr, mk = _prepare_host(split, image, marks, batched)
  return jnp.asarray(arr), jnp.asarray(mk)


def _prepare_host(split: Split, image: Any, marks: Any, batched: bool) -> tuple[np.ndarray, np.ndarray]:
  """:func:`prepare_inputs` on the host: float32 image and int32 marks as NumPy arrays."""
  arr = _check_image(image)
  mk = np.asarray(marks)
  lead = 1 if batched else 0
  spatial_dims = split_spatial_dims(split)
  if batched and spatial_dims is not None and mk.ndim == spatial_dims:
    raise ValueError(f"a batch needs a leading batch axis, but marks of shape {mk.shape} are one "
                     f"{spatial_dims}D map; add one (marks[None], image[None]) or refine one image with refine")
  if batched and (arr.ndim < 1 or mk.ndim < 1 or arr.shape[0] != mk.shape[0]):
    raise ValueError(f"images and marks must share a leading batch axis, got shapes {arr.shape} and {mk.shape}")
  if batched and mk.shape[0] == 0:
    raise ValueError(f"a batch needs at least one image, got images of shape {arr.shape}")
  if spatial_dims is not None and mk.ndim - lead != spatial_dims:
    raise ValueError(f"marks of shape {mk.shape} have {mk.ndim - lead} spatial axes but the model is "
                     f"{spatial_dims}D")
  if arr.shape == mk.shape:
    arr = arr[..., None]
  if arr.ndim != mk.ndim + 1 or arr.shape[:-1] != mk.shape:
    raise ValueError(f"image of shape {arr.shape} and marks of shape {mk.shape} do not match: the image must be "
                     "[*spatial, channels] (or [*spatial]) with marks [*spatial]")
  num_classes = num_classes_of(split, arr.shape[lead:])
  if batched:
    mk = np.stack([marks_lib.validate_mark_map(m, arr.shape[1:-1], num_classes) for m in mk])
  else:
    mk = marks_lib.validate_mark_map(mk, arr.shape[:-1], num_classes)
  return np.asarray(arr, np.float32), np.asarray(mk, np.int32)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _one_image(split: Split, image: Any) -> np.ndarray:
  """A checked float32 image ``[*spatial, channels]`` (a channel axis added for a model that states its
  ``spatial_dims``), which the model accepts; not necessarily a copy."""
  arr = _check_image(image)
  if arr.ndim == split_spatial_dims(split):
    arr = arr[..., None]
  num_classes_of(split, arr.shape)
  return np.asarray(arr, np.float32)


def predict(split: Split, image: Any, tunable: Any = None, *, trunk: Trunk | None = None) -> jax.Array:
  """Logits ``f32[*spatial, classes]`` of the network (W, or ``tunable`` when given) on one image.

  With ``trunk`` (:func:`compute_trunk` of this split and image) only the tail runs, under the
  trunk's compute settings.
  """
  arr = _one_image(split, image)
  tunable = split.tunable if tunable is None else params_lib.check_tunable(split, tunable)
  if trunk is None:
    return _run_predict(graph_key(split.graphdef), kernels.resolve_conv_backend("auto"), tunable, split.frozen,
                        jnp.asarray(arr))
  problem = trunk_mismatch(trunk, split, image=arr)
  if problem:
    raise ValueError(problem)
  return _run_predict(trunk.graphdef, trunk.conv_backend, tunable, split.frozen, jnp.asarray(arr), trunk.residuals,
                      compute_dtype=trunk.compute_dtype)


def split_spatial_dims(split: Split) -> int | None:
  """The model's spatial rank when it states one (``spatial_dims`` attribute), else ``None``."""
  key = graph_key(split.graphdef)
  if key not in _spatial_dims_cache:
    if len(_spatial_dims_cache) >= 256:
      _spatial_dims_cache.clear()
    model = nnx.merge(split.graphdef, split.tunable, split.frozen)
    _spatial_dims_cache[key] = getattr(model, "spatial_dims", None)
  return _spatial_dims_cache[key]


_spatial_dims_cache: dict = {}


def _keep_targets(split: Split, image: jax.Array, marks: jax.Array, batched: bool) -> jax.Array:
  """Marks with each unmarked pixel holding the network's initial label k as ``-2 - k``.

  Pixels with a value <= -2 count as unmarked everywhere (loss, stop rule); only the optional
  ``keep_weight`` term reads them. Users cannot pass such values: validation rejects labels < -1.
  """
  images = image if batched else image[None]
  backend = kernels.resolve_conv_backend("auto")
  graphdef = graph_key(split.graphdef)
  logits = jnp.stack([_run_predict(graphdef, backend, split.tunable, split.frozen, x) for x in images])
  return keep_encoding(logits if batched else logits[0], marks)


def keep_encoding(initial_logits: jax.Array, marks: jax.Array) -> jax.Array:
  """``marks`` with each unmarked pixel holding the argmax k of ``initial_logits`` as ``-2 - k``."""
  initial = jnp.argmax(initial_logits, axis=-1).astype(jnp.int32)
  return jnp.where(marks >= 0, marks, -2 - initial)


def _drive(split: Split, image: jax.Array, marks: jax.Array, config: RefineConfig, batched: bool,
           start: Any, batched_start: bool = False, progress: Any = None, residuals: list | None = None
           ) -> RefineResult:
  static, hyper = _static(config, batched), _hyper(config)
  graphdef = graph_key(split.graphdef)
  anchor = split.tunable
  if config.keep_weight > 0:
    marks = _keep_targets(split, image, marks, batched)
  if _driver(config) == "loop":
    result = _run_loop(graphdef, static, batched, anchor, start, split.frozen, image, marks, hyper,
                       batched_start=batched_start, residuals=residuals)
    if progress is not None:
      progress(int(np.max(jax.device_get(result.num_steps))), config.max_steps)
    return result
  state = _run_init(static, batched, start, hyper, image.shape[0] if batched else 1, batched_start=batched_start)
  if residuals is None and config.cache_trunk:
    residuals = _run_trunk(graphdef, static.compute_dtype, static.conv_backend, batched, anchor, split.frozen, image)
  while True:
    finished, steps = jax.device_get((state.done | (state.step >= config.max_steps), state.step))
    if progress is not None:
      progress(int(np.max(steps)), config.max_steps)
    if np.asarray(finished).all():
      break
    state = _run_chunk(graphdef, static, config.check_every, batched, anchor, split.frozen, image, marks,
                       hyper, state, residuals)
  return _run_finalize(graphdef, static, batched, split.frozen, image, marks, state, residuals)


def compute_trunk(split: Split, image: Any, config: RefineConfig = RefineConfig()) -> Trunk:
  """The frozen trunk's values for ``image``, for every later :func:`refine` call on it.

  One interaction computes the trunk (the part of the forward pass that only the frozen weights
  and the image decide) once; with this, a series of interactions on one image computes it once
  in all. Pass the result as ``refine(..., trunk=...)`` with the same split, the same image and a
  config with the same ``compute_dtype`` and ``conv_backend``. It holds device memory (the values
  the tail reads) for as long as it is kept.

  Args:
    split: from :func:`scribblejax.split_params`.
    image: ``[*spatial, channels]``, or ``[*spatial]`` for a model that states its
      ``spatial_dims``.
    config: needs ``cache_trunk=True``; its ``compute_dtype`` and ``conv_backend`` apply.

  Raises:
    ValueError: bad image (as for :func:`refine`), or ``config.cache_trunk`` is off.
  """
  if not config.cache_trunk:
    raise ValueError("compute_trunk needs config.cache_trunk=True (without it every step runs the whole network)")
  arr = np.array(_one_image(split, image))  # a copy: later changes to the caller's array cannot reach it
  static = _static(config)
  graphdef = graph_key(split.graphdef)
  residuals = _run_trunk(graphdef, static.compute_dtype, static.conv_backend, False, split.tunable, split.frozen,
                         jnp.asarray(arr))
  return Trunk(residuals, arr, split.frozen, graphdef, static.compute_dtype, static.conv_backend)


def trunk_mismatch(trunk: Trunk, split: Split, config: RefineConfig | None = None,
                   image: np.ndarray | None = None) -> str | None:
  """Why ``trunk`` cannot serve ``split`` (a refinement with ``config``, of the prepared ``image``,
  float32 ``[*spatial, channels]``, for those given); ``None`` when it can."""
  if not isinstance(trunk, Trunk):
    return f"trunk must come from compute_trunk, got {type(trunk).__name__}"
  if config is not None and not config.cache_trunk:
    return "a trunk was given but config.cache_trunk is off"
  if trunk.frozen is not split.frozen or trunk.graphdef != graph_key(split.graphdef):
    return "the trunk was computed for another split (compute it again with this one)"
  static = _static(config) if config is not None else None
  if static is not None and (trunk.compute_dtype, trunk.conv_backend) != (static.compute_dtype, static.conv_backend):
    return (f"the trunk was computed with compute_dtype={trunk.compute_dtype or 'float32'}, conv_backend="
            f"{trunk.conv_backend}; this config has {static.compute_dtype or 'float32'}, {static.conv_backend}")
  if image is not None and trunk.image.shape != image.shape:
    return (f"the trunk was computed for another image: of shape {trunk.image.shape}, this one is {image.shape} "
            "(pass compute_trunk the image with its channel axis)")
  if image is not None and not np.array_equal(trunk.image, image):
    return "the trunk was computed for another image (compute it again for this one)"
  return None


def refine(split: Split, image: Any, marks: Any, config: RefineConfig = RefineConfig(), *,
           start: Any = None, progress: Any = None, trunk: Trunk | None = None) -> RefineResult:
  """Refines the split's tunable parameters until the prediction honours every mark.

  Args:
    split: from :func:`scribblejax.split_params`; never modified.
    image: ``[*spatial, channels]`` or ``[*spatial]``; any real dtype; never modified.
    marks: int ``[*spatial]``, -1 = unmarked, k = class k (see :mod:`scribblejax.marks`).
    config: a :class:`RefineConfig`.
    start: tunable parameters to start from instead of W (to continue an earlier round). The
      proximal term still pulls towards W, the split's own tunable parameters.
    progress: ``progress(steps_taken, max_steps)``, called from Python as the refinement runs: with
      the host driver before the first chunk and after each chunk of ``check_every`` steps; with
      the loop driver (one compiled loop) once, at the end. For progress bars; it cannot change
      the result.
    trunk: from :func:`compute_trunk` for this split and image: the trunk is not computed again
      (the result is the same).

  Returns:
    A :class:`RefineResult`.

  Raises:
    ValueError: bad input (see :func:`prepare_inputs`) or a trunk that does not belong to this
      split, image and config, before anything is compiled.
  """
  arr, mk = _prepare_host(split, image, marks, False)
  if start is not None:
    start = params_lib.check_tunable(split, start, "start")
  residuals = None
  if trunk is not None:
    problem = trunk_mismatch(trunk, split, config, arr)
    if problem:
      raise ValueError(problem)
    residuals = trunk.residuals
  return _drive(split, jnp.asarray(arr), jnp.asarray(mk), config, False, split.tunable if start is None else start,
                progress=progress, residuals=residuals)


def refine_batch(split: Split, images: Any, marks: Any, config: RefineConfig = RefineConfig(), *,
                 start: Any = None) -> RefineResult:
  """Refines one copy of W per image: each has its own marks, weights, steps and flags.

  The result equals refining the images one by one (up to float rounding); ``config.batch_scheme``
  chooses how the batch runs (see :func:`resolve_batch_scheme`).

  Args:
    split: from :func:`scribblejax.split_params`.
    images: ``[batch, *spatial, channels]`` or ``[batch, *spatial]``.
    marks: int ``[batch, *spatial]``.
    config: shared settings.
    start: per-image tunable parameters to start from (each leaf ``[batch, *shape]``, e.g. the
      ``tunable`` of an earlier batched result), instead of W for every image.

  Returns:
    A :class:`RefineResult` whose every field has a leading batch axis.
  """
  images, marks = prepare_inputs(split, images, marks, batched=True)
  if start is not None:
    start = params_lib.check_tunable(split, start, "start", batch=images.shape[0])
  if resolve_batch_scheme(config.batch_scheme) == "sequential":
    results = [_drive(split, images[i], marks[i], config, False,
                      split.tunable if start is None else jax.tree.map(lambda x, i=i: x[i], start))
               for i in range(images.shape[0])]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *results)
  if start is None:
    return _drive(split, images, marks, config, True, split.tunable)
  return _drive(split, images, marks, config, True, start, batched_start=True)


def _memory_stats(lowered) -> dict:
  stats = lowered.compile().memory_analysis()
  out = {"argument_bytes": int(stats.argument_size_in_bytes), "output_bytes": int(stats.output_size_in_bytes),
         "alias_bytes": int(stats.alias_size_in_bytes), "temp_bytes": int(stats.temp_size_in_bytes)}
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
  image, marks = prepare_inputs(split, image, marks)
  static, hyper = _static(config), _hyper(config)
  anchor, frozen, graphdef = split.tunable, split.frozen, graph_key(split.graphdef)
  driver = _driver(config)
  programs = {}
  if driver == "loop":
    programs["loop"] = _memory_stats(_run_loop.lower(graphdef, static, False, anchor, anchor, frozen, image, marks,
                                                     hyper))
  else:
    # shapes only, from the plain functions (on GPUs the compiled ones take XLA options, refused when nested)
    state = jax.eval_shape(lambda a, h: init_state(a, static, h), anchor, hyper)
    residuals = None
    if config.cache_trunk:
      trunk = functools.partial(trunk_residuals, graphdef, compute_dtype=static.compute_dtype,
                                conv_backend=static.conv_backend)
      residuals = jax.eval_shape(trunk, anchor, frozen, image)
      programs["trunk"] = _memory_stats(_run_trunk.lower(graphdef, static.compute_dtype, static.conv_backend, False,
                                                         anchor, frozen, image))
    programs["chunk"] = _memory_stats(_run_chunk.lower(graphdef, static, config.check_every, False, anchor, frozen,
                                                       image, marks, hyper, state, residuals))
    programs["finalize"] = _memory_stats(_run_finalize.lower(graphdef, static, False, frozen, image, marks, state,
                                                             residuals))
  return {"driver": driver, "programs": programs, "peak_bytes": max(p["peak_bytes"] for p in programs.values())}
