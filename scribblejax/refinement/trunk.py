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
reads. Nested ``jit`` calls are unzipped too, and so are ``jax.checkpoint`` blocks: their trunk part is
computed once like the rest, and their tail part stays one ``jax.checkpoint`` (its backward pass
recomputes the block's tail from the block's inputs and residuals), and so are maps (``lax.map``, a
``scan`` without a carry): the trunk part runs as one map that also stacks each iteration's residuals,
the tail part as another map over them (with a checkpointed body, this bounds the memory of a network
applied to many patches in turn: :class:`scribblejax.pipeline.PatchBlend`). Every other higher-order
primitive (``custom_jvp``, ``custom_vjp``, loops with a carry) goes wholly to the trunk or wholly to
the tail.

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

from scribblejax import kernels
from scribblejax.refinement import backend

# Call-like primitives whose body is unzipped rather than treated as one operation.
_INLINE = frozenset({"pjit", "jit", "closed_call"})
# ``jax.checkpoint``'s primitive (named "remat2" by JAX 0.10, "checkpoint" in its source): unzipped too,
# its tail part run under a ``jax.checkpoint`` again.
_CHECKPOINTS = frozenset({"remat2", "checkpoint"})


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

  jaxpr: Any  # jax.extend.core.Jaxpr
  kinds: tuple  # per equation: "known", "unknown", a nested _Level (an unzipped call) or a _Mapped
  unknown_vars: frozenset  # variables (by id) whose value depends on the tunable inputs
  tail_reads: frozenset = frozenset()  # positions of the inputs that the tail (or a nested tail) may read


class _Mapped(NamedTuple):
  """The plan of a ``scan`` without a carry (a map) whose inputs are partly unknown."""

  level: _Level  # the body's plan
  num_consts: int  # the scan's loop-invariant inputs come first
  tail_consts: tuple  # indices of known loop-invariant inputs the body's tail may read
  counts: dict  # {"residuals": per-iteration residuals of the body}, set by the first trunk run


def _is_literal(var) -> bool:
  return isinstance(var, jex_core.Literal)


def _inner_closed(eqn):
  inner = eqn.params.get("jaxpr")
  if eqn.primitive.name in _CHECKPOINTS and isinstance(inner, jex_core.Jaxpr) and not inner.constvars:
    return jex_core.ClosedJaxpr(inner, [])
  return inner if isinstance(inner, jex_core.ClosedJaxpr) else None


def _plan(jaxpr, unknown_in: tuple[bool, ...]) -> _Level:
  unknown = {id(v) for v, uk in zip(jaxpr.invars, unknown_in) if uk}
  kinds = []
  for eqn in jaxpr.eqns:
    flags = tuple((not _is_literal(v)) and id(v) in unknown for v in eqn.invars)
    inner = _inner_closed(eqn) if eqn.primitive.name in _INLINE | _CHECKPOINTS else None
    if not any(flags):
      kinds.append("known")
    elif _is_map(eqn) and not all(flags):
      body = eqn.params["jaxpr"].jaxpr
      sub = _plan(body, flags)
      needed = tuple(i for i in range(eqn.params["num_consts"]) if not flags[i] and i in sub.tail_reads)
      kinds.append(_Mapped(sub, eqn.params["num_consts"], needed, {}))
      unknown.update(id(o) for o, i in zip(eqn.outvars, body.outvars) if _is_tail_value(sub, i))
    elif inner is not None and not all(flags):
      sub = _plan(inner.jaxpr, flags)
      kinds.append(sub)
      unknown.update(
        id(o) for o, i in zip(eqn.outvars, inner.jaxpr.outvars) if (not _is_literal(i)) and id(i) in sub.unknown_vars
      )
    else:
      kinds.append("unknown")
      unknown.update(id(o) for o in eqn.outvars)
  return _Level(jaxpr, tuple(kinds), frozenset(unknown), _tail_reads(jaxpr, kinds))


def _tail_reads(jaxpr, kinds) -> frozenset:
  """Positions of ``jaxpr``'s inputs that its tail may read: inputs of unknown equations, of a nested
  level's tail, or of a map's loop-invariant inputs its tail reads."""
  read: set = set()
  for eqn, kind in zip(jaxpr.eqns, kinds):
    if kind == "unknown":
      read.update(id(v) for v in eqn.invars if not _is_literal(v))
    elif isinstance(kind, _Mapped):
      read.update(id(eqn.invars[i]) for i in kind.tail_consts)
    elif isinstance(kind, _Level):
      read.update(id(eqn.invars[i]) for i in kind.tail_reads if not _is_literal(eqn.invars[i]))
  return frozenset(i for i, v in enumerate(jaxpr.invars) if id(v) in read)


