"""Split a model's parameters into tunable and frozen pytrees, and merge them back.

A *selector* says which :class:`flax.nnx.Param` leaves are tunable. Selectors are small frozen
dataclasses (hashable, printable): :func:`last_layers`, :func:`by_regex`, :func:`by_predicate`,
:func:`norm_affine`, :func:`biases`, :func:`head`. Everything that is not a selected ``Param``
(other parameters, batch-norm statistics, any other variable) is frozen.

Example:
  >>> model = UNet(spatial_dims=2, in_channels=1, num_classes=2, channels=(8, 16), rngs=nnx.Rngs(0))
  >>> split = split_params(model, last_layers(3))
  >>> model2 = merge_params(split)   # the same model, rebuilt from the two pytrees
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from scribblejax._checks import is_integer
from scribblejax.models.ordering import LayerPath, layer_order

PathPredicate = Callable[[LayerPath], bool]


class Split(NamedTuple):
  """A model split into a static structure and two pytrees of arrays.

  Attributes:
    graphdef: the model's static structure (hashable; a static argument under ``jax.jit``).
    tunable: ``nnx.State`` of the tunable parameters (W restricted to the tunable set).
    frozen: ``nnx.State`` of everything else: frozen parameters, batch statistics, other variables.
  """

  graphdef: Any
  tunable: Any
  frozen: Any


def path_name(path: LayerPath) -> str:
  """``("decoder", 1, "conv", "kernel")`` -> ``"decoder/1/conv/kernel"``."""
  return "/".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class last_layers:  # noqa: N801 (reads as a function at the call site)
  """The last ``n`` layers of the model's layer order (see :mod:`scribblejax.models.ordering`)."""

  n: int

  def predicate(self, model: nnx.Module, example: Any) -> PathPredicate:
    order = layer_order(model, example)
    if not is_integer(self.n) or self.n < 1:
      raise ValueError(f"the number of tunable layers must be a positive integer, got {self.n!r}")
    if self.n > len(order):
      raise ValueError(f"asked for the last {self.n} layers but the model has only {len(order)} layers")
    chosen = order[len(order) - self.n :]
    return lambda path: any(tuple(path[: len(c)]) == c for c in chosen)


@dataclasses.dataclass(frozen=True)
class by_regex:  # noqa: N801
  """Parameters whose path ``a/b/c`` fully matches ``pattern`` (big_vision style)."""

  pattern: str

  def predicate(self, model: nnx.Module, example: Any) -> PathPredicate:
    del model, example
    try:
      compiled = re.compile(self.pattern)
    except (re.error, TypeError) as err:
      raise ValueError(f"by_regex pattern {self.pattern!r} is not a regular expression: {err}") from None
    return lambda path: compiled.fullmatch(path_name(path)) is not None


@dataclasses.dataclass(frozen=True)
class by_predicate:  # noqa: N801
  """Parameters for which ``fn(path_tuple)`` is true."""

  fn: Callable[[LayerPath], bool]

  def predicate(self, model: nnx.Module, example: Any) -> PathPredicate:
    del model, example
    return lambda path: bool(self.fn(tuple(path)))


def _norm_module_paths(model: nnx.Module) -> set[LayerPath]:
  norm_types = (nnx.BatchNorm, nnx.GroupNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.InstanceNorm)
  return {
    tuple(path)
    for path, module in nnx.iter_graph(model)
    if isinstance(module, norm_types) or (isinstance(module, nnx.Module) and type(module).__name__.endswith("Norm"))
  }


@dataclasses.dataclass(frozen=True)
class norm_affine:  # noqa: N801
  """Only the scale and bias of normalisation layers (a cheap selection)."""

  def predicate(self, model: nnx.Module, example: Any) -> PathPredicate:
    del example
    norms = _norm_module_paths(model)
    return lambda path: tuple(path[:-1]) in norms


@dataclasses.dataclass(frozen=True)
class biases:  # noqa: N801
  """Only parameters named ``bias`` (a cheap selection)."""

  def predicate(self, model: nnx.Module, example: Any) -> PathPredicate:
    del model, example
    return lambda path: path[-1] == "bias"


def head() -> last_layers:
  """Only the last layer (the classification head)."""
  return last_layers(1)


def tunable_paths(model: nnx.Module, select: Any, example: Any = None) -> tuple[LayerPath, ...]:
  """The paths of the parameters that ``select`` marks tunable, in state order."""
  predicate = select.predicate(model, example)
  params = nnx.state(model, nnx.Param)
  return tuple(tuple(p) for p, _ in nnx.to_flat_state(params) if predicate(tuple(p)))


