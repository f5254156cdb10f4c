"""segmentation_models_pytorch Unet (ResNet encoders): Flax logits equal smp's for random weights."""

import json
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx
from torch_builders import compare, randomize_, torch_state

from scribblejax.convert import smp_unet
from scribblejax.convert.state_dict import ConversionError
from scribblejax.models.ordering import check_layer_order
from scribblejax.models.zoo import smp as smp_zoo

torch = pytest.importorskip("torch")


def _import_smp():
  """Imports smp; if torchvision's fake-kernel registrations fail beside this torch build, stubs them.

  PyPI torchvision cannot register its C++ ops' meta kernels next to the CPU-only torch wheel
  (``RuntimeError: operator torchvision::nms does not exist``). smp needs none of those ops, so the
  module that registers them is replaced by an empty one and the import retried.
  """
  try:
    import segmentation_models_pytorch

    return segmentation_models_pytorch
  except Exception:  # noqa: BLE001 - any import-time failure of torchvision
    pass
  sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
  try:
    import segmentation_models_pytorch

    return segmentation_models_pytorch
  except Exception as e:  # noqa: BLE001
    pytest.skip(
      f"segmentation_models_pytorch cannot be imported beside torch {torch.__version__} "
      f"(even with torchvision._meta_registrations stubbed): {type(e).__name__}: {e}",
      allow_module_level=True,
    )


smp = _import_smp()