def _is_map(eqn) -> bool:
  return (
    eqn.primitive.name == "scan"
    and eqn.params.get("num_carry") == 0
    and isinstance(eqn.params.get("jaxpr"), jex_core.ClosedJaxpr)
  )


def _is_tail_value(level: _Level, var) -> bool:
  return (not _is_literal(var)) and id(var) in level.unknown_vars


def _map_outputs(level: _Level, values, unknown: bool) -> list:
  """The body outputs that are (``unknown``) or are not tail values."""
  return [x for v, x in zip(level.jaxpr.outvars, values) if _is_tail_value(level, v) == unknown]


def _map_scatter(level: _Level, values, unknown: bool) -> list:
  """The scan's outputs: ``values`` where the body's outputs are (``unknown``) tail values, else None."""
  it = iter(values)
  return [next(it) if _is_tail_value(level, v) == unknown else None for v in level.jaxpr.outvars]


def _filled(base, positions, values) -> list:
  """``base`` as a list with ``values`` at ``positions``."""
  out = list(base)
  for i, x in zip(positions, values):
    out[i] = x
  return out


def _scan(eqn, body, xs):
  p = eqn.params
  return jax.lax.scan(
    lambda _, x: (None, body(x)), None, xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
  )[1]


def _run_mapped_trunk(mapped: _Mapped, eqn, invals, residuals: list, rewrites: tuple) -> list:
  """The trunk of a map: one map that computes the body's known outputs and stacks the residuals its
  tail reads in each iteration. Known loop-invariant inputs that the tail reads are not stacked: the
  enclosing level emits them once, before this."""
  level, nc = mapped.level, mapped.num_consts
  inner = eqn.params["jaxpr"]
  known_xs = [i for i in range(nc, len(invals)) if id(level.jaxpr.invars[i]) not in level.unknown_vars]
  held = tuple(i < nc for i in range(len(invals)))

  def body(xs):
    vals = _filled(list(invals[:nc]) + [None] * (len(invals) - nc), known_xs, xs)
    stacked: list = []
    outs = _run_trunk(level, inner.consts, vals, stacked, False, rewrites, held)
    return _map_outputs(level, outs, False), stacked

  known, stacked = _scan(eqn, body, [invals[i] for i in known_xs])
  mapped.counts["residuals"] = len(stacked)
  residuals.extend(stacked)
  return _map_scatter(level, known, False)


def _run_mapped_tail(mapped: _Mapped, eqn, invals, residuals, rewrites: tuple, remat: bool) -> list:
  """The tail of a map: a map over its unknown per-iteration inputs and the stacked residuals."""
  level, nc = mapped.level, mapped.num_consts
  inner = eqn.params["jaxpr"]
  if "residuals" not in mapped.counts:
    raise RuntimeError("the tail of a map ran before its trunk was planned")
  stacked = [next(residuals) for _ in range(mapped.counts["residuals"])]
  unknown_xs = [i for i in range(nc, len(invals)) if id(level.jaxpr.invars[i]) in level.unknown_vars]

  def body(xs):
    values, own = xs
    vals = _filled(list(invals[:nc]) + [None] * (len(invals) - nc), unknown_xs, values)
    outs = _run_tail(level, inner.consts, vals, iter(own), False, rewrites, remat)
    return _map_outputs(level, outs, True)

  return _map_scatter(level, _scan(eqn, body, ([invals[i] for i in unknown_xs], stacked)), True)


def _lhs_channels_last(lhs, dn):
  """A convolution's input as ``[N, *S, I]``, whatever its dimension numbers ``dn``."""
  return jax.numpy.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))


def _rhs_spatial_in_out(rhs, dn):
  """A convolution's kernel as ``[*K, I, O]``, whatever its dimension numbers ``dn``."""
  return jax.numpy.transpose(rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))


def _restore_layout(y, dn):
  """A channels-last output ``[N, *S, O]`` in the layout of the dimension numbers ``dn``."""
  nd = y.ndim - 2
  logical = (0, nd + 1, *range(1, nd + 1))  # where y holds (batch, feature, *spatial)
  return jax.numpy.transpose(y, [logical[list(dn.out_spec).index(a)] for a in range(nd + 2)])


