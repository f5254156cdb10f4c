"""Fixtures shared by several test files."""

import os

import pytest
from flax import nnx

from scribblejax import data
from scribblejax.models.store import save_model
from scribblejax.models.unet import UNet
from scribblejax.normalize import normalize
from scribblejax.train import TrainConfig, train_segmenter

# The command line keeps compiled programs on disk (scribblejax.cli.enable_compilation_cache); the tests,
# which call it in-process and in subprocesses, do not write there (one test turns it on on purpose).
os.environ["SCRIBBLEJAX_COMPILATION_CACHE"] = "0"

NORM = {"kind": "percentile", "lower": 1.0, "upper": 99.8}
KW = dict(spatial_dims=2, in_channels=1, num_classes=2, channels=[4, 8])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
  """A 4/8 U-Net trained for 40 Adam steps on the DSB training columns, saved to a folder: (model, folder)."""
  ds = data.nuclei2d("binary")
  model = UNet(**KW, rngs=nnx.Rngs(0))
  train_segmenter(model, normalize(ds.image, NORM)[ds.train], ds.labels[ds.train],
                  TrainConfig(steps=40, crop=48, batch_size=4, learning_rate=1e-2), progress=False)
  folder = tmp_path_factory.mktemp("models") / "tiny"
  save_model(folder, model, family="scribblejax.UNet", kwargs=KW, normalization=NORM,
             class_names=["background", "nucleus"])
  return model, folder
