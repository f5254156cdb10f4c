"""The one registry of model families: every family builds, converts and loads through it, torch-free."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from scribblejax.models import families, store
from scribblejax.models.families import FAMILIES, SOURCES, Family, build_model, family, family_of_source

# the family names model.json files written so far use: they must keep loading
STORED_NAMES = (
  "scribblejax.UNet",
  "nnunet.PlainConvUNet",
  "nnunet.ResidualEncoderUNet",
  "monai.BasicUNet",
  "monai.UNet",
  "monai.SegResNet",
  "smp.Unet",
  "scribblejax.Ensemble",
  "scribblejax.Regions",
)


def test_every_stored_family_name_is_registered_once():
  assert set(STORED_NAMES) <= set(FAMILIES)
  assert all(name == f.name and isinstance(f, Family) for name, f in FAMILIES.items())
  assert store.FAMILIES is FAMILIES and store.build_model is build_model
  with pytest.raises(TypeError):
    FAMILIES["mine"] = Family("mine", "x:y")  # a fixed table


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_builders_and_converters_resolve(name):
  entry = family(name)
  cls = entry.constructor()
  assert isinstance(cls, type) and issubclass(cls, nnx.Module)
  if entry.converter is None:
    with pytest.raises(ValueError, match="no PyTorch converter"):
      entry.load_weights()
  else:
    assert callable(entry.load_weights())


def test_sources_name_their_family():
  assert family_of_source("monai.networks.nets.BasicUNet").name == "monai.BasicUNet"
  assert family_of_source("segmentation_models_pytorch.Unet").name == "smp.Unet"
  assert family_of_source("torch.nn.Linear") is None
  assert all(f.converter is not None for f in SOURCES.values())
  from scribblejax.convert.folder import SUPPORTED_ARCHS

  assert SUPPORTED_ARCHS == tuple(sorted(SOURCES))


def test_unknown_family_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown model family 'x\.Net'; known families: \[.*'smp\.Unet'"):
    family("x.Net")
  with pytest.raises(ValueError, match="rejects the arguments"):
    build_model("scribblejax.UNet", {"no_such_argument": 1})


def test_a_converted_family_saves_and_loads_through_the_registry(tmp_path):
  kwargs = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "features": [2, 2, 2, 2, 2, 2]}
  model = build_model("monai.BasicUNet", kwargs)
  store.save_model(tmp_path / "m", model, family="monai.BasicUNet", kwargs=kwargs)
  assert json.loads((tmp_path / "m" / "model.json").read_text())["family"] == "monai.BasicUNet"
  loaded, info = store.load_model(tmp_path / "m")
  assert type(loaded) is type(model) and info.family == "monai.BasicUNet"


def test_the_registry_and_every_zoo_module_import_without_torch():
  code = (
    "import sys; from scribblejax.models import families\n"
    "for f in families.FAMILIES.values():\n"
    "  f.constructor(); f.converter and f.load_weights()\n"
    "assert 'torch' not in sys.modules, 'torch was imported'"
  )
  root = Path(families.__file__).resolve().parents[2]
  subprocess.run(
    [sys.executable, "-c", code], check=True, cwd=root, env={"PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
  )
