"""nnU-Net v2 networks (dynamic_network_architectures) in Flax NNX.

:class:`PlainConvUNet` and :class:`ResidualEncoderUNet` compute what the torch classes of the same
name compute in ``eval()`` with ``deep_supervision=False`` (only the full-resolution segmentation head),
channels-last. Parameter paths mirror torch's module names (``encoder/stages/2/convs/1/conv/kernel``).
Constructor arguments are JSON values (norm and activation specs of :mod:`scribblejax.models.zoo.layers`);
:func:`scribblejax.convert.nnunet.architecture_kwargs` derives them from an nnU-Net plans file, and
:mod:`scribblejax.convert.nnunet` moves a checkpoint's weights in.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from scribblejax.models.zoo.layers import (
  Activation,
  Conv,
  ConversionError,
  ConvTranspose,
  as_tuple,
  avg_pool,
  make_norm,
)

LayerPath = tuple[Any, ...]


def _per_stage(value, n: int, name: str) -> list:
  if isinstance(value, int):
    return [value] * n
  value = list(value)
  if len(value) != n:
    raise ConversionError(f"{name} needs {n} entries, got {value}")
  return value


class ConvNormAct(nnx.Module):
  """``ConvDropoutNormReLU``: conv (padding ``(k - 1) // 2``), [norm], [nonlin]; dropout is off in eval."""

  def __init__(
    self,
    in_channels,
    out_channels,
    kernel_size,
    stride,
    *,
    spatial_dims,
    conv_bias,
    norm,
    nonlin,
    nonlin_first=False,
    rngs,
  ):
    kernel_size = as_tuple(kernel_size, spatial_dims)
    self.conv = Conv(
      in_channels,
      out_channels,
      kernel_size,
      spatial_dims=spatial_dims,
      stride=stride,
      padding=[(k - 1) // 2 for k in kernel_size],
      use_bias=conv_bias,
      rngs=rngs,
    )
    self.norm = make_norm(norm, out_channels, rngs)
    self.nonlin = Activation(nonlin, rngs=rngs) if nonlin is not None else None
    self.nonlin_first = bool(nonlin_first and norm is not None and nonlin is not None)

  def __call__(self, x):
    x = self.conv(x)
    ops = [self.norm, self.nonlin]
    if self.nonlin_first:
      ops.reverse()
    for op in ops:
      if op is not None:
        x = op(x)
    return x


def _stacked(num, in_ch, out_ch, kernel, stride, common, rngs):
  """``StackedConvBlocks``: the first conv has the stride, the rest stride 1."""
  return nnx.List(
    [
      ConvNormAct(in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else 1, **common, rngs=rngs)
      for i in range(num)
    ]
  )


class StackedConvs(nnx.Module):
  """``StackedConvBlocks`` (parameters under ``convs/<i>``)."""

  def __init__(self, num, in_ch, out_ch, kernel, stride, common, rngs):
    self.convs = _stacked(num, in_ch, out_ch, kernel, stride, common, rngs)

  def __call__(self, x):
    for conv in self.convs:
      x = conv(x)
    return x


class ResidualBlock(nnx.Module):
  """``BasicBlockD`` (two convs) or ``BottleneckD`` (1x1, kxk, 1x1); ResNet-D skip: avg-pool then 1x1 conv."""

  def __init__(self, kind, in_ch, out_ch, bottleneck_ch, kernel, stride, common, rngs):
    n = common["spatial_dims"]
    stride = as_tuple(stride, n)
    plain = dict(common, nonlin=None)
    if kind == "BasicBlockD":
      self.convs = nnx.List(
        [
          ConvNormAct(in_ch, out_ch, kernel, stride, **common, rngs=rngs),
          ConvNormAct(out_ch, out_ch, kernel, 1, **plain, rngs=rngs),
        ]
      )
    elif kind == "BottleneckD":
      self.convs = nnx.List(
        [
          ConvNormAct(in_ch, bottleneck_ch, 1, 1, **common, rngs=rngs),
          ConvNormAct(bottleneck_ch, bottleneck_ch, kernel, stride, **common, rngs=rngs),
          ConvNormAct(bottleneck_ch, out_ch, 1, 1, **plain, rngs=rngs),
        ]
      )
    else:
      raise ConversionError(f"unknown residual block {kind!r}")
    self.pool = stride if any(s != 1 for s in stride) else None
    self.projection = (
      ConvNormAct(in_ch, out_ch, 1, 1, **dict(plain, conv_bias=False), rngs=rngs) if in_ch != out_ch else None
    )
    self.nonlin = Activation(common["nonlin"], rngs=rngs) if common["nonlin"] is not None else None

  def __call__(self, x):
    residual = x
    if self.pool is not None:
      residual = avg_pool(residual, self.pool)
    if self.projection is not None:
      residual = self.projection(residual)
    for conv in self.convs:
      x = conv(x)
    x = x + residual
    return self.nonlin(x) if self.nonlin is not None else x


class Decoder(nnx.Module):
  """``UNetDecoder`` without deep supervision: transposed conv, concat ``[up, skip]``, convs; one head."""

  def __init__(self, features, strides, kernel_sizes, n_conv_decoder, num_classes, common, rngs):
    n = common["spatial_dims"]
    self.transpconvs = nnx.List()
    self.stages = nnx.List()
    for s in range(1, len(features)):
      below, skip = features[-s], features[-(s + 1)]
      self.transpconvs.append(
        ConvTranspose(
          below, skip, strides[-s], spatial_dims=n, stride=strides[-s], use_bias=common["conv_bias"], rngs=rngs
        )
      )
      self.stages.append(StackedConvs(n_conv_decoder[s - 1], 2 * skip, skip, kernel_sizes[-(s + 1)], 1, common, rngs))
    self.seg_layer = Conv(features[0], num_classes, 1, spatial_dims=n, rngs=rngs)

  def __call__(self, skips):
    x = skips[-1]
    for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
      x = stage(jnp.concatenate([up(x), skips[-(s + 2)]], axis=-1))
    return self.seg_layer(x)


def _common_kwargs(spatial_dims, conv_bias, norm, nonlin, nonlin_first=False):
  return dict(spatial_dims=spatial_dims, conv_bias=conv_bias, norm=norm, nonlin=nonlin, nonlin_first=nonlin_first)


def _stage_args(n_stages, spatial_dims, features_per_stage, kernel_sizes, strides):
  features = _per_stage(features_per_stage, n_stages, "features_per_stage")
  kernels = [as_tuple(k, spatial_dims) for k in _per_stage(kernel_sizes, n_stages, "kernel_sizes")]
  strides = [as_tuple(s, spatial_dims) for s in _per_stage(strides, n_stages, "strides")]
  return features, kernels, strides


class PlainConvUNet(nnx.Module):
  """nnU-Net's ``PlainConvUNet`` (inference: no deep supervision), channels-last.

  Args:
    input_channels: image channels.
    num_classes: output channels (logits).
    spatial_dims: 2 or 3.
    n_stages: resolution stages.
    features_per_stage: channels per stage (int or list).
    kernel_sizes: per stage, int or per-axis list.
    strides: per stage, int or per-axis list (first usually 1).
    n_conv_per_stage: encoder convs per stage.
    n_conv_per_stage_decoder: decoder convs per stage (``n_stages - 1`` entries).
    conv_bias: whether convs have biases.
    norm: norm spec (see :func:`scribblejax.models.zoo.layers.make_norm`) or None.
    nonlin: activation spec or None.
    nonlin_first: conv -> nonlin -> norm instead of conv -> norm -> nonlin.
    rngs: random generators.

  Input ``float32[batch, *spatial, input_channels]`` (each spatial size divisible by the product of
  the strides); output logits ``[batch, *spatial, num_classes]``.
  """

  def __init__(
    self,
    input_channels: int,
    num_classes: int,
    spatial_dims: int,
    n_stages: int,
    features_per_stage,
    kernel_sizes,
    strides,
    n_conv_per_stage,
    n_conv_per_stage_decoder,
    conv_bias: bool = False,
    norm: dict | None = None,
    nonlin: dict | None = None,
    nonlin_first: bool = False,
    *,
    rngs: nnx.Rngs,
  ):
    features, kernels, strides = _stage_args(n_stages, spatial_dims, features_per_stage, kernel_sizes, strides)
    n_conv = _per_stage(n_conv_per_stage, n_stages, "n_conv_per_stage")
    n_dec = _per_stage(n_conv_per_stage_decoder, n_stages - 1, "n_conv_per_stage_decoder")
    common = _common_kwargs(spatial_dims, conv_bias, norm, nonlin, nonlin_first)
    self.encoder = nnx.Dict(
      stages=nnx.List(
        [
          StackedConvs(
            n_conv[s], input_channels if s == 0 else features[s - 1], features[s], kernels[s], strides[s], common, rngs
          )
          for s in range(n_stages)
        ]
      )
    )
    self.decoder = Decoder(features, strides, kernels, n_dec, num_classes, common, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    skips = []
    for stage in self.encoder["stages"]:
      x = stage(x)
      skips.append(x)
    return self.decoder(skips)

  def layer_order(self) -> list[LayerPath]:
    """One layer per conv block / transposed conv, in forward order."""
    order = [
      ("encoder", "stages", s, "convs", i)
      for s, stage in enumerate(self.encoder["stages"])
      for i in range(len(stage.convs))
    ]
    return order + _decoder_order(self.decoder)


def _decoder_order(decoder: Decoder) -> list[LayerPath]:
  order = []
  for s, stage in enumerate(decoder.stages):
    order.append(("decoder", "transpconvs", s))
    order += [("decoder", "stages", s, "convs", i) for i in range(len(stage.convs))]
  return order + [("decoder", "seg_layer")]


class ResidualEncoderUNet(nnx.Module):
  """nnU-Net's ``ResidualEncoderUNet`` (ResEnc presets; inference, no deep supervision), channels-last.

  Args are those of :class:`PlainConvUNet` with ``n_blocks_per_stage`` instead of
  ``n_conv_per_stage``, plus ``block`` (``"BasicBlockD"`` or ``"BottleneckD"``),
  ``bottleneck_channels`` (BottleneckD only) and ``stem_channels`` (default ``features_per_stage[0]``).
  """

  def __init__(
    self,
    input_channels: int,
    num_classes: int,
    spatial_dims: int,
    n_stages: int,
    features_per_stage,
    kernel_sizes,
    strides,
    n_blocks_per_stage,
    n_conv_per_stage_decoder,
    conv_bias: bool = False,
    norm: dict | None = None,
    nonlin: dict | None = None,
    block: str = "BasicBlockD",
    bottleneck_channels=None,
    stem_channels: int | None = None,
    *,
    rngs: nnx.Rngs,
  ):
    features, kernels, strides = _stage_args(n_stages, spatial_dims, features_per_stage, kernel_sizes, strides)
    n_blocks = _per_stage(n_blocks_per_stage, n_stages, "n_blocks_per_stage")
    n_dec = _per_stage(n_conv_per_stage_decoder, n_stages - 1, "n_conv_per_stage_decoder")
    bottleneck = (
      _per_stage(bottleneck_channels, n_stages, "bottleneck_channels")
      if bottleneck_channels is not None
      else [None] * n_stages
    )
    if block == "BottleneckD" and None in bottleneck:
      raise ConversionError("BottleneckD needs bottleneck_channels")
    common = _common_kwargs(spatial_dims, conv_bias, norm, nonlin)
    stem_channels = stem_channels or features[0]
    stem = StackedConvs(1, input_channels, stem_channels, kernels[0], 1, common, rngs)
    stages, in_ch = [], stem_channels
    for s in range(n_stages):
      blocks = [
        ResidualBlock(
          block,
          in_ch if b == 0 else features[s],
          features[s],
          bottleneck[s],
          kernels[s],
          strides[s] if b == 0 else 1,
          common,
          rngs,
        )
        for b in range(n_blocks[s])
      ]
      stages.append(nnx.Dict(blocks=nnx.List(blocks)))
      in_ch = features[s]
    self.encoder = nnx.Dict(stem=stem, stages=nnx.List(stages))
    self.decoder = Decoder(features, strides, kernels, n_dec, num_classes, common, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.encoder["stem"](x)
    skips = []
    for stage in self.encoder["stages"]:
      for block in stage["blocks"]:
        x = block(x)
      skips.append(x)
    return self.decoder(skips)

  def layer_order(self) -> list[LayerPath]:
    """Stem, then per block: skip projection (run first), each conv, the final PReLU if any; decoder."""
    order = [("encoder", "stem", "convs", 0)]
    for s, stage in enumerate(self.encoder["stages"]):
      for b, block in enumerate(stage["blocks"]):
        prefix = ("encoder", "stages", s, "blocks", b)
        if block.projection is not None:
          order.append((*prefix, "projection"))
        order += [(*prefix, "convs", i) for i in range(len(block.convs))]
        if block.nonlin is not None and block.nonlin.weight is not None:
          order.append((*prefix, "nonlin"))
    return order + _decoder_order(self.decoder)