def _transposed_conv_as_matmul(eqn, lhs, rhs):
  """A transposed convolution whose stride equals its kernel (a U-Net's up-sampling), as one matrix
  product and a depth-to-space reshape; ``None`` for any other convolution.

  ``lax.conv_transpose(x, k, strides=k.shape, padding="VALID")`` reaches the jaxpr as a convolution
  of the input dilated by the kernel size with padding ``k - 1``: every output pixel sees exactly one
  input pixel, so ``y[s*i + a] = x[i] @ k[s - 1 - a]``. XLA:CPU computes the gradient of the dilated
  form on a slow generic path (``docs/performance.md``); the matrix product and its gradients are plain
  matrix products.
  """
  p = eqn.params
  nd = len(p["window_strides"])
  dn = p["dimension_numbers"]
  rhs_spec = dn.rhs_spec
  kernel = tuple(rhs.shape[d] for d in rhs_spec[2:])
  if (
    p["feature_group_count"] != 1
    or p["batch_group_count"] != 1
    or any(s != 1 for s in p["window_strides"])
    or any(d != 1 for d in p["rhs_dilation"])
    or tuple(p["lhs_dilation"]) != kernel
    or max(kernel) < 2
    or tuple(tuple(q) for q in p["padding"]) != tuple((k - 1, k - 1) for k in kernel)
  ):
    return None
  x = _lhs_channels_last(lhs, dn)  # [N, *S, I]
  k = jax.numpy.transpose(rhs, (rhs_spec[1], *rhs_spec[2:], rhs_spec[0]))  # [I, *K, O]
  k = jax.numpy.flip(k, axis=tuple(range(1, nd + 1)))
  out_features = k.shape[-1]
  y = jax.lax.dot_general(
    x,
    k.reshape(k.shape[0], -1),
    (((nd + 1,), (0,)), ((), ())),
    precision=p["precision"],
    preferred_element_type=p["preferred_element_type"],
  )
  spatial = x.shape[1 : nd + 1]
  y = y.reshape(x.shape[0], *spatial, *kernel, out_features)  # [N, *S, *K, O]
  interleave = [0] + [a for d in range(nd) for a in (1 + d, 1 + nd + d)] + [1 + 2 * nd]
  y = jax.numpy.transpose(y, interleave).reshape(
    x.shape[0], *(s * k for s, k in zip(spatial, kernel)), out_features
  )  # [N, *S*K, O]
  return [_restore_layout(y, dn).astype(eqn.outvars[0].aval.dtype)]


def _stride1_windows(eqn, lhs, rhs):
  """For a stride-1, undilated, ungrouped convolution: its kernel ``[*K, I, O]`` and, per kernel tap
  (in ``np.ndindex`` order), the window of the padded channels-last input that the tap multiplies
  (``[N, *S', I]`` each); ``None`` for any other convolution."""
  p = eqn.params
  nd = len(p["window_strides"])
  if (
    p["feature_group_count"] != 1
    or p["batch_group_count"] != 1
    or any(s != 1 for s in p["window_strides"])
    or any(d != 1 for d in p["rhs_dilation"])
    or any(d != 1 for d in p["lhs_dilation"])
  ):
    return None
  dn = p["dimension_numbers"]
  x = _lhs_channels_last(lhs, dn)  # [N, *S, I]
  k = _rhs_spatial_in_out(rhs, dn)  # [*K, I, O]
  kernel = k.shape[:nd]
  x = jax.numpy.pad(x, [(0, 0), *[tuple(q) for q in p["padding"]], (0, 0)])
  out_spatial = tuple(x.shape[1 + d] - kernel[d] + 1 for d in range(nd))
  windows = [
    x[(slice(None), *(slice(o, o + n) for o, n in zip(offset, out_spatial)), slice(None))]
    for offset in np.ndindex(*kernel)
  ]
  return k, windows


def _matmul(eqn, x, w):
  """``x [N, *S, I] @ w [I, O]`` with the convolution's precision settings."""
  p = eqn.params
  return jax.lax.dot_general(
    x,
    w,
    (((x.ndim - 1,), (0,)), ((), ())),
    precision=p["precision"],
    preferred_element_type=p["preferred_element_type"],
  )


