"""segmentation_models_pytorch ``Unet`` state dicts -> the Flax :class:`~scribblejax.models.zoo.smp.Unet`.

Every key of the state dict is moved to its variable or deliberately dropped (encoder stages beyond
``encoder_depth``, the ``aux_params`` classification head), every shape checked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from scribblejax.convert.state_dict import StateReader, assign, conv_kernel, strip_wrappers

# the architecture, also importable from here as before it moved to the zoo
from scribblejax.models.zoo.smp import ConvNorm, Unet

LayerPath = tuple[Any, ...]


def _conv_norm_values(
  reader: StateReader, conv_key: str, norm_key: str, path: LayerPath, m: ConvNorm, values: dict
) -> None:
  """Torch ``conv_key.weight`` (+ bias) and the norm under ``norm_key`` -> ``values`` at ``path``."""
  kernel = m.conv.kernel.shape
  torch_shape = (kernel[3], kernel[2], *kernel[:2])
  values[(*path, "conv", "kernel")] = conv_kernel(reader.take(f"{conv_key}.weight", torch_shape))
  if m.conv.bias is not None:
    values[(*path, "conv", "bias")] = reader.take(f"{conv_key}.bias", m.conv.bias.shape)
  norm = m.norm
  if norm is None:
    return
  if norm.scale is not None:
    values[(*path, "norm", "scale")] = reader.take(f"{norm_key}.weight", norm.scale.shape)
    values[(*path, "norm", "bias")] = reader.take(f"{norm_key}.bias", norm.bias.shape)
  if hasattr(norm, "mean"):
    values[(*path, "norm", "mean")] = reader.take(f"{norm_key}.running_mean", norm.mean.shape)
    values[(*path, "norm", "var")] = reader.take(f"{norm_key}.running_var", norm.var.shape)
    reader.ignore_matching(re.escape(f"{norm_key}.num_batches_tracked"))


def unet_values(model: Unet, reader: StateReader) -> dict:
  """``{variable path: array}`` from an smp ``Unet`` state dict (keys used or explicitly ignored)."""
  values = reader.values()
  _conv_norm_values(reader, "encoder.conv1", "encoder.bn1", ("encoder", "stem"), model.encoder.stem, values)
  for k, stage in enumerate(model.encoder.layers):
    for j, block in enumerate(stage):
      t, p = f"encoder.layer{k + 1}.{j}", ("encoder", "layers", k, j)
      for i, conv in enumerate(block.convs):
        _conv_norm_values(reader, f"{t}.conv{i + 1}", f"{t}.bn{i + 1}", (*p, "convs", i), conv, values)
      if block.downsample is not None:
        _conv_norm_values(
          reader, f"{t}.downsample.0", f"{t}.downsample.1", (*p, "downsample"), block.downsample, values
        )
  for k in range(len(model.encoder.layers) + 1, 5):  # torchvision builds all four stages; smp runs `depth`
    reader.ignore_matching(rf"encoder\.layer{k}\..*")
  for i, block in enumerate(model.decoder["blocks"]):
    for c in ("conv1", "conv2"):
      t = f"decoder.blocks.{i}.{c}"
      _conv_norm_values(reader, f"{t}.0", f"{t}.1", ("decoder", "blocks", i, c), getattr(block, c), values)
  head = model.segmentation_head
  values[("segmentation_head", "kernel")] = conv_kernel(
    reader.take("segmentation_head.0.weight", (head.kernel.shape[-1], head.kernel.shape[-2], 3, 3))
  )
  values[("segmentation_head", "bias")] = reader.take("segmentation_head.0.bias", head.bias.shape)
  if model.aux_classes is not None:  # classification head: not part of the segmentation logits
    c = model.encoder.out_channels[-1]
    reader.take("classification_head.3.weight", (model.aux_classes, c))
    reader.take("classification_head.3.bias", (model.aux_classes,))
  return values


def load_weights(model: Unet, state: Mapping[str, Any], *, source: str = "checkpoint") -> None:
  """Loads an smp ``Unet`` state dict into ``model`` strictly (in place).

  Raises:
    ConversionError: a key is missing, unexpected (named) or of the wrong shape.
  """
  reader = StateReader(strip_wrappers(state), source=source)
  values = unet_values(model, reader)
  reader.finish()
  assign(model, values, source=source)
