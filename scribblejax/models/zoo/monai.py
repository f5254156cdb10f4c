"""MONAI networks in Flax NNX: ``BasicUNet``, ``UNet``, ``SegResNet``.

Constructor arguments are MONAI's own (``spatial_dims``, ``in_channels``, ``out_channels``, ...), with
``act`` / ``norm`` given as MONAI gives them (``"PRELU"``, ``["instance", {"affine": true}]``); they are
parsed into the specs of :mod:`scribblejax.models.zoo.layers`, and options this module does not implement
are refused. Inputs are channels-last ``[batch, *spatial, in_channels]``. Weights come from a MONAI state
dict through :mod:`scribblejax.convert.monai_nets`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scribblejax.models.zoo.layers import (
  Activation,
  Conv,
  ConversionError,
  ConvTranspose,
  as_tuple,
  make_norm,
  max_pool,
  resize_linear,
)

LayerPath = tuple[Any, ...]


# ----------------------------------------------------------------------------- MONAI act / norm args


def _split(arg) -> tuple[str, dict]:
  """MONAI's ``split_args``: ``"name"`` or ``("name", {kwargs})`` -> (lower-case name, kwargs)."""
  if isinstance(arg, str):
    return arg.lower(), {}
  if isinstance(arg, (list, tuple)) and len(arg) == 2 and isinstance(arg[0], str) and isinstance(arg[1], Mapping):
    return arg[0].lower(), dict(arg[1])
  raise ConversionError(f"cannot parse MONAI layer argument {arg!r}")


def act_spec(act) -> dict | None:
  """MONAI ``act`` argument -> activation spec (``None`` stays ``None``)."""
  if act is None:
    return None
  name, kw = _split(act)
  kw.pop("inplace", None)
  names = {
    "relu": "relu",
    "leakyrelu": "leaky_relu",
    "prelu": "prelu",
    "elu": "elu",
    "gelu": "gelu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
  }
  if name not in names:
    raise ConversionError(f"unsupported MONAI activation {act!r}")
  return {"kind": names[name], **kw}


def norm_spec(norm) -> dict | None:
  """MONAI ``norm`` argument -> norm spec (``None`` stays ``None``)."""
  if norm is None or norm == "":
    return None
  name, kw = _split(norm)
  eps = float(kw.pop("eps", 1e-5))
  kw.pop("momentum", None)
  if name == "instance":
    spec = {"kind": "instance", "eps": eps, "affine": bool(kw.pop("affine", False))}
    if kw.pop("track_running_stats", False):
      raise ConversionError("InstanceNorm with track_running_stats is not supported")
  elif name == "batch":
    spec = {"kind": "batch", "eps": eps, "affine": bool(kw.pop("affine", True))}
    if not kw.pop("track_running_stats", True):
      raise ConversionError("BatchNorm without running statistics is not supported")
  elif name == "group":
    spec = {"kind": "group", "eps": eps, "groups": int(kw.pop("num_groups")), "affine": bool(kw.pop("affine", True))}
  else:
    raise ConversionError(f"unsupported MONAI norm {norm!r}")
  if kw:
    raise ConversionError(f"unsupported options {sorted(kw)} for MONAI norm {name!r}")
  return spec


def _no_dropout(dropout) -> None:
  """Dropout is the identity at inference; only its presence matters (no parameters)."""
  if dropout is not None and not isinstance(dropout, (int, float, str, list, tuple)):
    raise ConversionError(f"cannot parse MONAI dropout {dropout!r}")


