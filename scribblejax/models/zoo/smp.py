"""segmentation_models_pytorch ``Unet`` with ResNet / ResNeXt encoders in Flax NNX.

:class:`Unet` computes what ``smp.Unet(encoder_name="resnet*", ...)`` computes in ``eval()`` (batch
norms use their running statistics), channels-last: input ``float32[batch, H, W, in_channels]``, logits
``[batch, H, W, classes]``. Any size the original accepts works (smp >= 0.5 resizes each decoder stage
to its skip's size, so odd sizes run too; older smp needed multiples of ``2 ** encoder_depth``).

Constructor arguments are smp's own (JSON values), so a checkpoint converts
(:mod:`scribblejax.convert.smp_unet`) with::

  scribblejax convert unet.pth --out DIR --arch segmentation_models_pytorch.Unet \\
      --kwargs '{"encoder_name": "resnet34", "in_channels": 1, "classes": 4}'

Supported, and everything else refused with a :class:`~scribblejax.models.zoo.layers.ConversionError`:

* ``encoder_name``: the torchvision ResNets of :data:`ENCODERS` (``resnet18`` ... ``resnet152``,
  ``resnext50_32x4d``, ``resnext101_32x*d``); ``encoder_depth`` 1 to 5; ``output_stride`` 32, 16 or 8
  (dilated ``layer3``/``layer4`` as smp's ``make_dilated`` builds them); ``encoder_weights`` is ignored
  (the weights come from the checkpoint);
* ``decoder_use_norm`` (``decoder_use_batchnorm`` in smp < 0.5, still accepted): batch norm, no norm,
  or instance norm (without running statistics); ``decoder_attention_type=None``;
  ``decoder_interpolation`` ``"nearest"`` (default), ``"nearest-exact"`` or ``"bilinear"``;
* ``activation`` ``None``/``"identity"`` (the network must return logits); ``aux_params`` is accepted
  and its classification head's weights are dropped (the segmentation logits do not depend on it).

Parameter paths follow torch's module names where they can (``encoder/layers/1/0/convs/2/conv/kernel``
for ``encoder.layer2.0.conv3.weight``); the layer order is one layer per convolution with its norm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scribblejax.models.zoo.layers import Conv, ConversionError, make_norm, resize_linear

LayerPath = tuple[Any, ...]

# encoder_name -> (block, blocks per stage, groups, width_per_group), as smp's ``resnet_encoders`` table.
ENCODERS: dict[str, tuple[str, tuple[int, int, int, int], int, int]] = {
  "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
  "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
  "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
  "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
  "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
  "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
  "resnext101_32x4d": ("bottleneck", (3, 4, 23, 3), 32, 4),
  "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
  "resnext101_32x16d": ("bottleneck", (3, 4, 23, 3), 32, 16),
  "resnext101_32x32d": ("bottleneck", (3, 4, 23, 3), 32, 32),
  "resnext101_32x48d": ("bottleneck", (3, 4, 23, 3), 32, 48),
}
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear")
_STAGE_PLANES = (64, 128, 256, 512)


# ----------------------------------------------------------------------------- options


def decoder_norm_spec(use_norm) -> dict | None:
  """smp's ``decoder_use_norm`` (or the older ``decoder_use_batchnorm``) -> a norm spec or ``None``.

  Accepts ``True``/``"batchnorm"``, ``False``/``"identity"``, ``"instancenorm"`` and
  ``{"type": ..., **torch_kwargs}`` for those types.

  Raises:
    ConversionError: layer norm, in-place activated batch norm, or options not understood.
  """
  if use_norm is True:
    params = {"type": "batchnorm"}
  elif use_norm is False:
    params = {"type": "identity"}
  elif isinstance(use_norm, str):
    params = {"type": use_norm.lower()}
  elif isinstance(use_norm, Mapping) and "type" in use_norm:
    params = dict(use_norm)
  else:
    raise ConversionError(f"cannot parse decoder_use_norm={use_norm!r}")
  kind = params.pop("type")
  params.pop("momentum", None)  # training only
  if kind == "identity" and not params:
    return None
  if kind == "batchnorm":
    spec = {"kind": "batch", "eps": float(params.pop("eps", 1e-5)), "affine": bool(params.pop("affine", True))}
    if not params.pop("track_running_stats", True):
      raise ConversionError("decoder batch norm without running statistics is not supported")
  elif kind == "instancenorm":
    spec = {"kind": "instance", "eps": float(params.pop("eps", 1e-5)), "affine": bool(params.pop("affine", False))}
    if params.pop("track_running_stats", False):
      raise ConversionError("decoder instance norm with running statistics is not supported")
  elif kind == "layernorm":
    raise ConversionError(
      "decoder_use_norm='layernorm' is not supported (smp's LayerNorm normalises the width axis of NCHW tensors)"
    )
  elif kind == "inplace":
    raise ConversionError("decoder_use_norm='inplace' (InPlaceABN) is not supported")
  else:
    raise ConversionError(f"unsupported decoder_use_norm={use_norm!r}")
  if params:
    raise ConversionError(f"unsupported options {sorted(params)} in decoder_use_norm={use_norm!r}")
  return spec


def _stage_dilations(output_stride: int) -> tuple[int, int, int, int]:
  """Dilation of ``layer1..layer4`` for smp's ``output_stride`` (a dilated stage has stride 1)."""
  table = {32: (1, 1, 1, 1), 16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}
  if output_stride not in table:
    raise ConversionError(f"output_stride must be 32, 16 or 8, got {output_stride!r}")
  return table[output_stride]