def split_params(model: nnx.Module, select: Any, *, example: Any = None) -> Split:
  """Splits ``model`` into a static graph, tunable parameters and everything else.

  Args:
    model: a Flax NNX module; it is not modified.
    select: a selector (:func:`last_layers`, :func:`by_regex`, ...).
    example: an example batched input, needed only by :func:`last_layers` for models without a
      ``layer_order`` method.

  Returns:
    A :class:`Split`. ``merge_params(split)`` rebuilds an identical model.

  Raises:
    ValueError: the selection is empty, or the split does not cover every variable exactly once.
  """
  chosen = set(tunable_paths(model, select, example))
  if not chosen:
    raise ValueError(f"the selection {select!r} makes no parameter tunable (empty tunable set)")
  tunable_filter = nnx.All(nnx.Param, lambda path, _: tuple(path) in chosen)
  graphdef, tunable, frozen = nnx.split(model, tunable_filter, ...)
  everything = nnx.to_flat_state(nnx.state(model))
  parts = [tuple(p) for p, _ in nnx.to_flat_state(tunable)] + [tuple(p) for p, _ in nnx.to_flat_state(frozen)]
  if sorted(map(path_name, parts)) != sorted(path_name(p) for p, _ in everything):
    raise ValueError("the tunable/frozen split does not cover every variable exactly once")
  # Own copies: refining must never alias the caller's model buffers.
  copy = lambda tree: jax.tree.map(lambda a: jax.numpy.array(a, copy=True), tree)
  return Split(graphdef, copy(tunable), copy(frozen))


def check_tunable(split: Split, tree: Any, what: str = "tunable", *, batch: int | None = None) -> Any:
  """Checks that ``tree`` can stand in for ``split.tunable``; returns it in W's dtypes.

  Args:
    split: the split whose tunable parameters ``tree`` replaces.
    tree: a pytree of the same structure as ``split.tunable``, every leaf a floating-point array of
      its parameter's shape (with a leading ``batch`` axis when ``batch`` is given).
    what: how error messages name ``tree``.
    batch: the batch size of per-image parameters, or ``None`` for one set.

  Returns:
    ``tree`` with each leaf cast to its parameter's dtype (the leaves themselves when they have it).

  Raises:
    ValueError: another structure, a leaf of another shape (naming the parameter), or a leaf that is
      not floating-point or holds NaN or Inf.
  """
  if jax.tree.structure(tree) != jax.tree.structure(split.tunable):
    batched = ", with a leading batch axis" if batch is not None else ""
    raise ValueError(f"{what} must have the same structure as split.tunable{batched}")
  paths = jax.tree_util.tree_flatten_with_path(split.tunable)[0]
  lead = () if batch is None else (batch,)
  out = []
  for (path, w), x in zip(paths, jax.tree.leaves(tree)):
    name = jax.tree_util.keystr(path)
    shape, want = tuple(np.shape(x)), (*lead, *np.shape(w))
    if shape != want:
      hint = ""
      if batch is None and len(shape) == len(want) + 1 and shape[1:] == want:
        hint = (
          "; it looks batched (a refine_batch result): take one image's, jax.tree.map(lambda x: x[i], result.tunable)"
        )
      raise ValueError(f"{what} parameter {name} has shape {shape}, expected {want}{hint}")
    dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    if not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
      raise ValueError(f"{what} parameter {name} has dtype {dtype}; parameters are floating-point")
    if not _finite(x):
      raise ValueError(f"{what} parameter {name} holds NaN or Inf values")
    out.append(x if dtype == w.dtype else jax.numpy.asarray(x, w.dtype))
  return jax.tree.unflatten(jax.tree.structure(tree), out)


def _finite(x: Any) -> bool:
  """Whether every value of ``x`` is finite (``True`` for a traced value, which has none yet, and for an
  array spread over several hosts, which this host cannot read whole)."""
  try:
    return not getattr(x, "is_fully_addressable", True) or bool(jax.numpy.isfinite(x).all())
  except jax.errors.ConcretizationTypeError:
    return True


def merge_params(split: Split, tunable: Any = None) -> nnx.Module:
  """Rebuilds the model from a split, optionally with refined tunable parameters.

  Raises:
    ValueError: ``tunable`` does not fit the split (see :func:`check_tunable`), e.g. the batched
      parameters of a :func:`scribblejax.refine_batch` result.
  """
  if tunable is not None:
    tunable = check_tunable(split, tunable)
  return nnx.merge(split.graphdef, split.tunable if tunable is None else tunable, split.frozen)


def count_params(tree: Any) -> int:
  """Number of scalar parameters in a pytree."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