def _conv_as_matmul(eqn, lhs, rhs):
  """A stride-1, undilated, ungrouped convolution as explicit patches and one matrix product
  (im2col); ``None`` for any other convolution.

  Under ``vmap`` over per-example kernels a convolution becomes a grouped convolution (slow on
  cuDNN and on XLA:CPU); this form becomes a batched matrix product instead.
  """
  parts = _stride1_windows(eqn, lhs, rhs)
  if parts is None:
    return None
  k, windows = parts
  cols = windows[0] if len(windows) == 1 else jax.numpy.concatenate(windows, axis=-1)  # [N, *S', prod(K)*I]
  y = _matmul(eqn, cols, k.reshape(-1, k.shape[-1]))
  return [_restore_layout(y, eqn.params["dimension_numbers"]).astype(eqn.outvars[0].aval.dtype)]


def _conv_as_shifted_matmul(eqn, lhs, rhs):
  """A stride-1, undilated, ungrouped convolution as a sum of one matrix product per kernel tap, each
  over a shifted window of the padded input; ``None`` for any other convolution.

  Like :func:`_conv_as_matmul` this turns a convolution with per-example kernels (under ``vmap``)
  into batched matrix products, without building the patches (``prod(kernel)`` times the input).
  """
  parts = _stride1_windows(eqn, lhs, rhs)
  if parts is None:
    return None
  k, windows = parts
  taps = k.reshape(-1, *k.shape[-2:])  # [prod(K), I, O]
  y = _matmul(eqn, windows[0], taps[0])
  for window, tap in zip(windows[1:], taps[1:]):
    y = y + _matmul(eqn, window, tap)
  return [_restore_layout(y, eqn.params["dimension_numbers"]).astype(eqn.outvars[0].aval.dtype)]


# The largest stacked input (bytes) that "conv3d_as_2d" builds; bigger convolutions stay 3D.
CONV3D_AS_2D_MAX_BYTES = 1 << 30


def _conv3d_as_2d(eqn, lhs, rhs):
  """A stride-1, undilated, ungrouped 3D convolution as one 2D convolution over the other two axes,
  with the first spatial axis folded into the batch and its kernel taps stacked as input features;
  ``None`` for any other convolution.

  ``y[d] = sum_k x[d + k] @ w[k]`` along the first spatial axis, so stacking the ``K`` shifted copies of
  the input along the feature axis turns the 3D convolution into a 2D one with ``K`` times the input
  features. XLA:CPU runs 2D convolutions on its fast kernels and 3D ones on a slower path
  (``docs/performance.md``); it costs ``K`` copies of the input, so a convolution whose stacked
  input would exceed :data:`CONV3D_AS_2D_MAX_BYTES` stays 3D.
  """
  p = eqn.params
  if (
    len(p["window_strides"]) != 3
    or p["feature_group_count"] != 1
    or p["batch_group_count"] != 1
    or any(s != 1 for s in p["window_strides"])
    or any(d != 1 for d in p["rhs_dilation"])
    or any(d != 1 for d in p["lhs_dilation"])
    or min(min(q) for q in p["padding"]) < 0
  ):
    return None
  dn = p["dimension_numbers"]
  x = _lhs_channels_last(lhs, dn)  # [N, D, H, W, I]
  k = _rhs_spatial_in_out(rhs, dn)  # [KD, KH, KW, I, O]
  (lo, hi), *rest = [tuple(q) for q in p["padding"]]
  x = jax.numpy.pad(x, [(0, 0), (lo, hi), (0, 0), (0, 0), (0, 0)])
  taps = k.shape[0]
  depth = x.shape[1] - taps + 1
  n, _, h, w, features = x.shape
  if n * depth * h * w * taps * features * x.dtype.itemsize > CONV3D_AS_2D_MAX_BYTES:
    return None
  stacked = jax.numpy.concatenate([x[:, t : t + depth] for t in range(taps)], axis=-1)  # [N, D', H, W, KD*I]
  kernel = jax.numpy.transpose(k, (1, 2, 0, 3, 4)).reshape(k.shape[1], k.shape[2], taps * features, k.shape[4])
  y = jax.lax.conv_general_dilated(
    stacked.reshape(n * depth, h, w, taps * features),
    kernel,
    (1, 1),
    rest,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=p["precision"],
    preferred_element_type=p["preferred_element_type"],
  )
  y = y.reshape(n, depth, *y.shape[1:])  # [N, D', H', W', O]
  return [_restore_layout(y, dn).astype(eqn.outvars[0].aval.dtype)]


