"""nnU-Net v2 networks: Flax logits equal dynamic_network_architectures' for random weights."""

import json

import numpy as np
import pytest
from flax import nnx
from torch_builders import compare, randomize_, torch_state

from scribblejax.convert import nnunet
from scribblejax.convert.state_dict import ConversionError
from scribblejax.models.families import constructor
from scribblejax.models.ordering import check_layer_order
from scribblejax.models.zoo.nnunet import PlainConvUNet

torch = pytest.importorskip("torch")
dna_unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")


def _arch(conv, norm, norm_kwargs, nonlin="torch.nn.LeakyReLU", nonlin_kwargs=None, **extra):
  dims = int(conv[-2])
  kw = {
    "n_stages": 3,
    "features_per_stage": [3, 5, 6],
    "conv_op": conv,
    "kernel_sizes": [[3] * dims, [3] * dims, [1] + [3] * (dims - 1)],
    "strides": [[1] * dims, [2] * dims, [1] + [2] * (dims - 1)],
    "n_conv_per_stage_decoder": [1, 2],
    "conv_bias": True,
    "norm_op": norm,
    "norm_op_kwargs": norm_kwargs,
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": nonlin,
    "nonlin_kwargs": nonlin_kwargs if nonlin_kwargs is not None else {"inplace": True},
  }
  kw.update(extra)
  return kw


def _torch_net(class_name, arch, in_ch, classes):
  import importlib

  resolved = dict(arch)
  for key in ("conv_op", "norm_op", "dropout_op", "nonlin"):
    if resolved.get(key):
      module, name = resolved[key].rsplit(".", 1)
      resolved[key] = getattr(importlib.import_module(module), name)
  if resolved.get("block"):
    from dynamic_network_architectures.building_blocks import residual

    resolved["block"] = getattr(residual, resolved["block"].rsplit(".", 1)[-1])
  cls = getattr(dna_unet, class_name)
  return randomize_(cls(in_ch, num_classes=classes, deep_supervision=True, **resolved), seed=3)


CASES = [
  (
    "PlainConvUNet",
    _arch("torch.nn.Conv2d", "torch.nn.InstanceNorm2d", {"eps": 1e-5, "affine": True}, n_conv_per_stage=[2, 1, 2]),
    (2, 2, 12, 20),
  ),
  (
    "PlainConvUNet",
    _arch(
      "torch.nn.Conv3d",
      "torch.nn.BatchNorm3d",
      {"eps": 1e-3},
      "torch.nn.PReLU",
      {"num_parameters": 1},
      n_conv_per_stage=2,
      nonlin_first=True,
    ),
    (1, 1, 4, 8, 12),
  ),
  (
    "ResidualEncoderUNet",
    _arch("torch.nn.Conv2d", "torch.nn.BatchNorm2d", {"eps": 1e-5, "affine": True}, n_blocks_per_stage=[1, 2, 1]),
    (2, 1, 8, 12),
  ),
  (
    "ResidualEncoderUNet",
    _arch(
      "torch.nn.Conv3d",
      "torch.nn.InstanceNorm3d",
      {"eps": 1e-5, "affine": True},
      n_blocks_per_stage=[1, 1, 2],
      block="BottleneckD",
      bottleneck_channels=[2, 2, 3],
      stem_channels=4,
    ),
    (1, 2, 4, 8, 8),
  ),
]


@pytest.mark.parametrize(
  "class_name,arch,shape", CASES, ids=["plain2d", "plain3d_bn_prelu", "res2d_bn", "res3d_bottleneck"]
)
@pytest.mark.slow
def test_network_matches_torch(class_name, arch, shape):
  net = _torch_net(class_name, arch, shape[1], 3)
  net.decoder.deep_supervision = False
  family, kwargs = nnunet.architecture_kwargs(
    {
      "architecture": {
        "network_class_name": f"dynamic_network_architectures.architectures.unet.{class_name}",
        "arch_kwargs": arch,
      }
    },
    shape[1],
    3,
  )
  json.dumps(kwargs)
  model = constructor(family)(**kwargs, rngs=nnx.Rngs(0))
  nnunet.load_weights(model, torch_state(net))
  compare(net, model, shape)
  check_layer_order(model, model.layer_order())


def test_unknown_arch_option_is_refused():
  arch = _arch(
    "torch.nn.Conv2d",
    "torch.nn.InstanceNorm2d",
    {"eps": 1e-5, "affine": True},
    n_conv_per_stage=2,
    squeeze_excitation=True,
  )
  with pytest.raises(ConversionError, match="squeeze_excitation"):
    nnunet.architecture_kwargs({"architecture": {"network_class_name": "x.PlainConvUNet", "arch_kwargs": arch}}, 1, 2)
  with pytest.raises(ConversionError, match="ResidualUNet"):
    nnunet.architecture_kwargs({"architecture": {"network_class_name": "x.ResidualUNet", "arch_kwargs": arch}}, 1, 2)


def test_strict_keys():
  arch = _arch("torch.nn.Conv2d", "torch.nn.InstanceNorm2d", {"eps": 1e-5, "affine": True}, n_conv_per_stage=1)
  net = _torch_net("PlainConvUNet", arch, 1, 2)
  family, kwargs = nnunet.architecture_kwargs(
    {"architecture": {"network_class_name": "PlainConvUNet", "arch_kwargs": arch}}, 1, 2
  )
  state = torch_state(net)
  model = PlainConvUNet(**kwargs, rngs=nnx.Rngs(0))
  with pytest.raises(ConversionError, match="extra.thing"):
    nnunet.load_weights(model, {**state, "extra.thing": np.zeros(1)})
  missing = {k: v for k, v in state.items() if "transpconvs.1.bias" not in k}
  with pytest.raises(ConversionError, match="transpconvs.1.bias"):
    nnunet.load_weights(model, missing)
  tampered = dict(state)
  tampered["decoder.encoder.stages.0.0.convs.0.conv.weight"] = state["encoder.stages.0.0.convs.0.conv.weight"] + 1
  with pytest.raises(ConversionError, match="differ"):
    nnunet.load_weights(model, tampered)
