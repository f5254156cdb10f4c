"""The forward order of a model's layers, so that "the last l layers" is exact.

A *layer* is a group of parameters named by a path prefix into the model's parameter state, for
example ``("decoder", 3, "conv")`` for a convolution together with its bias, or ``("dec0",
"block1")`` for a convolution and the normalisation that follows it. A model states its layers by
defining a method::

    def layer_order(self) -> Sequence[LayerPath]:
        '''Parameter path prefixes, one per layer, in the order the forward pass runs them.'''

Every :class:`flax.nnx.Param` of the model must fall under exactly one listed prefix; this module
checks that. Models without such a method get the *traced* order: the model's forward pass is traced
once on an example input (no compilation) and each module that owns parameters becomes one layer,
placed where the traced computation first uses any of its parameters (a parameter held beside
submodules that hold parameters is a layer of its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LayerPath = tuple[Any, ...]


def param_paths(model: nnx.Module) -> tuple[LayerPath, ...]:
  """All :class:`flax.nnx.Param` paths of ``model``, in the state's (sorted) order."""
  state = nnx.state(model, nnx.Param)
  return tuple(tuple(path) for path, _ in nnx.to_flat_state(state))


def _is_prefix(prefix: LayerPath, path: LayerPath) -> bool:
  return len(prefix) <= len(path) and tuple(path[: len(prefix)]) == tuple(prefix)


def check_layer_order(model: nnx.Module, layers: Sequence[LayerPath]) -> tuple[LayerPath, ...]:
  """Checks that ``layers`` covers every parameter of ``model`` exactly once.

  Args:
    model: the model.
    layers: path prefixes, one per layer.

  Returns:
    ``layers`` as a tuple of tuples.

  Raises:
    ValueError: a prefix matches no parameter, a parameter is under no prefix, or under several.
  """
  layers = tuple(tuple(layer) for layer in layers)
  if len(set(layers)) != len(layers):
    raise ValueError(f"layer order lists a layer twice: {layers}")
  paths = param_paths(model)
  for layer in layers:
    if not any(_is_prefix(layer, p) for p in paths):
      raise ValueError(f"layer {'/'.join(map(str, layer))!r} in the layer order owns no parameter")
  for p in paths:
    owners = [layer for layer in layers if _is_prefix(layer, p)]
    if not owners:
      raise ValueError(f"parameter {'/'.join(map(str, p))!r} belongs to no layer of the layer order")
    if len(owners) > 1:
      raise ValueError(
        f"parameter {'/'.join(map(str, p))!r} belongs to several layers: {['/'.join(map(str, o)) for o in owners]}"
      )
  return layers