def _nearest_indices(in_size: int, out_size: int, exact: bool) -> np.ndarray:
  """Source indices of torch's ``nearest`` / ``nearest-exact`` interpolation (CPU kernel, float32 scale)."""
  out = np.arange(out_size)
  if not exact and out_size == in_size:
    return out
  if not exact and out_size == 2 * in_size:
    return out >> 1
  scale = np.float32(in_size) / np.float32(out_size)
  if exact:
    src = np.floor(((out + 0.5) * np.float64(scale)).astype(np.float32))
  else:
    src = np.floor(out.astype(np.float32) * scale)
  return np.minimum(src.astype(np.int64), in_size - 1)


def resize(x: jax.Array, size: Sequence[int], mode: str) -> jax.Array:
  """``F.interpolate(x, size=size, mode=mode)`` channels-last, for the modes in :data:`INTERPOLATIONS`."""
  if mode == "bilinear":
    return resize_linear(x, size, align_corners=False)
  for axis, s in enumerate(size, start=1):
    if x.shape[axis] != s or mode == "nearest-exact":
      x = jnp.take(x, _nearest_indices(x.shape[axis], int(s), mode == "nearest-exact"), axis=axis)
  return x


# ----------------------------------------------------------------------------- layers


class ConvNorm(nnx.Module):
  """A 2D convolution followed by an optional norm (no activation): one layer of the layer order."""

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    norm: dict | None,
    rngs: nnx.Rngs,
  ):
    self.conv = Conv(
      in_ch,
      out_ch,
      kernel,
      spatial_dims=2,
      stride=stride,
      padding=(kernel // 2) * dilation,
      dilation=dilation,
      groups=groups,
      use_bias=norm is None,
      rngs=rngs,
    )
    self.norm = make_norm(norm, out_ch, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(x)
    return self.norm(x) if self.norm is not None else x


_BN = {"kind": "batch", "eps": 1e-5, "affine": True}


class ResidualBlock(nnx.Module):
  """torchvision ``BasicBlock`` (3x3, 3x3) or ``Bottleneck`` (1x1, 3x3 grouped, 1x1; stride on the 3x3).

  ``convs[i]`` is torch's ``conv{i+1}``/``bn{i+1}``; ``downsample`` its ``downsample.0``/``.1``.
  """

  def __init__(
    self,
    kind: str,
    in_ch: int,
    planes: int,
    *,
    stride: int,
    dilation: int,
    groups: int,
    width_per_group: int,
    rngs: nnx.Rngs,
  ):
    c = dict(norm=_BN, rngs=rngs)
    if kind == "basic":
      out_ch = planes
      self.convs = nnx.List(
        [
          ConvNorm(in_ch, planes, 3, stride=stride, dilation=dilation, **c),
          ConvNorm(planes, planes, 3, dilation=dilation, **c),
        ]
      )
    else:
      width = int(planes * (width_per_group / 64.0)) * groups
      out_ch = planes * 4
      self.convs = nnx.List(
        [
          ConvNorm(in_ch, width, 1, **c),
          ConvNorm(width, width, 3, stride=stride, dilation=dilation, groups=groups, **c),
          ConvNorm(width, out_ch, 1, **c),
        ]
      )
    self.downsample = ConvNorm(in_ch, out_ch, 1, stride=stride, **c) if stride != 1 or in_ch != out_ch else None
    self.out_channels = out_ch

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x
    for i, conv in enumerate(self.convs):
      y = conv(y)
      if i < len(self.convs) - 1:
        y = jax.nn.relu(y)
    identity = self.downsample(x) if self.downsample is not None else x
    return jax.nn.relu(y + identity)


class ResNetEncoder(nnx.Module):
  """smp's ``ResNetEncoder`` up to ``depth``: stem (7x7 stride 2 conv, BN, ReLU), 3x3 max pool, ``layer1..``.

  ``__call__`` returns the ``depth + 1`` features smp's encoder returns: the input, then one per stage.
  Stages beyond ``depth`` (present, unused, in torch's state dict) are not built.
  """

  def __init__(self, encoder_name: str, in_channels: int, depth: int, output_stride: int, *, rngs: nnx.Rngs):
    kind, blocks, groups, width_per_group = ENCODERS[encoder_name]
    dilations = _stage_dilations(output_stride)
    self.stem = ConvNorm(in_channels, 64, 7, stride=2, norm=_BN, rngs=rngs)
    layers, ch = [], 64
    for k in range(depth - 1):
      stride = 1 if k == 0 or dilations[k] > 1 else 2
      stage = []
      for j in range(blocks[k]):
        block = ResidualBlock(
          kind,
          ch,
          _STAGE_PLANES[k],
          stride=stride if j == 0 else 1,
          dilation=dilations[k],
          groups=groups,
          width_per_group=width_per_group,
          rngs=rngs,
        )
        stage.append(block)
        ch = block.out_channels
      layers.append(nnx.List(stage))
    self.layers = nnx.List(layers)
    self.out_channels = (in_channels, 64) + tuple((p if kind == "basic" else 4 * p) for p in _STAGE_PLANES[: depth - 1])

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    features = [x]
    x = jax.nn.relu(self.stem(x))
    features.append(x)
    for k, stage in enumerate(self.layers):
      if k == 0:
        x = jax.lax.reduce_window(
          x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
        )
      for block in stage:
        x = block(x)
      features.append(x)
    return features


class DecoderBlock(nnx.Module):
  """smp's ``UnetDecoderBlock`` (no attention): resize to the skip's size, concat ``[x, skip]``, two conv-norm-ReLU."""

  def __init__(self, in_ch: int, skip_ch: int, out_ch: int, norm: dict | None, *, rngs: nnx.Rngs):
    self.conv1 = ConvNorm(in_ch + skip_ch, out_ch, 3, norm=norm, rngs=rngs)
    self.conv2 = ConvNorm(out_ch, out_ch, 3, norm=norm, rngs=rngs)

  def __call__(self, x: jax.Array, size: Sequence[int], skip: jax.Array | None, mode: str) -> jax.Array:
    x = resize(x, size, mode)
    if skip is not None:
      x = jnp.concatenate([x, skip], axis=-1)
    return jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))