def _onednn_conv(eqn, lhs, rhs):
  """A float32 convolution without kernel dilation or groups, on oneDNN (forward pass and both
  gradients; :mod:`scribblejax.kernels`); ``None`` for any other convolution.

  A convolution of an input dilated by ``s`` (what ``lax.conv_transpose`` binds: a U-Net's
  up-sampling) with padding ``(lo, hi) <= K - 1`` is oneDNN's transposed convolution with strides
  ``s``, padding ``K - 1 - lo`` and ``K - 1 - hi``, and the kernel flipped. Why this is faster than XLA:CPU's
  own convolutions: ``docs/performance.md``.
  """
  p = eqn.params
  nd = len(p["window_strides"])
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec = dn.lhs_spec, dn.rhs_spec
  strides = tuple(int(s) for s in p["window_strides"])
  dilation = tuple(int(d) for d in (p["lhs_dilation"] or (1,) * nd))
  padding = tuple((int(lo), int(hi)) for lo, hi in p["padding"])
  x_shape = (lhs.shape[lhs_spec[0]], *(lhs.shape[d] for d in lhs_spec[2:]), lhs.shape[lhs_spec[1]])
  w_shape = (*(rhs.shape[d] for d in rhs_spec[2:]), rhs.shape[rhs_spec[1]], rhs.shape[rhs_spec[0]])
  transposed = any(d != 1 for d in dilation)
  if transposed:
    if any(s != 1 for s in strides):
      return None
    strides, padding = dilation, tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(w_shape, padding))
  if (
    rhs.dtype != lhs.dtype
    or eqn.outvars[0].aval.dtype != lhs.dtype
    or p["feature_group_count"] != 1
    or p["batch_group_count"] != 1
    or any(d != 1 for d in (p["rhs_dilation"] or ()))
    or not kernels.supports(x_shape, w_shape, lhs.dtype, strides, padding, transposed)
  ):
    return None
  x = _lhs_channels_last(lhs, dn)  # [N, *S, I]
  k = _rhs_spatial_in_out(rhs, dn)  # [*K, I, O]
  if transposed:
    y = kernels.conv_transpose(x, jax.numpy.flip(k, axis=tuple(range(nd))), strides, padding)
  else:
    y = kernels.conv(x, k, strides, padding)  # [N, *S', O]
  return [_restore_layout(y, dn)]


# Rewrites by name: (primitive name, (eqn, *invals) -> outputs or None when it does not apply).
REWRITES = {
  "transposed_conv": ("conv_general_dilated", _transposed_conv_as_matmul),
  "conv_as_matmul": ("conv_general_dilated", _conv_as_matmul),
  "conv_as_shifted_matmul": ("conv_general_dilated", _conv_as_shifted_matmul),
  "onednn_conv": ("conv_general_dilated", _onednn_conv),
  "conv3d_as_2d": ("conv_general_dilated", _conv3d_as_2d),
  # applied by the tail's interpreter, which sees the convolution's producer (_split_concat_conv)
  "split_concat_conv": ("conv_general_dilated", lambda eqn, *invals: None),
}


def _bind(eqn, invals, rewrites: tuple[str, ...] = ()):
  """``eqn`` applied to ``invals``, as ``jax.core.eval_jaxpr`` applies it, or by the first of the
  named ``rewrites`` that applies to it."""
  for name in rewrites:
    primitive, rewrite = REWRITES[name]
    if eqn.primitive.name == primitive:
      out = rewrite(eqn, *invals)
      if out is not None:
        return out
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


def _run_trunk(
  level: _Level, consts, invals, residuals: list, top: bool, rewrites: tuple = (), held: tuple[bool, ...] = ()
) -> list:
  """Evaluates the known equations and appends each known value that the tail reads, once, in a
  fixed order (the order :func:`_run_tail` reads them back). Unknown values come out as ``None``.

  The tail has some values without reading them back: the constants, and the inputs of a nested
  level (``held``, per input) whose value the enclosing level of the tail already has (a literal, a
  constant or a value it has read back). Those are never appended."""
  env: dict = {}
  emitted: set = {id(v) for v in level.jaxpr.constvars}
  emitted |= {id(v) for v, h in zip(level.jaxpr.invars, held) if h}
  _write(env, level.jaxpr.constvars, consts)
  _write(env, level.jaxpr.invars, invals)

  def emit(vars_):
    for v in _known_reads(level, vars_):
      if id(v) not in emitted:
        emitted.add(id(v))
        residuals.append(env[id(v)])

  for eqn, kind in zip(level.jaxpr.eqns, level.kinds):
    if kind == "known":
      _write(env, eqn.outvars, _bind(eqn, [_read(env, v) for v in eqn.invars], rewrites))
    elif kind == "unknown":
      emit(eqn.invars)
    elif isinstance(kind, _Mapped):
      emit([eqn.invars[i] for i in kind.tail_consts])
      _write(env, eqn.outvars, _run_mapped_trunk(kind, eqn, [_read(env, v) for v in eqn.invars], residuals, rewrites))
    else:
      inner = _inner_closed(eqn)
      held = tuple(_is_literal(v) or id(v) in emitted for v in eqn.invars)
      _write(
        env,
        eqn.outvars,
        _run_trunk(kind, inner.consts, [_read(env, v) for v in eqn.invars], residuals, False, rewrites, held),
      )
  if top:
    emit(level.jaxpr.outvars)
  return [None if not _is_literal(v) and id(v) in level.unknown_vars else _read(env, v) for v in level.jaxpr.outvars]


