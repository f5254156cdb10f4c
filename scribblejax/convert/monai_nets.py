"""MONAI state dicts -> the Flax networks of :mod:`scribblejax.models.zoo.monai` (``BasicUNet``, ``UNet``,
``SegResNet``).

:func:`load_weights` moves every tensor of a MONAI state dict to its variable (one mapping function per
architecture, torch's module names spelled out), strictly: a key neither used nor deliberately ignored, or
a shape that differs, is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from scribblejax.convert.state_dict import (
  ConversionError,
  StateReader,
  assign,
  conv_kernel,
  conv_transpose_kernel,
  strip_wrappers,
)
from scribblejax.models.zoo.layers import ConvTranspose

# the architectures, also importable from here as before they moved to the zoo
from scribblejax.models.zoo.monai import BasicUNet, ConvADN, ResidualUnit, SegResNet, UNet

LayerPath = tuple[Any, ...]


def _conv_adn_values(reader: StateReader, t: str, path: LayerPath, m: ConvADN, values: dict) -> None:
  """Torch ``Convolution`` keys under ``t`` -> ``values`` at ``path``."""
  transform = conv_transpose_kernel if isinstance(m.conv, ConvTranspose) else conv_kernel
  values[(*path, "conv", "kernel")] = transform(reader.take(f"{t}.conv.weight"))
  if m.conv.bias is not None:
    values[(*path, "conv", "bias")] = reader.take(f"{t}.conv.bias")
  _norm_values(reader, f"{t}.adn.N", (*path, "norm"), m.norm, values)
  if m.act is not None and m.act.weight is not None:
    values[(*path, "act", "weight")] = reader.take(f"{t}.adn.A.weight")


def _norm_values(reader, t, path, norm, values):
  if norm is None:
    return
  if norm.scale is not None:
    values[(*path, "scale")] = reader.take(f"{t}.weight")
    values[(*path, "bias")] = reader.take(f"{t}.bias")
  if hasattr(norm, "mean"):
    values[(*path, "mean")] = reader.take(f"{t}.running_mean")
    values[(*path, "var")] = reader.take(f"{t}.running_var")
    reader.ignore_matching(re.escape(f"{t}.num_batches_tracked"))


def _conv_values(reader, t, path, conv, values, transposed=False):
  values[(*path, "kernel")] = (conv_transpose_kernel if transposed else conv_kernel)(reader.take(f"{t}.weight"))
  if conv.bias is not None:
    values[(*path, "bias")] = reader.take(f"{t}.bias")


def _at(model, path):
  node = model
  for p in path:
    node = node[p] if isinstance(p, int) else getattr(node, p)
  return node


# ----------------------------------------------------------------------------- BasicUNet


def basic_unet_values(model: BasicUNet, reader: StateReader) -> dict:
  """``{variable path: array}`` from a torch ``BasicUNet`` state dict."""
  values = reader.values()
  torch_two = {
    ("conv_0",): "conv_0",
    **{("downs", i): f"down_{i + 1}.convs" for i in range(4)},
    **{("upcats", i, "convs"): f"upcat_{4 - i}.convs" for i in range(4)},
  }
  for path, t in torch_two.items():
    for c in ("conv_0", "conv_1"):
      module = getattr(_at(model, path), c)
      _conv_adn_values(reader, f"{t}.{c}", (*path, c), module, values)
  for i in range(4):
    _conv_values(
      reader, f"upcat_{4 - i}.upsample.deconv", ("upcats", i, "deconv"), model.upcats[i].deconv, values, transposed=True
    )
  _conv_values(reader, "final_conv", ("final_conv",), model.final_conv, values)
  return values


# ----------------------------------------------------------------------------- UNet


def _unet_block_values(reader, t, path, block, values):
  if isinstance(block, ResidualUnit):
    for j, unit in enumerate(block.units):
      _conv_adn_values(reader, f"{t}.conv.unit{j}", (*path, "units", j), unit, values)
    if block.residual is not None:
      _conv_values(reader, f"{t}.residual", (*path, "residual"), block.residual, values)
  else:
    _conv_adn_values(reader, t, path, block, values)


def unet_values(model: UNet, reader: StateReader) -> dict:
  """``{variable path: array}`` from a torch ``UNet`` state dict (nested ``SkipConnection`` modules)."""
  values = reader.values()
  for i in range(len(model.downs)):
    prefix = "model." + "1.submodule." * i
    _unet_block_values(reader, f"{prefix}0", ("downs", i), model.downs[i], values)
    if model.num_res_units > 0:
      _conv_adn_values(reader, f"{prefix}2.0", ("ups", i, "conv"), model.ups[i]["conv"], values)
      _unet_block_values(reader, f"{prefix}2.1", ("ups", i, "unit"), model.ups[i]["unit"], values)
    else:
      _conv_adn_values(reader, f"{prefix}2", ("ups", i), model.ups[i], values)
  bottom = "model." + "1.submodule." * (len(model.downs) - 1) + "1.submodule"
  _unet_block_values(reader, bottom, ("bottom",), model.bottom, values)
  return values


# ----------------------------------------------------------------------------- SegResNet


def _res_block_values(reader, t, path, block, values):
  _norm_values(reader, f"{t}.norm1", (*path, "norm1"), block.norm1, values)
  _conv_values(reader, f"{t}.conv1.conv", (*path, "conv1"), block.conv1, values)
  _norm_values(reader, f"{t}.norm2", (*path, "norm2"), block.norm2, values)
  _conv_values(reader, f"{t}.conv2.conv", (*path, "conv2"), block.conv2, values)
  if block.act.weight is not None:
    values[(*path, "act", "weight")] = reader.take(f"{t}.act.weight")


def segresnet_values(model: SegResNet, reader: StateReader) -> dict:
  """``{variable path: array}`` from a torch ``SegResNet`` state dict."""
  values = reader.values()
  _conv_values(reader, "convInit.conv", ("conv_init",), model.conv_init, values)
  for i, down in enumerate(model.downs):
    if down["pre_conv"] is not None:
      _conv_values(reader, f"down_layers.{i}.0.conv", ("downs", i, "pre_conv"), down["pre_conv"], values)
    for j, block in enumerate(down["blocks"]):
      _res_block_values(reader, f"down_layers.{i}.{j + 1}", ("downs", i, "blocks", j), block, values)
  for i, up in enumerate(model.ups):
    _conv_values(reader, f"up_samples.{i}.0.conv", ("ups", i, "reduce"), up["reduce"], values)
    if up["deconv"] is not None:
      _conv_values(reader, f"up_samples.{i}.1.deconv", ("ups", i, "deconv"), up["deconv"], values, transposed=True)
    for j, block in enumerate(up["blocks"]):
      _res_block_values(reader, f"up_layers.{i}.{j}", ("ups", i, "blocks", j), block, values)
  _norm_values(reader, "conv_final.0", ("final_norm",), model.final_norm, values)
  if model.final_act.weight is not None:
    values[("final_act", "weight")] = reader.take("conv_final.1.weight")
    if "act_mod.weight" in reader:
      # MONAI registers its final PReLU twice (``act_mod`` is ``conv_final[1]``): one tensor, two keys
      if not np.array_equal(reader.take("act_mod.weight"), values[("final_act", "weight")]):
        raise ConversionError(
          f"{reader.source}: 'act_mod.weight' differs from 'conv_final.1.weight', but MONAI's "
          "SegResNet shares one PReLU between them"
        )
  _conv_values(reader, "conv_final.2.conv", ("final_conv",), model.final_conv, values)
  return values


# ----------------------------------------------------------------------------- entry point


_VALUES = {BasicUNet: basic_unet_values, UNet: unet_values, SegResNet: segresnet_values}


def load_weights(model, state: Mapping[str, Any], *, source: str = "checkpoint") -> None:
  """Loads a MONAI state dict into ``model`` strictly (in place); a ``module.`` (DDP) or ``_orig_mod.``
  (torch.compile) prefix shared by every key is dropped first.

  Args:
    model: a freshly built :class:`BasicUNet`, :class:`UNet` or :class:`SegResNet`.
    state: the torch state dict (NumPy arrays).
    source: name used in error messages.

  Raises:
    ConversionError: ``model`` is not a MONAI network, or a key is missing, unexpected or of the wrong shape.
  """
  values_of = _VALUES.get(type(model))
  if values_of is None:
    raise ConversionError(
      f"{source}: {type(model).__name__} is not a MONAI network this converter knows "
      f"({', '.join(cls.__name__ for cls in _VALUES)})"
    )
  reader = StateReader(strip_wrappers(state), source=source)
  values = values_of(model, reader)
  reader.finish()
  assign(model, values, source=source)
