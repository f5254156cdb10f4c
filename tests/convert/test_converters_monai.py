"""MONAI BasicUNet / UNet / SegResNet: Flax logits equal MONAI's for random weights, 2D and 3D."""

import json

import pytest
from flax import nnx
from torch_builders import compare, randomize_, torch_state

from scribblejax.convert import monai_nets
from scribblejax.convert.state_dict import ConversionError
from scribblejax.models.families import constructor
from scribblejax.models.ordering import check_layer_order
from scribblejax.models.zoo import monai as monai_zoo

torch = pytest.importorskip("torch")
nets = pytest.importorskip("monai.networks.nets")


def _check(torch_cls, family, kwargs, shape):
  json.dumps(kwargs)
  net = randomize_(torch_cls(**kwargs), seed=5)
  model = constructor(family)(**kwargs, rngs=nnx.Rngs(0))
  # A checkpoint saved from DDP: every key has a "module." prefix, which is dropped (was: missing keys).
  monai_nets.load_weights(model, {f"module.{k}": v for k, v in torch_state(net).items()})
  compare(net, model, shape)
  check_layer_order(model, model.layer_order())


@pytest.mark.parametrize(
  "kwargs,shape",
  [
    ({"spatial_dims": 2, "in_channels": 2, "out_channels": 3, "features": [4, 4, 6, 6, 8, 4]}, (2, 2, 35, 39)),
    (
      {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "features": [2, 3, 3, 4, 4, 2],
        "norm": ["batch", {}],
        "act": ["prelu", {"num_parameters": 1}],
      },
      (1, 1, 16, 17, 19),
    ),
  ],
  ids=["2d_odd", "3d_batch_prelu_odd"],
)
@pytest.mark.slow
def test_basic_unet(kwargs, shape):
  _check(nets.BasicUNet, "monai.BasicUNet", kwargs, shape)


@pytest.mark.parametrize(
  "kwargs,shape",
  [
    (
      {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "channels": [4, 6, 8], "strides": [2, 2]},
      (2, 1, 16, 12),
    ),
    (
      {
        "spatial_dims": 2,
        "in_channels": 2,
        "out_channels": 2,
        "channels": [4, 6, 8, 8],
        "strides": [2, 2, 1],
        "num_res_units": 2,
        "norm": ["instance", {"affine": True}],
        "act": ["prelu", {"num_parameters": 1}],
      },
      (1, 2, 16, 8),
    ),
    (
      {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [3, 4, 5],
        "strides": [2, 2],
        "num_res_units": 1,
        "norm": "batch",
        "act": "relu",
      },
      (1, 1, 8, 12, 8),
    ),
    # an ordering without N (or A) builds no norm (activation), as MONAI's ADN
    (
      {
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [4, 6],
        "strides": [2],
        "adn_ordering": "DA",
        "norm": "batch",
      },
      (1, 1, 8, 12),
    ),
    (
      {
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [4, 6],
        "strides": [2],
        "num_res_units": 1,
        "adn_ordering": "ND",
        "act": "prelu",
        "norm": "batch",
      },
      (1, 1, 8, 12),
    ),
  ],
  ids=["2d_plain", "2d_residual_prelu", "3d_residual_batch", "ordering_without_norm", "ordering_without_act"],
)
@pytest.mark.slow
def test_unet(kwargs, shape):
  _check(nets.UNet, "monai.UNet", kwargs, shape)


@pytest.mark.parametrize(
  "kwargs,shape",
  [
    (
      {
        "spatial_dims": 2,
        "init_filters": 4,
        "in_channels": 1,
        "out_channels": 3,
        "norm": ["group", {"num_groups": 2}],
        "blocks_down": [1, 2, 1],
        "blocks_up": [1, 1],
      },
      (2, 1, 12, 20),
    ),
    (
      {
        "spatial_dims": 3,
        "init_filters": 4,
        "in_channels": 2,
        "out_channels": 2,
        "norm": ["group", {"num_groups": 4}],
        "blocks_down": [1, 1],
        "blocks_up": [1],
        "upsample_mode": "deconv",
      },
      (1, 2, 8, 6, 10),
    ),
    # MONAI stores the final PReLU twice (act_mod and conv_final.1)
    (
      {
        "spatial_dims": 2,
        "init_filters": 4,
        "in_channels": 1,
        "out_channels": 2,
        "act": "prelu",
        "norm": ["group", {"num_groups": 2}],
        "blocks_down": [1, 1],
        "blocks_up": [1],
      },
      (1, 1, 8, 12),
    ),
  ],
  ids=["2d_trilinear", "3d_deconv", "2d_prelu"],
)
@pytest.mark.slow
def test_segresnet(kwargs, shape):
  _check(nets.SegResNet, "monai.SegResNet", kwargs, shape)


def test_unknown_options_refused():
  with pytest.raises(ConversionError, match="upsample"):
    monai_zoo.BasicUNet(spatial_dims=2, upsample="pixelshuffle", rngs=nnx.Rngs(0))
  with pytest.raises(ConversionError, match="norm"):
    monai_zoo.UNet(2, 1, 2, [4, 8], [2], norm="layer", rngs=nnx.Rngs(0))


def test_shape_errors_name_the_torch_key():
  net = nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=3, features=[4, 4, 4, 4, 4, 4])
  model = monai_zoo.BasicUNet(
    spatial_dims=2, in_channels=1, out_channels=3, features=[4, 4, 4, 4, 4, 8], rngs=nnx.Rngs(0)
  )
  with pytest.raises(
    ConversionError,
    match=r"final_conv/kernel has shape \(1, 1, 8, 3\), converted value has "
    r"\(1, 1, 4, 3\) \(from torch key 'final_conv.weight' of shape \(3, 4, 1, 1\)\)",
  ):
    monai_nets.load_weights(model, torch_state(net))