# Primitives that open a new rematerialisation segment: the layers' heavy operations.
_SEGMENT_STARTS = frozenset({"conv_general_dilated", "dot_general"})


def _segments(level: _Level) -> list[list[int]]:
  """The tail's equations in runs that each start at a convolution or matrix product (one layer
  with its normalisation and activation); a nested level is a run of its own."""
  runs: list[list[int]] = []
  for i, (eqn, kind) in enumerate(zip(level.jaxpr.eqns, level.kinds)):
    if kind == "known":
      continue
    if kind != "unknown" or not runs or eqn.primitive.name in _SEGMENT_STARTS or level.kinds[runs[-1][0]] != "unknown":
      runs.append([i])
    else:
      runs[-1].append(i)
  return runs


def _eval_run(eqns, rewrites, in_ids, out_ids, *values):
  """Evaluates a run of equations on the values of its inputs (``in_ids``); returns ``out_ids``'s."""
  local = dict(zip(in_ids, values))
  for eqn in eqns:
    _write(local, eqn.outvars, _bind(eqn, [_read(local, v) for v in eqn.invars], rewrites))
  return [local[i] for i in out_ids]


def _run_tail(level: _Level, consts, invals, residuals, top: bool, rewrites: tuple = (), remat: bool = False) -> list:
  """Evaluates the unknown equations, reading the trunk's values back from the residual iterator.
  Known outputs of a nested level come out as ``None`` (the enclosing level has them as residuals).

  With ``remat`` each run of :func:`_segments` is one ``jax.checkpoint``: the backward pass keeps
  only the values passed between runs and recomputes the rest of each run when it needs it."""
  env: dict = {}
  _write(env, level.jaxpr.constvars, consts)
  _write(env, level.jaxpr.invars, invals)
  eqns = level.jaxpr.eqns

  def pull(vars_):
    for v in _known_reads(level, vars_):
      if id(v) not in env:
        env[id(v)] = next(residuals)

  runs = _segments(level) if remat else [[i] for i, k in enumerate(level.kinds) if k != "known"]
  producers = {id(v): i for i, eqn in enumerate(eqns) for v in eqn.outvars}
  needed_after = _last_reads(level) if remat else {}
  for run in runs:
    kind = level.kinds[run[0]]
    if isinstance(kind, _Mapped):
      eqn = eqns[run[0]]
      pull([eqn.invars[i] for i in kind.tail_consts])
      _write(
        env, eqn.outvars, _run_mapped_tail(kind, eqn, [_read(env, v) for v in eqn.invars], residuals, rewrites, remat)
      )
      continue
    if kind != "unknown":
      eqn = eqns[run[0]]
      inner = _inner_closed(eqn)
      invals = [_read(env, v) for v in eqn.invars]
      if eqn.primitive.name in _CHECKPOINTS:
        outs = _checkpointed_tail(kind, inner.consts, invals, residuals, rewrites, remat, eqn.params)
      else:
        outs = _run_tail(kind, inner.consts, invals, residuals, False, rewrites, remat)
      _write(env, eqn.outvars, outs)
      continue
    for i in run:
      pull(eqns[i].invars)
    if not remat:
      eqn = eqns[run[0]]
      out = _split_concat_conv(level, producers, eqn, env, rewrites) if "split_concat_conv" in rewrites else None
      if out is None:
        out = _bind(eqn, [_read(env, v) for v in eqn.invars], rewrites)
      _write(env, eqn.outvars, out)
      continue
    defined = {id(v) for i in run for v in eqns[i].outvars}
    in_vars = {id(v): v for i in run for v in eqns[i].invars if not _is_literal(v) and id(v) not in defined}
    out_vars = [
      v
      for i in run
      for v in eqns[i].outvars
      if not isinstance(v, jex_core.DropVar) and needed_after.get(id(v), -1) > run[-1]
    ]
    fn = functools.partial(_eval_run, [eqns[i] for i in run], rewrites, tuple(in_vars), tuple(id(v) for v in out_vars))
    _write(env, out_vars, jax.checkpoint(fn)(*[env[i] for i in in_vars]))
  if top:
    pull(level.jaxpr.outvars)
    return [_read(env, v) for v in level.jaxpr.outvars]
  # A nested level gives its known outputs as None even when it holds them (a residual it read, an
  # input, a literal): the enclosing trunk hands them over when the enclosing tail reads them.
  return [_read(env, v) if _is_tail_value(level, v) else None for v in level.jaxpr.outvars]


