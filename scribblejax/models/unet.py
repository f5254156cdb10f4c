"""Flax NNX U-Nets for 2D and 3D segmentation, with a documented layer order.

Layer order (the order the forward pass runs the layers), for ``channels=(c0, ..., cL)`` and
``convs_per_level=2``::

    encoder/0/0, encoder/0/1,            # level 0: conv-norm-act, conv-norm-act
    encoder/1/0, encoder/1/1,            # level 1 (after 2x max pooling) ... up to level L (bottleneck)
    ...
    up/0, decoder/0/0, decoder/0/1,      # transposed conv from level L to L-1, then two conv blocks
    ...
    up/L-1, decoder/L-1/0, decoder/L-1/1,
    head                                 # 1x1 conv to class logits

Each ``encoder/i/j`` and ``decoder/i/j`` layer is one convolution *with* the normalisation that
follows it, so "the last 5 layers" of a 3-level U-Net is ``head``, ``decoder/1/1``, ``decoder/1/0``,
``up/1`` and ``decoder/0/1``.

Inputs are channels-last, ``float32[batch, *spatial, in_channels]``; any spatial size works (the input
is padded to a multiple of ``2 ** (len(channels) - 1)`` and the output cropped back).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from scribblejax._checks import is_integer
from scribblejax.models import init

NORMS = ("instance", "group", "batch", "none")
ACTIVATIONS = {
  "relu": jax.nn.relu,
  "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
  "gelu": jax.nn.gelu,
  "silu": jax.nn.silu,
  "elu": jax.nn.elu,
}


# Initial values drawn with NumPy (scribblejax.models.init): building a U-Net compiles almost nothing.
_KERNEL = dict(kernel_init=init.lecun_normal(), bias_init=init.zeros)
_AFFINE = dict(scale_init=init.ones, bias_init=init.zeros)


def _norm(kind: str, features: int, groups: int, rngs: nnx.Rngs) -> nnx.Module | None:
  if kind == "instance":
    return nnx.GroupNorm(features, num_groups=features, epsilon=1e-5, use_fast_variance=False, rngs=rngs, **_AFFINE)
  if kind == "group":
    return nnx.GroupNorm(
      features, num_groups=min(groups, features), epsilon=1e-5, use_fast_variance=False, rngs=rngs, **_AFFINE
    )
  if kind == "batch":
    # Refinement runs the network in evaluation mode: running statistics, never batch statistics.
    return nnx.BatchNorm(
      features, use_running_average=True, epsilon=1e-5, use_fast_variance=False, rngs=rngs, **_AFFINE
    )
  return None


class ConvBlock(nnx.Module):
  """One layer: a 3^d convolution, an optional normalisation and an activation."""

  def __init__(
    self,
    spatial_dims: int,
    in_features: int,
    out_features: int,
    *,
    norm: str,
    activation: str,
    groups: int,
    rngs: nnx.Rngs,
  ):
    self.conv = nnx.Conv(
      in_features,
      out_features,
      (3,) * spatial_dims,
      padding=((1, 1),) * spatial_dims,
      use_bias=norm == "none",
      rngs=rngs,
      **_KERNEL,
    )
    self.norm = _norm(norm, out_features, groups, rngs)
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(x)
    if self.norm is not None:
      x = self.norm(x)
    return ACTIVATIONS[self.activation](x)


class UNet(nnx.Module):
  """A U-Net for 2D or 3D inputs.

  Args:
    spatial_dims: 2 or 3.
    in_channels: input channels.
    num_classes: output channels (class logits).
    channels: features per level, from the finest level to the bottleneck.
    convs_per_level: conv-norm-act layers per level in the encoder and decoder.
    norm: "instance", "group", "batch" (always evaluated with running statistics) or "none".
    activation: one of ``ACTIVATIONS``.
    groups: number of groups for ``norm="group"``.
    rngs: random keys for initialisation.

  Example:
    >>> model = UNet(spatial_dims=2, in_channels=1, num_classes=3, channels=(8, 16), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((1, 30, 30, 1))).shape
    (1, 30, 30, 3)
  """

  def __init__(
    self,
    spatial_dims: int = 2,
    in_channels: int = 1,
    num_classes: int = 2,
    channels: Sequence[int] = (16, 32, 64),
    convs_per_level: int = 2,
    norm: str = "instance",
    activation: str = "relu",
    groups: int = 8,
    *,
    rngs: nnx.Rngs,
  ):
    if spatial_dims not in (2, 3):
      raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")

    def positive(value: Any, what: str) -> int:
      if not is_integer(value) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
      return int(value)

    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or not channels:
      raise ValueError(f"channels must be a non-empty sequence of positive integers, got {channels!r}")
    channels = tuple(positive(c, "every entry of channels") for c in channels)
    in_channels = positive(in_channels, "in_channels")
    convs_per_level = positive(convs_per_level, "convs_per_level")
    if positive(num_classes, "num_classes") < 2:
      raise ValueError(f"num_classes must be at least 2 (background and one class), got {num_classes}")
    if norm == "group":
      groups = positive(groups, "groups")
      if any(c % min(groups, c) for c in channels):
        raise ValueError(
          f"norm='group' needs every entry of channels {channels} that exceeds groups={groups} to be divisible by it"
        )
    self.spatial_dims = spatial_dims
    self.in_channels = in_channels
    self.num_classes = num_classes
    self.channels = channels
    block = dict(norm=norm, activation=activation, groups=groups, rngs=rngs)

    def level(cin: int, cout: int) -> nnx.List:
      return nnx.List([ConvBlock(spatial_dims, cin if j == 0 else cout, cout, **block) for j in range(convs_per_level)])

    self.encoder = nnx.List([level(in_channels if i == 0 else channels[i - 1], c) for i, c in enumerate(channels)])
    deep = channels[::-1]
    self.up = nnx.List(
      [
        nnx.ConvTranspose(
          deep[i], deep[i + 1], (2,) * spatial_dims, (2,) * spatial_dims, padding="VALID", rngs=rngs, **_KERNEL
        )
        for i in range(len(deep) - 1)
      ]
    )
    self.decoder = nnx.List([level(2 * deep[i + 1], deep[i + 1]) for i in range(len(deep) - 1)])
    self.head = nnx.Conv(channels[0], num_classes, (1,) * spatial_dims, rngs=rngs, **_KERNEL)

  def layer_order(self) -> list[tuple]:
    """Parameter path prefixes, one per layer, in forward order (see the module docstring)."""
    order = [("encoder", i, j) for i, lvl in enumerate(self.encoder) for j in range(len(lvl))]
    for i, lvl in enumerate(self.decoder):
      order.append(("up", i))
      order.extend(("decoder", i, j) for j in range(len(lvl)))
    order.append(("head",))
    return order

  def __call__(self, x: jax.Array) -> jax.Array:
    spatial = x.shape[1:-1]
    if len(spatial) != self.spatial_dims or x.shape[-1] != self.in_channels:
      raise ValueError(
        f"UNet expects [batch, {self.spatial_dims} spatial axes, {self.in_channels} channels], got shape {x.shape}"
      )
    multiple = 2 ** (len(self.channels) - 1)
    pad = [(0, (-s) % multiple) for s in spatial]
    x = jnp.pad(x, [(0, 0), *pad, (0, 0)], mode="edge")
    window = (2,) * self.spatial_dims
    skips = []
    for i, lvl in enumerate(self.encoder):
      if i > 0:
        x = nnx.max_pool(x, window, strides=window)
      for layer in lvl:
        x = layer(x)
      skips.append(x)
    for up, lvl, skip in zip(self.up, self.decoder, skips[-2::-1]):
      x = jnp.concatenate([up(x), skip], axis=-1)
      for layer in lvl:
        x = layer(x)
    x = self.head(x)
    return x[(slice(None), *(slice(0, s) for s in spatial), slice(None))]
