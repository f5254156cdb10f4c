"""The torch-trained MONAI backbone: converted logits equal torch's, classes, cache, determinism."""

import json

import numpy as np
import pytest

from benchmarks.correction import torch_case
from scribblejax.research import data

torch = pytest.importorskip("torch")
nets = pytest.importorskip("monai.networks.nets")


@pytest.mark.slow
def test_monai_backbone_is_the_torch_network_converted(tmp_path):
  lines = []
  cache = tmp_path / "monai"
  backbone = torch_case.monai_backbone("tissue2d", steps=2, seed=0, cache=cache, log=lines.append)
  assert backbone.num_classes == 4
  assert backbone.class_names == data.TISSUE_CLASSES
  assert backbone.normalization == {"kind": "percentile", "lower": 0.5, "upper": 99.5}
  assert backbone.info.family == "monai.BasicUNet"
  assert not cache.with_name("monai.partial").exists()
  # the torch weights as saved, against the converted model, on a test slice normalised for it
  net = torch_case.load_torch_net(cache / "model.pt", 4)
  ds = data.tissue2d()
  from scribblejax.pipeline.normalization import normalize

  image = normalize(ds.image[125], backbone.normalization)
  expected, got = torch_case.torch_logits(net, image), torch_case.jax_logits(backbone.model, image)
  assert got.shape == (197, 233, 4)
  assert np.max(np.abs(expected - got)) < 1e-4
  report = json.loads((cache / "training.json").read_text())
  assert report["max_abs_logit_difference"] < 1e-4 and len(report["losses"]) == 2
  # a second call loads the cache: no training
  again = torch_case.monai_backbone("tissue2d", steps=2, seed=0, cache=cache, log=lines.append)
  assert sum("training" in line for line in lines) == 1
  np.testing.assert_array_equal(torch_case.jax_logits(again.model, image), got)


def test_training_is_deterministic_and_leaves_torch_settings_alone():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(3, 40, 36, 1)).astype(np.float32)
  labels = (image[..., 0] > 0).astype(np.int32)
  from scribblejax.research.train import TrainConfig

  config = TrainConfig(batch_size=2, crop=32, intensity=0.1, dice_weight=1.0)
  threads, state = torch.get_num_threads(), torch.random.get_rng_state()
  runs = [
    torch_case.train_torch_unet(image, labels, 2, steps=2, seed=3, config=config, log=lambda _: None) for _ in range(2)
  ]
  assert runs[0][1] == runs[1][1]
  for a, b in zip(runs[0][0].state_dict().values(), runs[1][0].state_dict().values()):
    assert torch.equal(a, b)
  other = torch_case.train_torch_unet(image, labels, 2, steps=1, seed=4, config=config, log=lambda _: None)[0]
  assert not torch.equal(next(iter(other.state_dict().values())), next(iter(runs[0][0].state_dict().values())))
  assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
  assert torch.equal(torch.random.get_rng_state(), state)


def test_unknown_task_and_bad_steps_are_refused(tmp_path):
  with pytest.raises(ValueError, match="task"):
    torch_case.monai_backbone("tissue3d", steps=2, cache=tmp_path)
  with pytest.raises(ValueError, match="steps"):
    torch_case.monai_backbone("tissue2d", steps=0, cache=tmp_path)