def traced_layer_order(model: nnx.Module, example: jax.Array | jax.ShapeDtypeStruct) -> tuple[LayerPath, ...]:
  """Layer order from a trace of the forward pass (no compilation, no FLOPs).

  Each module that directly owns parameters is one layer, except that a parameter held directly by a
  module whose submodules hold parameters too (a logit temperature beside the network, a layer scale
  beside its convolution) is a layer of its own: a path prefix cannot name a module's own parameters
  apart from its submodules'. Layers are ordered by the first equation of the traced program that
  reads any of their parameters (through any chain of operations).

  Args:
    model: any Flax NNX module whose ``__call__`` takes one batched input array.
    example: an example input (array or ``jax.ShapeDtypeStruct``) with the batch axis.

  Returns:
    Layer path prefixes in forward order.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  flat = nnx.to_flat_state(params)
  paths = [tuple(p) for p, _ in flat]
  leaves = [v.get_value() if hasattr(v, "get_value") else v.value for _, v in flat]

  def forward(leaf_values, x):
    new = nnx.from_flat_state([(p, nnx.Param(v)) for p, v in zip(paths, leaf_values)])
    return nnx.merge(graphdef, new, rest)(x)

  example = jax.ShapeDtypeStruct(example.shape, example.dtype)
  closed = jax.make_jaxpr(forward)([jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)) for v in leaves], example)
  jaxpr = closed.jaxpr
  first_use = _first_uses(jaxpr, {v: {i} for i, v in enumerate(jaxpr.invars[: len(leaves)])})
  modules = {path[:-1] for path in paths}
  owners: dict[LayerPath, int] = {}
  for i, path in enumerate(paths):
    owner = path[:-1]
    if any(len(other) > len(owner) and other[: len(owner)] == owner for other in modules):
      # a module holding parameters beside submodules that hold some (a temperature, a layer scale):
      # its prefix would take its submodules' parameters too, so each such parameter is a layer
      owner = path
    use = first_use.get(i, -1)  # a layer the output never reads goes first: never a "last" layer
    owners[owner] = min(owners.get(owner, use), use)
  return tuple(sorted(owners, key=lambda o: (owners[o], o.__repr__())))


# Equation parameters that hold the sub-programs of calls, remat, custom derivatives, control flow.
_SUB_JAXPRS = ("jaxpr", "call_jaxpr", "fun_jaxpr", "body_jaxpr", "branches")


def _sub_jaxprs(eqn) -> list:
  subs = []
  for key in _SUB_JAXPRS:
    value = eqn.params.get(key)
    for sub in value if isinstance(value, (tuple, list)) else [value]:
      sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
      if hasattr(sub, "eqns") and hasattr(sub, "invars"):
        subs.append(sub)
  return subs


def _first_uses(jaxpr, depends: dict, clock: list | None = None, first_use: dict | None = None) -> dict:
  """``{parameter index: time of the first primitive reading it}``, in execution order, looking inside
  sub-programs (``jit``, ``remat``, custom derivatives, ``cond``, ``while``, ``scan``) so that layers
  called in one nested call still get distinct times. ``depends`` maps variables to the parameter
  indices they depend on (updated in place)."""
  clock = [0] if clock is None else clock
  first_use = {} if first_use is None else first_use
  for eqn in jaxpr.eqns:
    deps = set()
    for v in eqn.invars:
      if not hasattr(v, "val") and v in depends:  # skip literals
        deps |= depends[v]
    passed = set()  # parameters handed into a sub-program: read there, or not at all
    for sub in _sub_jaxprs(eqn):
      # the sub-program's inputs are the equation's last operands (cond's first is the branch index)
      inner = {}
      for outer, var in zip(eqn.invars[len(eqn.invars) - len(sub.invars) :], sub.invars):
        if not hasattr(outer, "val") and outer in depends:
          inner[var] = depends[outer]
          passed |= depends[outer]
      _first_uses(sub, inner, clock, first_use)
    clock[0] += 1
    for i in deps - passed:
      first_use.setdefault(i, clock[0])
    for v in eqn.outvars:
      depends[v] = deps
  return first_use


def layer_order(model: nnx.Module, example: jax.Array | jax.ShapeDtypeStruct | None = None) -> tuple[LayerPath, ...]:
  """The model's layers in forward order (see the module docstring).

  Args:
    model: a Flax NNX module.
    example: an example batched input, needed only when the model has no ``layer_order`` method.

  Returns:
    Layer path prefixes in forward order; every parameter lies under exactly one.

  Raises:
    ValueError: the model states no layer order and no example input was given, or its stated order
      does not cover every parameter exactly once. A ``layer_order`` method that raises
      ``NotImplementedError`` (a wrapper whose network states none) counts as none.
  """
  stated = getattr(model, "layer_order", None)
  if callable(stated):
    try:
      return check_layer_order(model, stated())
    except NotImplementedError:
      pass  # a wrapper around a network that states none: traced like any other model
  if example is None:
    raise ValueError(
      f"{type(model).__name__} states no layer order; pass an example input so that the "
      "layer order can be traced from the forward pass"
    )
  return check_layer_order(model, traced_layer_order(model, example))