class ConvADN(nnx.Module):
  """MONAI ``Convolution``: conv (or transposed conv), then norm / act in ``adn_ordering`` unless conv-only."""

  def __init__(
    self,
    spatial_dims,
    in_ch,
    out_ch,
    *,
    kernel_size=3,
    strides=1,
    act=None,
    norm=None,
    bias=True,
    conv_only=False,
    is_transposed=False,
    adn_ordering="NDA",
    padding=None,
    rngs,
  ):
    k = as_tuple(kernel_size, spatial_dims)
    pad = [(i - 1) // 2 for i in k] if padding is None else padding
    if is_transposed:
      s = as_tuple(strides, spatial_dims)
      self.conv = ConvTranspose(
        in_ch,
        out_ch,
        k,
        spatial_dims=spatial_dims,
        stride=s,
        padding=pad,
        output_padding=[i - 1 for i in s],
        use_bias=bias,
        rngs=rngs,
      )
    else:
      self.conv = Conv(
        in_ch, out_ch, k, spatial_dims=spatial_dims, stride=strides, padding=pad, use_bias=bias, rngs=rngs
      )
    with_adn = not conv_only and (act is not None or norm is not None)
    self.ordering = "".join(c for c in adn_ordering.upper() if c in "NA") if with_adn else ""
    if set(adn_ordering.upper()) - set("NDA"):
      raise ConversionError(f"unsupported adn_ordering {adn_ordering!r}")
    # as MONAI's ADN: a norm or activation whose letter the ordering leaves out is never built
    self.norm = make_norm(norm, out_ch, rngs) if with_adn and "N" in self.ordering else None
    self.act = Activation(act, rngs=rngs) if with_adn and act is not None and "A" in self.ordering else None

  def __call__(self, x):
    x = self.conv(x)
    for op in self.ordering:
      layer = self.norm if op == "N" else self.act
      if layer is not None:
        x = layer(x)
    return x


# ----------------------------------------------------------------------------- BasicUNet


class TwoConv(nnx.Module):
  def __init__(self, dims, in_ch, out_ch, act, norm, bias, rngs):
    self.conv_0 = ConvADN(dims, in_ch, out_ch, act=act, norm=norm, bias=bias, padding=1, rngs=rngs)
    self.conv_1 = ConvADN(dims, out_ch, out_ch, act=act, norm=norm, bias=bias, padding=1, rngs=rngs)

  def __call__(self, x):
    return self.conv_1(self.conv_0(x))


class UpCat(nnx.Module):
  """Upsample ``x`` (deconv k=2 s=2), replicate-pad the end of each axis by one where it falls short of
  the skip (odd sizes), concatenate ``[skip, up]``, two convs."""

  def __init__(self, dims, in_ch, cat_ch, out_ch, act, norm, bias, halves, rngs):
    up_ch = in_ch // 2 if halves else in_ch
    self.deconv = ConvTranspose(in_ch, up_ch, 2, spatial_dims=dims, stride=2, rngs=rngs)
    self.convs = TwoConv(dims, cat_ch + up_ch, out_ch, act, norm, bias, rngs)

  def __call__(self, x, skip):
    up = self.deconv(x)
    pad = [(0, 0)] + [(0, 1 if s != u else 0) for s, u in zip(skip.shape[1:-1], up.shape[1:-1])] + [(0, 0)]
    up = jnp.pad(up, pad, mode="edge")
    return self.convs(jnp.concatenate([skip, up], axis=-1))


class BasicUNet(nnx.Module):
  """``monai.networks.nets.BasicUNet`` (``upsample="deconv"``), channels-last; odd sizes as MONAI handles them."""

  def __init__(
    self,
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    features: Sequence[int] = (32, 32, 64, 128, 256, 32),
    act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
    norm=("instance", {"affine": True}),
    bias: bool = True,
    dropout: float | tuple = 0.0,
    upsample: str = "deconv",
    *,
    rngs: nnx.Rngs,
  ):
    if upsample != "deconv":
      raise ConversionError(f"BasicUNet upsample={upsample!r} is not supported (only 'deconv')")
    _no_dropout(dropout)
    fea = list(features) if len(features) == 6 else None
    if fea is None:
      raise ConversionError(f"BasicUNet needs six features, got {features}")
    a, n, d = act_spec(act), norm_spec(norm), spatial_dims
    self.conv_0 = TwoConv(d, in_channels, fea[0], a, n, bias, rngs)
    self.downs = nnx.List([TwoConv(d, fea[i], fea[i + 1], a, n, bias, rngs) for i in range(4)])
    self.upcats = nnx.List(
      [
        UpCat(d, fea[4], fea[3], fea[3], a, n, bias, True, rngs),
        UpCat(d, fea[3], fea[2], fea[2], a, n, bias, True, rngs),
        UpCat(d, fea[2], fea[1], fea[1], a, n, bias, True, rngs),
        UpCat(d, fea[1], fea[0], fea[5], a, n, bias, False, rngs),
      ]
    )
    self.final_conv = Conv(fea[5], out_channels, 1, spatial_dims=d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    skips = [self.conv_0(x)]
    for down in self.downs:
      skips.append(down(max_pool(skips[-1], (2,) * (x.ndim - 2), (2,) * (x.ndim - 2))))
    x = skips.pop()
    for up in self.upcats:
      x = up(x, skips.pop())
    return self.final_conv(x)

  def layer_order(self) -> list[LayerPath]:
    order = [("conv_0", "conv_0"), ("conv_0", "conv_1")]
    order += [("downs", i, c) for i in range(4) for c in ("conv_0", "conv_1")]
    for i in range(4):
      order += [("upcats", i, "deconv"), ("upcats", i, "convs", "conv_0"), ("upcats", i, "convs", "conv_1")]
    return order + [("final_conv",)]


# ----------------------------------------------------------------------------- UNet


class ResidualUnit(nnx.Module):
  """MONAI ``ResidualUnit``: ``subunits`` Convolutions plus a residual conv when shape changes."""

  def __init__(
    self,
    dims,
    in_ch,
    out_ch,
    *,
    strides,
    kernel_size,
    subunits,
    act,
    norm,
    bias,
    adn_ordering,
    last_conv_only=False,
    rngs,
  ):
    k = as_tuple(kernel_size, dims)
    units, ch, s = [], in_ch, strides
    subunits = max(1, subunits)
    for su in range(subunits):
      units.append(
        ConvADN(
          dims,
          ch,
          out_ch,
          kernel_size=k,
          strides=s,
          act=act,
          norm=norm,
          bias=bias,
          conv_only=last_conv_only and su == subunits - 1,
          adn_ordering=adn_ordering,
          rngs=rngs,
        )
      )
      ch, s = out_ch, 1
    self.units = nnx.List(units)
    strided = int(np.prod(as_tuple(strides, dims))) != 1
    rk, rp = (k, [(i - 1) // 2 for i in k]) if strided else (1, 0)
    self.residual = (
      Conv(in_ch, out_ch, rk, spatial_dims=dims, stride=strides, padding=rp, use_bias=bias, rngs=rngs)
      if strided or in_ch != out_ch
      else None
    )

  def __call__(self, x):
    res = self.residual(x) if self.residual is not None else x
    for unit in self.units:
      x = unit(x)
    return x + res


class UNet(nnx.Module):
  """``monai.networks.nets.UNet`` (with or without residual units), channels-last.

  Layers: ``downs[i]`` (level i's encoder conv), ``bottom``, ``ups[i]`` (level i's decoder:
  transposed conv, plus a residual unit when ``num_res_units > 0``); level ``i`` concatenates
  ``[down_i(x), deeper(down_i(x))]`` as MONAI's ``SkipConnection`` does.
  """

  def __init__(
    self,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    channels: Sequence[int],
    strides: Sequence[int],
    kernel_size=3,
    up_kernel_size=3,
    num_res_units: int = 0,
    act="PRELU",
    norm="INSTANCE",
    dropout=0.0,
    bias: bool = True,
    adn_ordering: str = "NDA",
    *,
    rngs: nnx.Rngs,
  ):
    _no_dropout(dropout)
    channels, n = list(channels), len(channels)
    if n < 2 or len(strides) < n - 1:
      raise ConversionError("UNet needs at least two channels and len(channels) - 1 strides")
    a, nm, d = act_spec(act), norm_spec(norm), spatial_dims
    common = dict(act=a, norm=nm, bias=bias, adn_ordering=adn_ordering, rngs=rngs)
    self.num_res_units = num_res_units

    def down(inc, outc, s):
      if num_res_units > 0:
        return ResidualUnit(d, inc, outc, strides=s, kernel_size=kernel_size, subunits=num_res_units, **common)
      return ConvADN(d, inc, outc, kernel_size=kernel_size, strides=s, **common)

    def up(inc, outc, s, top):
      conv = ConvADN(
        d,
        inc,
        outc,
        kernel_size=up_kernel_size,
        strides=s,
        conv_only=top and num_res_units == 0,
        is_transposed=True,
        **common,
      )
      if num_res_units == 0:
        return conv
      unit = ResidualUnit(d, outc, outc, strides=1, kernel_size=kernel_size, subunits=1, last_conv_only=top, **common)
      return nnx.Dict(conv=conv, unit=unit)

    downs, ups = [], []
    for i in range(n - 1):
      inc = in_channels if i == 0 else channels[i - 1]
      outc = out_channels if i == 0 else channels[i - 1]
      upc = 2 * channels[i] if i < n - 2 else channels[i] + channels[n - 1]
      downs.append(down(inc, channels[i], strides[i]))
      ups.append(up(upc, outc, strides[i], i == 0))
    self.downs, self.ups = nnx.List(downs), nnx.List(ups)
    self.bottom = down(channels[n - 2], channels[n - 1], 1)

  def _up(self, i, x):
    block = self.ups[i]
    return block["unit"](block["conv"](x)) if self.num_res_units > 0 else block(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self._level(0, x)

  def _level(self, i, x):
    x = self.downs[i](x)
    deeper = self._level(i + 1, x) if i + 1 < len(self.downs) else self.bottom(x)
    return self._up(i, jnp.concatenate([x, deeper], axis=-1))

  def _block_order(self, path, block) -> list[LayerPath]:
    if isinstance(block, ResidualUnit):
      return ([(*path, "residual")] if block.residual is not None else []) + [
        (*path, "units", j) for j in range(len(block.units))
      ]
    return [path]

  def layer_order(self) -> list[LayerPath]:
    order = []
    for i, block in enumerate(self.downs):
      order += self._block_order(("downs", i), block)
    order += self._block_order(("bottom",), self.bottom)
    for i in reversed(range(len(self.ups))):
      if self.num_res_units > 0:
        order += [("ups", i, "conv")] + self._block_order(("ups", i, "unit"), self.ups[i]["unit"])
      else:
        order.append(("ups", i))
    return order


# ----------------------------------------------------------------------------- SegResNet


class ResBlock(nnx.Module):
  """SegResNet ``ResBlock``: norm, act, conv, norm, act, conv, plus identity."""

  def __init__(self, dims, ch, norm, act, rngs):
    self.norm1 = make_norm(norm, ch, rngs)
    self.conv1 = Conv(ch, ch, 3, spatial_dims=dims, padding=1, use_bias=False, rngs=rngs)
    self.norm2 = make_norm(norm, ch, rngs)
    self.conv2 = Conv(ch, ch, 3, spatial_dims=dims, padding=1, use_bias=False, rngs=rngs)
    self.act = Activation(act, rngs=rngs)

  def __call__(self, x):
    y = self.conv1(self.act(self.norm1(x)))
    return self.conv2(self.act(self.norm2(y))) + x


class SegResNet(nnx.Module):
  """``monai.networks.nets.SegResNet`` (``upsample_mode`` ``"nontrainable"`` or ``"deconv"``), channels-last."""

  def __init__(
    self,
    spatial_dims: int = 3,
    init_filters: int = 8,
    in_channels: int = 1,
    out_channels: int = 2,
    dropout_prob: float | None = None,
    act=("RELU", {"inplace": True}),
    norm=("GROUP", {"num_groups": 8}),
    norm_name: str = "",
    num_groups: int = 8,
    use_conv_final: bool = True,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] = (1, 1, 1),
    upsample_mode: str = "nontrainable",
    *,
    rngs: nnx.Rngs,
  ):
    del dropout_prob, num_groups
    if norm_name:
      raise ConversionError("SegResNet norm_name is deprecated in MONAI; pass norm")
    if upsample_mode not in ("nontrainable", "deconv"):
      raise ConversionError(f"SegResNet upsample_mode={upsample_mode!r} is not supported")
    if not use_conv_final:
      raise ConversionError("SegResNet with use_conv_final=False returns features, not logits")
    d, a, n, f = spatial_dims, act_spec(act), norm_spec(norm), init_filters
    self.upsample_mode = upsample_mode
    self.conv_init = Conv(in_channels, f, 3, spatial_dims=d, padding=1, use_bias=False, rngs=rngs)
    downs = []
    for i, count in enumerate(blocks_down):
      ch = f * 2**i
      pre = Conv(ch // 2, ch, 3, spatial_dims=d, stride=2, padding=1, use_bias=False, rngs=rngs) if i > 0 else None
      downs.append(nnx.Dict(pre_conv=pre, blocks=nnx.List([ResBlock(d, ch, n, a, rngs) for _ in range(count)])))
    self.downs = nnx.List(downs)
    ups = []
    n_up = len(blocks_up)
    for i in range(n_up):
      ch = f * 2 ** (n_up - i)
      up = (
        ConvTranspose(ch // 2, ch // 2, 2, spatial_dims=d, stride=2, rngs=rngs) if upsample_mode == "deconv" else None
      )
      ups.append(
        nnx.Dict(
          reduce=Conv(ch, ch // 2, 1, spatial_dims=d, use_bias=False, rngs=rngs),
          deconv=up,
          blocks=nnx.List([ResBlock(d, ch // 2, n, a, rngs) for _ in range(blocks_up[i])]),
        )
      )
    self.ups = nnx.List(ups)
    self.final_norm = make_norm(n, f, rngs)
    self.final_act = Activation(a, rngs=rngs)
    self.final_conv = Conv(f, out_channels, 1, spatial_dims=d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_init(x)
    skips = []
    for down in self.downs:
      if down["pre_conv"] is not None:
        x = down["pre_conv"](x)
      for block in down["blocks"]:
        x = block(x)
      skips.append(x)
    skips.pop()
    for up in self.ups:
      x = up["reduce"](x)
      if up["deconv"] is not None:
        x = up["deconv"](x)
      else:
        x = resize_linear(x, [2 * s for s in x.shape[1:-1]], align_corners=False)
      x = x + skips.pop()
      for block in up["blocks"]:
        x = block(x)
    return self.final_conv(self.final_act(self.final_norm(x)))

  def layer_order(self) -> list[LayerPath]:
    order = [("conv_init",)]
    for i, down in enumerate(self.downs):
      if down["pre_conv"] is not None:
        order.append(("downs", i, "pre_conv"))
      order += [("downs", i, "blocks", j) for j in range(len(down["blocks"]))]
    for i, up in enumerate(self.ups):
      order.append(("ups", i, "reduce"))
      if up["deconv"] is not None:
        order.append(("ups", i, "deconv"))
      order += [("ups", i, "blocks", j) for j in range(len(up["blocks"]))]
    if self.final_norm is not None and getattr(self.final_norm, "scale", None) is not None:
      order.append(("final_norm",))
    if self.final_act.weight is not None:
      order.append(("final_act",))
    return order + [("final_conv",)]
