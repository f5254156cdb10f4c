"""Training: the loss falls on a tiny real problem, runs are deterministic given the seed, a run resumed
from an orbax checkpoint equals an uninterrupted one, and the ``scribblejax train`` command works."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from scribblejax.cli import main
from scribblejax.models.store import load_model
from scribblejax.models.unet import UNet
from scribblejax.pipeline.normalization import normalize
from scribblejax.research import data
from scribblejax.research.train import TrainConfig, predict_labels, sample_batch, train_segmenter

CONFIG = TrainConfig(steps=12, batch_size=2, crop=32, learning_rate=1e-2, seed=3, intensity=0.1)


@pytest.fixture(scope="module")
def problem():
  ds = data.nuclei2d()
  image = normalize(ds.image[96:160, 0:64], {"kind": "percentile", "lower": 1, "upper": 99.8})
  return image, ds.labels[96:160, 0:64]


def _model(seed=0):
  return UNet(spatial_dims=2, in_channels=1, num_classes=2, channels=(4, 8), rngs=nnx.Rngs(seed))


def _params(model):
  return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.slow
def test_loss_falls_and_training_is_deterministic(problem):
  image, labels = problem
  model_a, losses_a = train_segmenter(_model(), image, labels, CONFIG, progress=False)
  assert len(losses_a) == CONFIG.steps and np.isfinite(losses_a).all()
  assert np.mean(losses_a[-3:]) < 0.8 * np.mean(losses_a[:3])
  model_b, losses_b = train_segmenter(_model(), image, labels, CONFIG, progress=False)
  assert losses_a == losses_b
  for a, b in zip(_params(model_a), _params(model_b)):
    np.testing.assert_array_equal(a, b)
  _, losses_c = train_segmenter(_model(), image, labels, dataclasses.replace(CONFIG, seed=4, steps=3), progress=False)
  assert losses_c != losses_a[:3]
  assert predict_labels(model_a, image).shape == labels.shape


def test_resume_from_checkpoint_equals_uninterrupted_run(problem, tmp_path):
  image, labels = problem
  config = dataclasses.replace(CONFIG, steps=4)
  straight, losses = train_segmenter(_model(), image, labels, config, progress=False)
  first, _ = train_segmenter(
    _model(),
    image,
    labels,
    dataclasses.replace(config, steps=2),
    progress=False,
    checkpoint_dir=tmp_path / "ckpt",
    checkpoint_every=1,
  )
  assert (tmp_path / "ckpt" / "2").is_dir()
  resumed, losses_resumed = train_segmenter(
    _model(seed=9), image, labels, config, progress=False, checkpoint_dir=tmp_path / "ckpt"
  )
  assert losses_resumed == pytest.approx(losses, rel=1e-6)
  for a, b in zip(_params(straight), _params(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_sample_batch_stacked_and_deterministic():
  image = np.arange(3 * 10 * 12, dtype=np.float32).reshape(3, 10, 12, 1)
  labels = (image[..., 0] % 2).astype(np.int32)
  config = TrainConfig(batch_size=4, crop=8, seed=1, intensity=0.0)
  x, y = sample_batch(5, image, labels, config, stacked=True)
  assert x.shape == (4, 8, 8, 1) and y.shape == (4, 8, 8)
  np.testing.assert_array_equal(y, (x[..., 0] % 2).astype(np.int32))  # labels stay aligned after flips
  x2, _ = sample_batch(5, image, labels, config, stacked=True)
  np.testing.assert_array_equal(x, x2)
  assert not np.array_equal(x, sample_batch(6, image, labels, config, stacked=True)[0])


def test_bad_inputs_raise(problem):
  image, labels = problem
  with pytest.raises(ValueError, match="does not match"):
    train_segmenter(_model(), image, labels[:10], CONFIG, progress=False)
  with pytest.raises(ValueError, match="steps"):
    TrainConfig(steps=0)


@pytest.mark.slow
def test_train_cli_smoke_run_loads(tmp_path, capsys):
  out = tmp_path / "model"
  argv = [
    "train",
    "--task",
    "nuclei2d",
    "--out",
    str(out),
    "--steps",
    "3",
    "--batch-size",
    "2",
    "--crop",
    "32",
    "--seed",
    "1",
    "--no-progress",
  ]
  assert main(argv) == 0
  model, info = load_model(out)
  assert info.class_names == ("background", "nucleus")
  assert info.normalization["kind"] == "percentile"
  meta = info.metadata
  assert meta["command"].startswith("scribblejax train --task nuclei2d") and "--steps 3" in meta["command"]
  assert set(meta["test_dice"]) == {"background", "nucleus"} and meta["train_seconds"] > 0 and meta["machine"]
  assert model(np.zeros((1, 40, 40, 1), np.float32)).shape == (1, 40, 40, 2)
  assert main(argv) == 1  # exists, no --overwrite
  assert "already exists" in capsys.readouterr().err
  assert main(["train", "--task", "cats", "--out", str(tmp_path / "x")]) == 1
  assert "unknown task" in capsys.readouterr().err
  # refused before training, not after it: a checkpoint folder inside the model folder, an output under a file
  assert main([*argv[:4], str(tmp_path / "m2"), *argv[5:], "--checkpoint-dir", str(tmp_path / "m2" / "ckpt")]) == 1
  assert "must be apart from the model folder" in capsys.readouterr().err
  (tmp_path / "file").write_text("x")
  assert main([*argv[:4], str(tmp_path / "file" / "sub"), *argv[5:]]) == 1
  assert "is a file, not a folder" in capsys.readouterr().err
  # a run that diverges writes nothing (was: NaN weights saved, exit 0)
  assert main([*argv[:4], str(tmp_path / "nan"), *argv[5:], "--learning-rate", "1e30"]) == 1
  assert "training diverged" in capsys.readouterr().err and not (tmp_path / "nan").exists()


def test_resume_refuses_another_run_and_bad_inputs_are_named(problem, tmp_path):
  image, labels = problem
  config = dataclasses.replace(CONFIG, steps=2)
  train_segmenter(_model(), image, labels, config, progress=False, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1)
  with pytest.raises(ValueError, match=r"holds a run of other training settings: learning_rate"):
    train_segmenter(
      _model(),
      image,
      labels,
      dataclasses.replace(config, learning_rate=5e-2),
      progress=False,
      checkpoint_dir=tmp_path / "ckpt",
    )  # was: resumed silently
  three = UNet(spatial_dims=2, in_channels=1, num_classes=3, channels=(4, 8), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="other model"):
    train_segmenter(three, image, labels, config, progress=False, checkpoint_dir=tmp_path / "ckpt")
  with pytest.raises(ValueError, match="other training data"):
    train_segmenter(
      _model(), image[::-1].copy(), labels[::-1].copy(), config, progress=False, checkpoint_dir=tmp_path / "ckpt"
    )
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="is a file"):
    train_segmenter(_model(), image, labels, config, progress=False, checkpoint_dir=tmp_path / "file")
  with pytest.raises(ValueError, match=r"labels hold values 0..2, outside the model's classes 0..1"):
    train_segmenter(_model(), image, labels * 2, config, progress=False)  # was: NaN losses
  with pytest.raises(ValueError, match="integer class indices"):
    train_segmenter(_model(), image, labels * 0.5, config, progress=False)  # was: 0.5 -> class 0
  for bad in (
    dict(learning_rate=float("inf")),
    dict(intensity=float("nan")),
    dict(dice_weight=float("inf")),
    dict(steps=2.5),
    dict(crop=7.5),
    dict(intensity=1.5),
  ):
    with pytest.raises(ValueError, match=list(bad)[0]):
      dataclasses.replace(config, **bad)
