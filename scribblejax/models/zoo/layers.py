"""Torch-equivalent NNX layers, the building blocks of the imported architectures (:mod:`scribblejax.models.zoo`).

Layers here compute exactly what their torch namesakes compute, channels-last:

* :class:`Conv` / :class:`ConvTranspose` take torch's explicit symmetric ``padding`` (never Flax's
  ``'SAME'``, which pads asymmetrically for even strides) and ``output_padding``;
* norms use torch's epsilon and a two-pass (not "fast") variance; :class:`BatchNorm` uses running
  statistics (``nnx.BatchStat``) as torch does in ``eval()``;
* :class:`Activation` includes PReLU with one or per-channel slopes.

Norms and activations are built from small JSON specs (:func:`make_norm`, :class:`Activation`), which is
how ``model.json`` states them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scribblejax.models import init


class ConversionError(ValueError):
  """An architecture option, or a checkpoint, that the imported networks do not support (keys, shapes or
  config). Raised by the architectures' constructors and by the converters (:mod:`scribblejax.convert`)."""


def as_tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
  """``3 -> (3, 3)`` for ``n == 2``; sequences pass through (length checked)."""
  if isinstance(value, (int, np.integer)):
    return (int(value),) * n
  value = tuple(int(v) for v in value)
  if len(value) != n:
    raise ConversionError(f"expected {n} values, got {value}")
  return value


def _normal(rngs: nnx.Rngs, shape: Sequence[int], std: float) -> jax.Array:
  """Normal(0, std) initial values drawn with NumPy (:mod:`scribblejax.models.init`): building a large
  converted network, whose values are then overwritten, compiles one tiny draw instead of one XLA program per
  kernel shape, and it still builds under ``nnx.eval_shape``."""
  return init.normal(std)(rngs.params(), tuple(shape))