def _checkpointed_tail(level: _Level, consts, invals, residuals, rewrites: tuple, remat: bool, params: dict) -> list:
  """The tail part of a ``jax.checkpoint`` block, as one ``jax.checkpoint`` with the block's settings.

  The block reads its trunk values from ``residuals`` while it is traced (``jax.checkpoint`` traces
  once, at the call), so they enter the checkpoint as closed-over inputs: the backward pass keeps the
  block's inputs and residuals and recomputes everything else of the block.
  """
  present = [i for i, x in enumerate(invals) if x is not None]

  def block(*values):
    return _run_tail(level, consts, _filled(invals, present, values), residuals, False, rewrites, remat)

  checkpointed = jax.checkpoint(block, prevent_cse=params.get("prevent_cse", True), policy=params.get("policy"))
  return checkpointed(*[invals[i] for i in present])


def _split_concat_conv(level: _Level, producers: dict, eqn, env: dict, rewrites: tuple):
  """A convolution of a feature-axis concatenation of tail values and trunk values (a U-Net decoder
  layer reading ``[up(x), skip]``), as the sum of one convolution per part, with the kernel sliced to
  match; ``None`` when ``eqn`` is not such a convolution.

  The value is the same up to float rounding; the gradient is cheaper: the backward pass computes the
  input gradient of the tail part only, where one convolution of the concatenation computes it for the
  skip connection too (and drops it; ``docs/performance.md``). Float32 only; part of
  :data:`scribblejax.refinement.backend.ONEDNN_REWRITES` (unmeasured on GPUs, where two convolutions cost
  two launches); not applied under ``remat``.
  """
  if eqn.primitive.name != "conv_general_dilated" or _is_literal(eqn.invars[0]):
    return None
  p = eqn.params
  source = producers.get(id(eqn.invars[0]))
  if source is None or level.kinds[source] != "unknown" or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    return None
  concat = level.jaxpr.eqns[source]
  dn = p["dimension_numbers"]
  if concat.primitive.name != "concatenate" or concat.params["dimension"] != dn.lhs_spec[1]:
    return None
  known = [not _is_literal(v) and id(v) not in level.unknown_vars for v in concat.invars]
  if all(known) or not any(known) or any(_is_literal(v) for v in concat.invars):
    return None
  if concat.outvars[0].aval.dtype != np.float32:  # partial sums rounded in bf16 would lose precision
    return None
  parts = [_read(env, v) for v in concat.invars]
  rhs = _read(env, eqn.invars[1])
  axis, offset, total = dn.rhs_spec[1], 0, None
  for part in parts:
    width = part.shape[dn.lhs_spec[1]]
    kernel = jax.lax.slice_in_dim(rhs, offset, offset + width, axis=axis)
    offset += width
    (out,) = _bind(eqn, [part, kernel], rewrites)
    total = out if total is None else total + out
  return [total]


def _last_reads(level: _Level) -> dict:
  """For each variable, the index of the last equation that reads it (the jaxpr's outputs count as
  read after the last equation)."""
  last: dict = {}
  for i, eqn in enumerate(level.jaxpr.eqns):
    for v in eqn.invars:
      if not _is_literal(v):
        last[id(v)] = i
  for v in level.jaxpr.outvars:
    if not _is_literal(v):
      last[id(v)] = len(level.jaxpr.eqns)
  return last


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def _struct(x) -> jax.ShapeDtypeStruct:
  aval = jax.typeof(x)
  return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))