def _jitted(model):
  """The model's forward under one ``jax.jit`` (faster than eager op-by-op dispatch on CPU)."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  return lambda x: forward(state, x)


def _random_unet(kwargs, seed, shape):
  """smp.Unet with random weights, norm scales near 1 (so logits depend on the image), random stats.

  ``randomize_`` spots norms by name; smp's decoder norms are ``decoder.blocks.i.conv1.1``, so their
  scales would be drawn around 0 and, after the ReLUs, the logits would not depend on the input.
  """
  net = randomize_(smp.Unet(encoder_weights=None, **kwargs), seed=seed)
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.weight is not None:
        m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    # Guard against a vacuous comparison: the logits must depend on the image.
    out = [net(torch.randn(shape, generator=g)) for _ in range(2)]
    out = [o[0] if isinstance(o, tuple) else o for o in out]
  assert float((out[0] - out[1]).abs().max()) > 0.05
  return net


def _pair(kwargs, seed=3):
  json.dumps(kwargs)  # constructor arguments are JSON values
  net = _random_unet(kwargs, seed, (1, kwargs.get("in_channels", 3), 32, 32))
  model = smp_zoo.Unet(**kwargs, rngs=nnx.Rngs(0))
  smp_unet.load_weights(model, torch_state(net))
  check_layer_order(model, model.layer_order())
  return net, model


@pytest.mark.slow
def test_resnet18_logits_match_on_two_sizes():
  # BasicBlock encoder, full depth, batch-norm decoder, nearest x2 upsampling (64x64) and smp >= 0.5's
  # resize-to-skip on an odd size (50x37: the stem and max pool round up, the decoder resizes back).
  kwargs = {"encoder_name": "resnet18", "decoder_channels": [8, 6, 6, 4, 4], "in_channels": 2, "classes": 3}
  net, model = _pair(kwargs)
  forward = _jitted(model)
  assert compare(net, forward, (2, 2, 64, 64)) < 1e-4
  assert compare(net, forward, (1, 2, 50, 37), seed=2) < 1e-4
  order = model.layer_order()
  assert order[0] == ("encoder", "stem") and order[-3:] == [
    ("decoder", "blocks", 4, "conv1"),
    ("decoder", "blocks", 4, "conv2"),
    ("segmentation_head",),
  ]
  assert ("encoder", "layers", 1, 0, "downsample") in order  # layer2.0 has a strided 1x1 projection


@pytest.mark.parametrize(
  "kwargs,shape",
  [
    # Bottleneck encoder to depth 4 (layer4's weights ignored), dilated layer3 (output_stride 8), decoder
    # convs with biases and no norm, nearest-exact resizing, odd size.
    (
      {
        "encoder_name": "resnet50",
        "encoder_depth": 4,
        "decoder_channels": [8, 6, 4, 4],
        "in_channels": 1,
        "classes": 2,
        "output_stride": 8,
        "decoder_use_norm": False,
        "decoder_interpolation": "nearest-exact",
      },
      (1, 1, 45, 33),
    ),
    # Grouped bottleneck (ResNeXt) to depth 3, affine instance-norm decoder, bilinear resizing, and an
    # auxiliary classification head whose weights are dropped.
    (
      {
        "encoder_name": "resnext50_32x4d",
        "encoder_depth": 3,
        "decoder_channels": [6, 4, 4],
        "in_channels": 3,
        "classes": 2,
        "decoder_use_norm": {"type": "instancenorm", "affine": True},
        "decoder_interpolation": "bilinear",
        "aux_params": {"classes": 5},
      },
      (2, 3, 32, 40),
    ),
  ],
  ids=["resnet50_depth4_os8_nonorm_exact", "resnext50_depth3_instance_bilinear_aux"],
)
@pytest.mark.slow
def test_bottleneck_variants_logits_match(kwargs, shape):
  net, model = _pair(kwargs, seed=4)
  torch_forward = (lambda x: net(x)[0]) if "aux_params" in kwargs else net
  assert compare(torch_forward, _jitted(model), shape) < 1e-4


def _small():
  kwargs = {"encoder_name": "resnet18", "encoder_depth": 2, "decoder_channels": [4, 4], "in_channels": 1, "classes": 2}
  return kwargs, _random_unet(kwargs, 7, (1, 1, 32, 32))


def test_strict_loading_names_extra_missing_and_misshapen_keys():
  kwargs, net = _small()
  state = torch_state(net)
  assert any(k.startswith("encoder.layer4.") for k in state)  # unused stages are ignored explicitly
  fresh = lambda: smp_zoo.Unet(**kwargs, rngs=nnx.Rngs(0))
  with pytest.raises(ConversionError, match=r"unexpected keys.*decoder\.blocks\.0\.extra\.weight"):
    smp_unet.load_weights(fresh(), {**state, "decoder.blocks.0.extra.weight": np.zeros(3, np.float32)})
  missing = {k: v for k, v in state.items() if k != "encoder.layer1.1.bn2.running_var"}
  with pytest.raises(ConversionError, match=r"missing key 'encoder\.layer1\.1\.bn2\.running_var'"):
    smp_unet.load_weights(fresh(), missing)
  with pytest.raises(ConversionError, match=r"segmentation_head\.0\.weight.*shape"):
    smp_unet.load_weights(fresh(), {**state, "segmentation_head.0.weight": np.zeros((3, 4, 3, 3), np.float32)})
  # A checkpoint of another configuration (a decoder with norms vs without) is refused, not guessed.
  with pytest.raises(ConversionError, match="decoder.blocks.0.conv1.0.bias"):
    smp_unet.load_weights(smp_zoo.Unet(**kwargs, decoder_use_norm=False, rngs=nnx.Rngs(0)), state)
  # DDP's "module." prefix is accepted; the model then equals smp's.
  model = fresh()
  smp_unet.load_weights(model, {f"module.{k}": v for k, v in state.items()})
  assert compare(net, _jitted(model), (1, 1, 24, 20)) < 1e-4


def test_unsupported_options_refused():
  ok = {"encoder_name": "resnet18", "encoder_depth": 2, "decoder_channels": [4, 4]}
  for bad, message in [
    ({"encoder_name": "efficientnet-b0"}, "encoder 'efficientnet-b0' is not supported"),
    ({"decoder_attention_type": "scse"}, "decoder_attention_type"),
    ({"activation": "sigmoid"}, "logits"),
    ({"decoder_use_norm": "layernorm"}, "layernorm"),
    ({"decoder_use_norm": "inplace"}, "InPlaceABN"),
    ({"decoder_use_norm": {"type": "batchnorm", "track_running_stats": False}}, "running statistics"),
    ({"decoder_interpolation": "bicubic"}, "decoder_interpolation"),
    ({"decoder_channels": [4, 4, 4]}, "encoder_depth=2"),
    ({"encoder_depth": 6, "decoder_channels": [4] * 6}, "encoder_depth must be 1 to 5"),
    ({"output_stride": 4}, "output_stride"),
    ({"aux_params": {"classes": 2, "pooling": "avg", "dropot": 0.1}}, "aux_params"),
  ]:
    with pytest.raises(ConversionError, match=message):
      smp_zoo.Unet(**{**ok, **bad}, rngs=nnx.Rngs(0))
  # smp < 0.5's decoder_use_batchnorm still selects the decoder norm.
  legacy = smp_zoo.Unet(**ok, decoder_use_batchnorm=False, rngs=nnx.Rngs(0))
  assert legacy.decoder["blocks"][0].conv1.norm is None and legacy.decoder["blocks"][0].conv1.conv.bias is not None
  with pytest.raises(ValueError, match="2D"):
    smp_zoo.Unet(**ok, rngs=nnx.Rngs(0))(np.zeros((1, 8, 8, 8, 3), np.float32))


def test_convert_bare_checkpoint_round_trip(tmp_path):
  from scribblejax.convert.folder import convert
  from scribblejax.models.ordering import layer_order
  from scribblejax.models.store import load_model

  kwargs, net = _small()
  torch.save(net.state_dict(), tmp_path / "unet.pth")
  out = convert(tmp_path / "unet.pth", tmp_path / "model", arch="segmentation_models_pytorch.Unet", kwargs=kwargs)
  model, info = load_model(out)
  assert (
    info.family == "smp.Unet"
    and {k: info.kwargs[k] for k in kwargs} == kwargs
    and info.normalization in (None, {"kind": "none"})
  )
  assert compare(net, _jitted(model), (2, 1, 32, 32), seed=5) < 1e-4
  assert layer_order(model)[-1] == ("segmentation_head",)
  with pytest.raises(ConversionError, match="does not accept"):
    convert(
      tmp_path / "unet.pth",
      tmp_path / "bad",
      arch="segmentation_models_pytorch.Unet",
      kwargs={**kwargs, "encoder_output_stride": 16},
    )
  assert not (tmp_path / "bad").exists()