def _dims(n: int) -> tuple[str, str, str]:
  spatial = "DHW"[-n:] if n <= 3 else None
  if spatial is None:
    raise ConversionError(f"only 1D, 2D and 3D networks are supported, got {n}D")
  return (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")


# ----------------------------------------------------------------------------- layers


class Conv(nnx.Module):
  """``torch.nn.ConvNd`` channels-last: symmetric explicit padding, stride, dilation, groups.

  Args:
    in_channels: input channels.
    out_channels: output channels.
    kernel_size: int or one per spatial axis.
    spatial_dims: 1, 2 or 3.
    stride: int or per axis.
    padding: torch's symmetric padding, int or per axis.
    dilation: int or per axis.
    groups: feature groups.
    use_bias: whether the conv has a bias.
    rngs: random generators for initialisation.
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size,
    *,
    spatial_dims: int,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    use_bias: bool = True,
    rngs: nnx.Rngs,
  ):
    n = spatial_dims
    self.kernel_size = as_tuple(kernel_size, n)
    self.stride = as_tuple(stride, n)
    self.padding = tuple((p, p) for p in as_tuple(padding, n))
    self.dilation = as_tuple(dilation, n)
    self.groups = groups
    fan_in = in_channels // groups * math.prod(self.kernel_size)
    shape = (*self.kernel_size, in_channels // groups, out_channels)
    self.kernel = nnx.Param(_normal(rngs, shape, 1.0 / math.sqrt(fan_in)))
    self.bias = nnx.Param(jnp.zeros((out_channels,))) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
      x,
      self.kernel[...],
      self.stride,
      self.padding,
      rhs_dilation=self.dilation,
      dimension_numbers=_dims(len(self.stride)),
      feature_group_count=self.groups,
      precision=jax.lax.Precision.HIGHEST,
    )
    return y + self.bias[...] if self.bias is not None else y


class ConvTranspose(nnx.Module):
  """``torch.nn.ConvTransposeNd`` channels-last, including ``padding`` and ``output_padding``.

  Computed as a convolution of the stride-dilated input with the spatially flipped kernel, padded by
  ``dilation * (k - 1) - padding`` before and that plus ``output_padding`` after: the output size is
  torch's ``(n - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1``.
  """

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size,
    *,
    spatial_dims: int,
    stride=1,
    padding=0,
    output_padding=0,
    dilation=1,
    use_bias: bool = True,
    rngs: nnx.Rngs,
  ):
    n = spatial_dims
    self.kernel_size = as_tuple(kernel_size, n)
    self.stride = as_tuple(stride, n)
    self.dilation = as_tuple(dilation, n)
    pad, out_pad = as_tuple(padding, n), as_tuple(output_padding, n)
    self.padding = tuple(
      (d * (k - 1) - p, d * (k - 1) - p + o) for k, p, o, d in zip(self.kernel_size, pad, out_pad, self.dilation)
    )
    shape = (*self.kernel_size, in_channels, out_channels)
    self.kernel = nnx.Param(_normal(rngs, shape, 1.0 / math.sqrt(in_channels)))
    self.bias = nnx.Param(jnp.zeros((out_channels,))) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    n = len(self.stride)
    kernel = jnp.flip(self.kernel[...], axis=tuple(range(n)))
    y = jax.lax.conv_general_dilated(
      x,
      kernel,
      (1,) * n,
      self.padding,
      lhs_dilation=self.stride,
      rhs_dilation=self.dilation,
      dimension_numbers=_dims(n),
      precision=jax.lax.Precision.HIGHEST,
    )
    return y + self.bias[...] if self.bias is not None else y


def _moments(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance computed in two passes (as torch does, not Flax's fast variance)."""
  mean = jnp.mean(x, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
  return mean, var


class InstanceNorm(nnx.Module):
  """``torch.nn.InstanceNormNd`` (``track_running_stats=False``): per-sample, per-channel statistics."""

  def __init__(self, channels: int, *, eps: float = 1e-5, affine: bool = False, rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((channels,))) if affine else None
    self.bias = nnx.Param(jnp.zeros((channels,))) if affine else None

  def __call__(self, x: jax.Array) -> jax.Array:
    mean, var = _moments(x, tuple(range(1, x.ndim - 1)))
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return y * self.scale[...] + self.bias[...] if self.scale is not None else y


class GroupNorm(nnx.Module):
  """``torch.nn.GroupNorm``: statistics per sample over each group of channels and all positions."""

  def __init__(
    self, channels: int, *, groups: int, eps: float = 1e-5, affine: bool = True, rngs: nnx.Rngs | None = None
  ):
    del rngs
    if channels % groups:
      raise ConversionError(f"GroupNorm: {channels} channels do not split into {groups} groups")
    self.groups, self.eps = groups, eps
    self.scale = nnx.Param(jnp.ones((channels,))) if affine else None
    self.bias = nnx.Param(jnp.zeros((channels,))) if affine else None

  def __call__(self, x: jax.Array) -> jax.Array:
    grouped = x.reshape(*x.shape[:-1], self.groups, x.shape[-1] // self.groups)
    axes = (*range(1, x.ndim - 1), x.ndim)
    mean, var = _moments(grouped, axes)
    y = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return y * self.scale[...] + self.bias[...] if self.scale is not None else y


class BatchNorm(nnx.Module):
  """``torch.nn.BatchNormNd`` in ``eval()``: normalises with the running statistics."""

  def __init__(self, channels: int, *, eps: float = 1e-5, affine: bool = True, rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = eps
    self.mean = nnx.BatchStat(jnp.zeros((channels,)))
    self.var = nnx.BatchStat(jnp.ones((channels,)))
    self.scale = nnx.Param(jnp.ones((channels,))) if affine else None
    self.bias = nnx.Param(jnp.zeros((channels,))) if affine else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = (x - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.eps)
    return y * self.scale[...] + self.bias[...] if self.scale is not None else y


NORM_KINDS = ("instance", "group", "batch")


def make_norm(spec: Mapping[str, Any] | None, channels: int, rngs: nnx.Rngs) -> nnx.Module | None:
  """Builds a norm from a JSON spec such as ``{"kind": "instance", "eps": 1e-5, "affine": True}``.

  Args:
    spec: ``None`` (no norm) or a dict with ``kind`` in :data:`NORM_KINDS`, ``eps``, ``affine`` and,
      for ``group``, ``groups``.
    channels: number of channels normalised.
    rngs: random generators (unused; norms initialise deterministically).

  Raises:
    ConversionError: unknown kind or option.
  """
  if spec is None:
    return None
  spec = dict(spec)
  kind = spec.pop("kind", None)
  allowed = {"instance": {"eps", "affine"}, "batch": {"eps", "affine"}, "group": {"eps", "affine", "groups"}}
  if kind not in allowed or set(spec) - allowed[kind]:
    raise ConversionError(f"unsupported norm spec {dict(spec, kind=kind)}")
  if kind == "instance":
    return InstanceNorm(channels, eps=spec.get("eps", 1e-5), affine=spec.get("affine", False), rngs=rngs)
  if kind == "batch":
    return BatchNorm(channels, eps=spec.get("eps", 1e-5), affine=spec.get("affine", True), rngs=rngs)
  return GroupNorm(
    channels, groups=spec["groups"], eps=spec.get("eps", 1e-5), affine=spec.get("affine", True), rngs=rngs
  )


ACT_KINDS = ("relu", "leaky_relu", "prelu", "elu", "gelu", "tanh", "sigmoid")


class Activation(nnx.Module):
  """A torch activation from a JSON spec, e.g. ``{"kind": "leaky_relu", "negative_slope": 0.01}``.

  ``{"kind": "prelu", "num_parameters": n}`` holds ``n`` (1 or the channel count) learnable slopes,
  initialised to ``init`` (torch's default 0.25).
  """

  def __init__(self, spec: Mapping[str, Any], *, rngs: nnx.Rngs | None = None):
    del rngs
    spec = dict(spec)
    self.kind = spec.pop("kind", None)
    allowed = {
      "relu": set(),
      "leaky_relu": {"negative_slope"},
      "prelu": {"num_parameters", "init"},
      "elu": {"alpha"},
      "gelu": {"approximate"},
      "tanh": set(),
      "sigmoid": set(),
    }
    if self.kind not in allowed or set(spec) - allowed[self.kind]:
      raise ConversionError(f"unsupported activation spec {dict(spec, kind=self.kind)}")
    self.negative_slope = float(spec.get("negative_slope", 0.01))
    self.alpha = float(spec.get("alpha", 1.0))
    self.approximate = spec.get("approximate", "none")
    if self.approximate not in ("none", "tanh"):
      raise ConversionError(f"unsupported GELU approximation {self.approximate!r}")
    self.weight = (
      nnx.Param(jnp.full((int(spec.get("num_parameters", 1)),), float(spec.get("init", 0.25))))
      if self.kind == "prelu"
      else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == "relu":
      return jax.nn.relu(x)
    if self.kind == "leaky_relu":
      return jnp.where(x >= 0, x, self.negative_slope * x)
    if self.kind == "prelu":
      return jnp.where(x >= 0, x, self.weight[...] * x)
    if self.kind == "elu":
      return jnp.where(x > 0, x, self.alpha * jnp.expm1(x))
    if self.kind == "gelu":
      return jax.nn.gelu(x, approximate=self.approximate == "tanh")
    if self.kind == "tanh":
      return jnp.tanh(x)
    return jax.nn.sigmoid(x)


def max_pool(x: jax.Array, window: Sequence[int], stride: Sequence[int], padding: Sequence[int] = None) -> jax.Array:
  """``torch.nn.MaxPoolNd`` (``ceil_mode=False``) channels-last, with -inf symmetric padding."""
  n = len(window)
  padding = [(0, 0)] + [(p, p) for p in (padding or (0,) * n)] + [(0, 0)]
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *stride, 1), padding)


def avg_pool(x: jax.Array, window: Sequence[int]) -> jax.Array:
  """``torch.nn.AvgPoolNd(window, window)``: non-overlapping mean, trailing remainder dropped."""
  summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, *window, 1), (1, *window, 1), "VALID")
  return summed / math.prod(window)


def upsample_nearest(x: jax.Array, factor: Sequence[int]) -> jax.Array:
  """``F.interpolate(scale_factor=f, mode="nearest")`` for integer factors: repeat each element."""
  for axis, f in enumerate(factor, start=1):
    x = jnp.repeat(x, f, axis=axis)
  return x


def _linear_axis(x: jax.Array, axis: int, size: int, align_corners: bool) -> jax.Array:
  """Linear interpolation of one axis to ``size`` samples with torch's source-index convention."""
  n = x.shape[axis]
  out = jnp.arange(size, dtype=jnp.float32)
  if align_corners:
    src = out * ((n - 1) / (size - 1)) if size > 1 else jnp.zeros_like(out)
  else:
    src = jnp.maximum((out + 0.5) * (n / size) - 0.5, 0.0)
  lo = jnp.clip(jnp.floor(src).astype(jnp.int32), 0, n - 1)
  hi = jnp.minimum(lo + 1, n - 1)
  w = (src - lo).reshape((-1,) + (1,) * (x.ndim - axis - 1))
  return jnp.take(x, lo, axis=axis) * (1 - w) + jnp.take(x, hi, axis=axis) * w


def resize_linear(x: jax.Array, size: Sequence[int], *, align_corners: bool) -> jax.Array:
  """``F.interpolate(size=size, mode="(bi|tri)linear", align_corners=...)`` channels-last."""
  for axis, s in enumerate(size, start=1):
    x = _linear_axis(x, axis, int(s), align_corners)
  return x
