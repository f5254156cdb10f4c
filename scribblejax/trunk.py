"""The frozen trunk, computed once: split any forward pass into a trunk and a tunable tail.

During refinement only the tunable parameters move, so every operation of the forward pass that
depends on nothing but the frozen parameters and the image (the *trunk*) gives the same values at
every step. :func:`partition` traces the forward pass once to a jaxpr and unzips it by data
dependence (the idea of JAX's partial evaluation): the trunk maps ``(frozen, image)`` to
*residuals*, the trunk's values that the rest reads, and the *tail* maps ``(tunable, residuals)`` to
the output. The refinement loop then runs only the tail, on residuals computed once per interaction.

This is generic: it works on the jaxpr of any forward function and knows nothing about the model,
so it covers the built-in U-Nets and imported networks alike. For "the last l layers" of a U-Net
the residuals are the input of the first tunable layer and the skip connections that the tail
reads. Nested ``jit`` calls are unzipped too; every other higher-order primitive (``custom_jvp``,
``custom_vjp``, loops) goes wholly to the trunk or wholly to the tail.

Example:
  >>> part = partition(fn, tunable, frozen, image)      # fn(tunable, frozen, image) -> logits
  >>> residuals = part.trunk(frozen, image)              # once per interaction
  >>> logits = part.tail(tunable, residuals)             # each step; equals fn(tunable, frozen, image)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.extend import core as jex_core

# Call-like primitives whose body is unzipped rather than treated as one operation.
_INLINE = frozenset({"pjit", "jit", "closed_call"})


class Partition(NamedTuple):
  """A forward pass unzipped into a frozen trunk and a tunable tail.

  Attributes:
    trunk: ``(frozen, image) -> residuals``, a list of arrays that depends on neither the tunable
      parameters nor the step.
    tail: ``(tunable, residuals) -> output``; ``tail(tunable, trunk(frozen, image))`` equals the
      forward pass.
    residual_shapes: ``jax.ShapeDtypeStruct`` of each residual.
  """
  trunk: Callable[[Any, Any], list]
  tail: Callable[[Any, list], Any]
  residual_shapes: tuple


# ---------------------------------------------------------------------------------------------
# The plan: which equations are known (trunk) and which are unknown (tail), per nesting level
# ---------------------------------------------------------------------------------------------

class _Level(NamedTuple):
  """One jaxpr's plan."""
  jaxpr: Any                  # jax.extend.core.Jaxpr
  kinds: tuple                # per equation: "known", "unknown" or a nested _Level (an unzipped call)
  unknown_vars: frozenset     # variables (by id) whose value depends on the tunable inputs


def _is_literal(var) -> bool:
  return isinstance(var, jex_core.Literal)


def _inner_closed(eqn):
  inner = eqn.params.get("jaxpr")
  return inner if isinstance(inner, jex_core.ClosedJaxpr) else None


def _plan(jaxpr, unknown_in: tuple[bool, ...]) -> _Level:
  unknown = {id(v) for v, uk in zip(jaxpr.invars, unknown_in) if uk}
  kinds = []
  for eqn in jaxpr.eqns:
    flags = tuple((not _is_literal(v)) and id(v) in unknown for v in eqn.invars)
    inner = _inner_closed(eqn) if eqn.primitive.name in _INLINE else None
    if not any(flags):
      kinds.append("known")
    elif inner is not None and not all(flags):
      sub = _plan(inner.jaxpr, flags)
      kinds.append(sub)
      unknown.update(id(o) for o, i in zip(eqn.outvars, inner.jaxpr.outvars)
                     if (not _is_literal(i)) and id(i) in sub.unknown_vars)
    else:
      kinds.append("unknown")
      unknown.update(id(o) for o in eqn.outvars)
  return _Level(jaxpr, tuple(kinds), frozenset(unknown))