def structure_key(tree) -> tuple:
  """A hashable key of a pytree's structure, leaf shapes and dtypes (arrays, tracers or
  ``jax.ShapeDtypeStruct``), for caches of traces; :func:`key_leaves` gives the leaves back abstractly."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple(map(_leaf_key, leaves))


def _leaf_key(x) -> tuple:
  if isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer):
    # concrete arrays: their own attributes (jax.typeof builds an abstract value, which is slower, and
    # refine computes these keys at every call)
    return tuple(x.shape), x.dtype.str, bool(getattr(x, "weak_type", False))
  s = _struct(x)
  return tuple(s.shape), np.dtype(s.dtype).str, bool(s.weak_type)


def key_leaves(key: tuple) -> list:
  """The ``jax.ShapeDtypeStruct`` leaves described by a :func:`structure_key`."""
  return [jax.ShapeDtypeStruct(s, np.dtype(d), weak_type=w) for s, d, w in key[1]]


@functools.lru_cache(maxsize=64)
def _unzip(fn, tunable_key, frozen_key, image_key):
  """Traces ``fn`` once per (function, structures, shapes) and plans the unzipping."""
  keys = (tunable_key, frozen_key, image_key)
  structs = [key_leaves(key) for key in keys]

  def flat_fn(*flat):
    return fn(*(jax.tree.unflatten(key[0], leaves) for key, leaves in zip(keys, flat)))

  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*structs)
  unknown_in = (True,) * len(structs[0]) + (False,) * (len(structs[1]) + len(structs[2]))
  level = _plan(closed.jaxpr, unknown_in)
  # the residual shapes, from an abstract evaluation of the trunk
  n_tunable = len(structs[0])
  residual_shapes = jax.eval_shape(
    lambda known: _collect(level, closed.consts, [None] * n_tunable + list(known)), structs[1] + structs[2]
  )
  return closed.consts, level, n_tunable, jax.tree.structure(out_shape), tuple(residual_shapes)


def _collect(level, consts, invals, rewrites: tuple = ()) -> list:
  residuals: list = []
  _run_trunk(level, consts, invals, residuals, True, rewrites)
  return residuals


def partition(
  fn: Callable, tunable: Any, frozen: Any, image: Any, *, rewrites: tuple[str, ...] | None = None, remat: bool = False
) -> Partition:
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
    rewrites: names from :data:`REWRITES` of faster equivalent forms for some operations, tried in
      order: ``"transposed_conv"`` (a transposed convolution whose stride equals its kernel, as a
      matrix product), ``"conv3d_as_2d"`` (a stride-1 3D convolution as a 2D one on stacked shifted
      copies), ``"conv_as_matmul"`` (every stride-1 convolution as patches and a matrix product,
      for ``vmap`` over per-example weights), ``"onednn_conv"`` (float32 convolutions on oneDNN,
      CPU only; :mod:`scribblejax.kernels`) and ``"split_concat_conv"`` (a convolution of
      concatenated tail and trunk values as one convolution per part, in the tail without ``remat``).
      ``None``: :func:`scribblejax.refinement.backend.default_rewrites`.
    remat: rematerialise in the tail's backward pass: each layer (a run of equations from one
      convolution or matrix product to the next) is one ``jax.checkpoint``, so the backward pass keeps
      only the values passed between layers instead of every intermediate.

  Returns:
    A :class:`Partition`: ``tail(tunable, trunk(frozen, image))`` equals ``fn(tunable, frozen, image)``
    up to float rounding (exactly, without rewrites).
  """
  rewrites = backend.default_rewrites() if rewrites is None else rewrites
  unknown = [r for r in rewrites if r not in REWRITES]
  if unknown:
    raise ValueError(f"unknown rewrite(s) {unknown}; choose from {sorted(REWRITES)}")
  if "onednn_conv" in rewrites:
    kernels.resolve_conv_backend("onednn")  # a clear error where the kernels cannot run
  rewrites = tuple(rewrites)
  consts, level, n_tunable, out_treedef, residual_shapes = _unzip(
    fn, structure_key(tunable), structure_key(frozen), structure_key(image)
  )

  def trunk(frozen, image):
    return _collect(level, consts, [None] * n_tunable + jax.tree.leaves(frozen) + jax.tree.leaves(image), rewrites)

  def tail(tunable, residuals):
    leaves = jax.tree.leaves(tunable)
    if len(leaves) != n_tunable or len(residuals) != len(residual_shapes):
      raise ValueError("tail called with tunable parameters or residuals of another structure")
    n_rest = len(level.jaxpr.invars) - n_tunable
    it = iter(residuals)
    outs = _run_tail(level, consts, leaves + [None] * n_rest, it, True, rewrites, remat)
    return jax.tree.unflatten(out_treedef, outs)

  return Partition(trunk, tail, residual_shapes)