class Unet(nnx.Module):
  """``segmentation_models_pytorch.Unet`` with a torchvision ResNet/ResNeXt encoder, in ``eval()``, channels-last.

  Args:
    encoder_name: a key of :data:`ENCODERS`.
    encoder_depth: encoder stages used, 1 to 5.
    encoder_weights: ignored (smp's pretrained-weights name; the weights come from the checkpoint).
    decoder_use_norm: see :func:`decoder_norm_spec`.
    decoder_channels: one output width per decoder block (``encoder_depth`` entries).
    decoder_attention_type: must be ``None``.
    decoder_interpolation: one of :data:`INTERPOLATIONS`.
    in_channels: image channels.
    classes: output channels (logits).
    activation: ``None`` or ``"identity"``.
    aux_params: smp's classification-head options; the head is not built (its weights are dropped).
    decoder_use_batchnorm: smp < 0.5's name of ``decoder_use_norm``; overrides it when given.
    output_stride: 32, 16 or 8 (smp's ``get_encoder`` option).
    rngs: random generators.

  Raises:
    ConversionError: an option this module does not implement.
  """

  def __init__(
    self,
    encoder_name: str = "resnet34",
    encoder_depth: int = 5,
    encoder_weights: Any = None,
    decoder_use_norm: bool | str | dict = "batchnorm",
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    decoder_attention_type: str | None = None,
    decoder_interpolation: str = "nearest",
    in_channels: int = 3,
    classes: int = 1,
    activation: str | None = None,
    aux_params: dict | None = None,
    *,
    decoder_use_batchnorm: bool | str | None = None,
    output_stride: int = 32,
    rngs: nnx.Rngs,
  ):
    del encoder_weights
    if encoder_name not in ENCODERS:
      raise ConversionError(
        f"segmentation_models_pytorch.Unet encoder {encoder_name!r} is not supported; supported: {', '.join(ENCODERS)}"
      )
    if not isinstance(encoder_depth, int) or not 1 <= encoder_depth <= 5:
      raise ConversionError(f"encoder_depth must be 1 to 5, got {encoder_depth!r}")
    decoder_channels = [int(c) for c in decoder_channels]
    if len(decoder_channels) != encoder_depth:
      raise ConversionError(f"decoder_channels {decoder_channels} needs encoder_depth={encoder_depth} entries")
    if decoder_attention_type is not None:
      raise ConversionError(f"decoder_attention_type={decoder_attention_type!r} is not supported (only None)")
    if decoder_interpolation not in INTERPOLATIONS:
      raise ConversionError(
        f"decoder_interpolation={decoder_interpolation!r} is not supported; supported: {', '.join(INTERPOLATIONS)}"
      )
    if activation not in (None, "identity"):
      raise ConversionError(
        f"activation={activation!r} is not supported: the converted network must return logits (activation None)"
      )
    _check_aux_params(aux_params)
    norm = decoder_norm_spec(decoder_use_batchnorm if decoder_use_batchnorm is not None else decoder_use_norm)
    self.interpolation = decoder_interpolation
    self.encoder = ResNetEncoder(encoder_name, in_channels, encoder_depth, output_stride, rngs=rngs)
    skips = list(self.encoder.out_channels[1:])[::-1]
    ins = [skips[0]] + decoder_channels[:-1]
    self.decoder = nnx.Dict(
      blocks=nnx.List(
        [DecoderBlock(i, s, o, norm, rngs=rngs) for i, s, o in zip(ins, skips[1:] + [0], decoder_channels)]
      )
    )
    self.segmentation_head = Conv(decoder_channels[-1], classes, 3, spatial_dims=2, padding=1, rngs=rngs)
    self.aux_classes = int(aux_params["classes"]) if aux_params else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits ``[batch, H, W, classes]`` for images ``[batch, H, W, in_channels]``."""
    if x.ndim != 4:
      raise ValueError(f"segmentation_models_pytorch.Unet is 2D: expected [batch, H, W, C], got shape {x.shape}")
    features = self.encoder(x)
    sizes = [f.shape[1:3] for f in features][::-1]
    deep = features[1:][::-1]
    y = deep[0]
    for i, block in enumerate(self.decoder["blocks"]):
      y = block(y, sizes[i + 1], deep[i + 1] if i + 1 < len(deep) else None, self.interpolation)
    return self.segmentation_head(y)

  def layer_order(self) -> list[LayerPath]:
    """Stem; per residual block its convs then its downsample; per decoder block conv1, conv2; head."""
    order = [("encoder", "stem")]
    for k, stage in enumerate(self.encoder.layers):
      for j, block in enumerate(stage):
        order += [("encoder", "layers", k, j, "convs", i) for i in range(len(block.convs))]
        if block.downsample is not None:
          order.append(("encoder", "layers", k, j, "downsample"))
    for i in range(len(self.decoder["blocks"])):
      order += [("decoder", "blocks", i, "conv1"), ("decoder", "blocks", i, "conv2")]
    return order + [("segmentation_head",)]


def _check_aux_params(aux_params) -> None:
  if aux_params is None:
    return
  allowed = {"classes", "pooling", "dropout", "activation"}
  if not isinstance(aux_params, Mapping) or "classes" not in aux_params or set(aux_params) - allowed:
    raise ConversionError(f"cannot parse aux_params={aux_params!r} (keys {sorted(allowed)}, 'classes' required)")