def _bind(eqn, invals):
  """``eqn`` applied to ``invals``, as ``jax.core.eval_jaxpr`` applies it."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(params, tuple):  # JAX < 0.7 returned (subfuns, params)
    subfuns, params = params
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  with ctx if ctx is not None else contextlib.nullcontext():
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  return out if eqn.primitive.multiple_results else [out]


def _read(env, var):
  return var.val if _is_literal(var) else env.get(id(var))


def _write(env, vars_, values):
  for v, x in zip(vars_, values):
    if x is not None and not isinstance(v, jex_core.DropVar):
      env[id(v)] = x


def _known_reads(level: _Level, vars_):
  return [v for v in vars_ if not _is_literal(v) and id(v) not in level.unknown_vars]


def _run_trunk(level: _Level, consts, invals, residuals: list, top: bool) -> list:
  """Evaluates the known equations and appends each known value that the tail reads, once, in a
  fixed order (the order :func:`_run_tail` reads them back). Unknown values come out as ``None``."""
  env: dict = {}
  emitted: set = set()
  _write(env, level.jaxpr.constvars, consts)
  _write(env, level.jaxpr.invars, invals)

  def emit(vars_):
    for v in _known_reads(level, vars_):
      if id(v) not in emitted:
        emitted.add(id(v))
        residuals.append(env[id(v)])

  for eqn, kind in zip(level.jaxpr.eqns, level.kinds):
    if kind == "known":
      _write(env, eqn.outvars, _bind(eqn, [_read(env, v) for v in eqn.invars]))
    elif kind == "unknown":
      emit(eqn.invars)
    else:
      inner = _inner_closed(eqn)
      _write(env, eqn.outvars, _run_trunk(kind, inner.consts, [_read(env, v) for v in eqn.invars], residuals, False))
  if top:
    emit(level.jaxpr.outvars)
  return [None if not _is_literal(v) and id(v) in level.unknown_vars else _read(env, v)
          for v in level.jaxpr.outvars]


def _run_tail(level: _Level, consts, invals, residuals, top: bool) -> list:
  """Evaluates the unknown equations, reading the trunk's values back from the residual iterator.
  Known outputs of a nested level come out as ``None`` (the enclosing level has them as residuals)."""
  env: dict = {}
  _write(env, level.jaxpr.constvars, consts)
  _write(env, level.jaxpr.invars, invals)

  def pull(vars_):
    for v in _known_reads(level, vars_):
      if id(v) not in env:
        env[id(v)] = next(residuals)

  for eqn, kind in zip(level.jaxpr.eqns, level.kinds):
    if kind == "known":
      continue
    if kind == "unknown":
      pull(eqn.invars)
      _write(env, eqn.outvars, _bind(eqn, [_read(env, v) for v in eqn.invars]))
    else:
      inner = _inner_closed(eqn)
      _write(env, eqn.outvars, _run_tail(kind, inner.consts, [_read(env, v) for v in eqn.invars], residuals, False))
  if top:
    pull(level.jaxpr.outvars)
  return [_read(env, v) for v in level.jaxpr.outvars]


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

def _struct(x) -> jax.ShapeDtypeStruct:
  aval = jax.typeof(x)
  return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))


def _key(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(s.shape), np.dtype(s.dtype).str, bool(s.weak_type)) for s in map(_struct, leaves))


@functools.lru_cache(maxsize=64)
def _unzip(fn, tunable_key, frozen_key, image_key):
  """Traces ``fn`` once per (function, structures, shapes) and plans the unzipping."""
  keys = (tunable_key, frozen_key, image_key)
  structs = [[jax.ShapeDtypeStruct(s, np.dtype(d), weak_type=w) for s, d, w in key[1]] for key in keys]

  def flat_fn(*flat):
    return fn(*(jax.tree.unflatten(key[0], leaves) for key, leaves in zip(keys, flat)))

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*structs)
  unknown_in = (True,) * len(structs[0]) + (False,) * (len(structs[1]) + len(structs[2]))
  level = _plan(closed.jaxpr, unknown_in)
  # the residual shapes, from an abstract evaluation of the trunk
  n_tunable = len(structs[0])
  residual_shapes = jax.eval_shape(
      lambda known: _collect(level, closed.consts, [None] * n_tunable + list(known)), structs[1] + structs[2])
  return closed.consts, level, n_tunable, jax.tree.structure(out_shape), tuple(residual_shapes)


def _collect(level, consts, invals) -> list:
  residuals: list = []
  _run_trunk(level, consts, invals, residuals, True)
  return residuals


def partition(fn: Callable, tunable: Any, frozen: Any, image: Any) -> Partition:
  """Unzips ``fn(tunable, frozen, image)`` into a trunk and a tail (see the module docstring).

  ``tunable``, ``frozen`` and ``image`` serve only for their structure, shapes and dtypes: they may
  be arrays, tracers (inside ``jit`` or ``vmap``) or ``jax.ShapeDtypeStruct``. The plan is cached per
  function, structure and shapes, so calling this inside a jitted function costs one trace of ``fn``
  the first time and a dictionary look-up after that.

  Args:
    fn: a pure function of three pytrees; hashable (a module-level function or a ``functools.partial``
      of one with hashable arguments, e.g. a Flax ``GraphDef``).
    tunable: the parameters that change between calls of the tail.
    frozen: the parameters that stay fixed.
    image: the input.

  Returns:
    A :class:`Partition`: ``tail(tunable, trunk(frozen, image))`` equals ``fn(tunable, frozen, image)``.
  """
  consts, level, n_tunable, out_treedef, residual_shapes = _unzip(fn, _key(tunable), _key(frozen), _key(image))

  def trunk(frozen, image):
    return _collect(level, consts, [None] * n_tunable + jax.tree.leaves(frozen) + jax.tree.leaves(image))

  def tail(tunable, residuals):
    leaves = jax.tree.leaves(tunable)
    if len(leaves) != n_tunable or len(residuals) != len(residual_shapes):
      raise ValueError("tail called with tunable parameters or residuals of another structure")
    n_rest = len(level.jaxpr.invars) - n_tunable
    it = iter(residuals)
    outs = _run_tail(level, consts, leaves + [None] * n_rest, it, True)
    return jax.tree.unflatten(out_treedef, outs)

  return Partition(trunk, tail, residual_shapes)
