"""Model store (save/load) and intensity normalisation."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import scribblejax as sj

KWARGS = dict(spatial_dims=2, in_channels=1, num_classes=3, channels=[4, 8], norm="batch")


def test_save_load_round_trip(tmp_path):
  model = sj.UNet(**KWARGS, rngs=nnx.Rngs(7))
  path = sj.save_model(
    tmp_path / "m",
    model,
    family="scribblejax.UNet",
    kwargs=KWARGS,
    normalization={"kind": "zscore"},
    class_names=["bg", "a", "b"],
    metadata={"note": 1},
  )
  loaded, info = sj.load_model(path)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 12, 12, 1)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
  assert info.class_names == ("bg", "a", "b") and info.normalization == {"kind": "zscore"}
  assert info.metadata == {"note": 1}
  # no temporary folders left behind
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
  with pytest.raises(ValueError, match="already exists"):
    sj.save_model(path, model, family="scribblejax.UNet", kwargs=KWARGS)


def test_store_refuses_bad_input(tmp_path):
  model = sj.UNet(**KWARGS, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown model family"):
    sj.save_model(tmp_path / "x", model, family="os.system", kwargs={})
  with pytest.raises(ValueError, match="does not match"):
    sj.save_model(tmp_path / "y", model, family="scribblejax.UNet", kwargs={**KWARGS, "num_classes": 4})
  with pytest.raises(ValueError, match="no model at"):
    sj.load_model(tmp_path / "missing")
  path = sj.save_model(tmp_path / "m", model, family="scribblejax.UNet", kwargs=KWARGS)
  config = json.loads((path / "model.json").read_text())
  config["family"] = "builtins.eval"
  (path / "model.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="unknown model family"):
    sj.load_model(path)
  # hand-edited fields of the wrong kind are named (were: AttributeError deep in the command line)
  config["family"] = "scribblejax.UNet"
  for key, value, message in (
    ("metadata", [1], r'"metadata" must be an object, got list'),
    ("metadata", {"refine": "fast"}, r'"metadata.refine" must be an object, got str'),
    ("class_names", "bgnuc", r'"class_names" must be a list of names'),
  ):
    (path / "model.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=message):
      sj.models.read_info(path)
  # weights that hold NaN (a diverged training) are refused when loaded, not used (was: all background)
  kernel = nnx.to_flat_state(nnx.state(model, nnx.Param))[0][1]
  kernel.set_value(kernel.get_value() * np.nan)
  sj.save_model(tmp_path / "nan", model, family="scribblejax.UNet", kwargs=KWARGS)
  with pytest.raises(ValueError, match=r"hold NaN or Inf values \(1 array\(s\)"):
    sj.load_model(tmp_path / "nan")


def test_overwrite_replaces_only_a_model_folder_and_never_loses_both(tmp_path, monkeypatch):
  model = sj.UNet(**KWARGS, rngs=nnx.Rngs(0))
  other = sj.UNet(**KWARGS, rngs=nnx.Rngs(1))
  save = lambda m, path: sj.save_model(path, m, family="scribblejax.UNet", kwargs=KWARGS, overwrite=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 12, 12, 1)), jnp.float32)
  work = tmp_path / "work"  # a user's folder: a checkpoint and notes
  work.mkdir()
  (work / "model.pt").write_bytes(b"checkpoint")
  (work / "notes.txt").write_text("notes")
  with pytest.raises(ValueError, match="not a scribblejax-model folder"):
    save(model, work)
  assert sorted(p.name for p in work.iterdir()) == ["model.pt", "notes.txt"]  # nothing deleted
  path = save(model, tmp_path / "m")
  (path / "notes.txt").write_text("notes")
  with pytest.raises(ValueError, match=r"also holds \['notes.txt'\]"):
    save(other, path)
  (path / "notes.txt").unlink()
  save(other, path)  # a plain model folder is replaced
  np.testing.assert_array_equal(np.asarray(sj.load_model(path)[0](x)), np.asarray(other(x)))

  def interrupted(src, dst, _replace=__import__("os").replace):
    if str(src).startswith(str(tmp_path / ".m.")) and not str(src).startswith(str(tmp_path / ".m.old")):
      raise KeyboardInterrupt  # Ctrl-C as the new folder moves in
    return _replace(src, dst)

  monkeypatch.setattr("os.replace", interrupted)
  with pytest.raises(KeyboardInterrupt):
    save(model, path)
  monkeypatch.undo()
  np.testing.assert_array_equal(np.asarray(sj.load_model(path)[0](x)), np.asarray(other(x)))  # old one intact
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "work"]  # no temporary left


def test_load_refuses_weights_that_do_not_match_model_json(tmp_path):
  model = sj.UNet(**KWARGS, rngs=nnx.Rngs(0))
  path = sj.save_model(tmp_path / "m", model, family="scribblejax.UNet", kwargs=KWARGS)
  config = json.loads((path / "model.json").read_text())
  (path / "model.json").write_text(json.dumps({**config, "kwargs": {**KWARGS, "num_classes": 4}}))
  with pytest.raises(ValueError, match=r"do not match model.json: parameter .* has shape \(3,\), .* has \(4,\)"):
    sj.load_model(path)  # was: loaded, and reported 4 classes
  (path / "model.json").write_text(json.dumps({**config, "kwargs": {**KWARGS, "norm": "instance"}}))
  with pytest.raises(ValueError, match=r"do not match .*: they hold unknown parameters \['.*mean"):
    sj.load_model(path)  # batch-norm statistics an instance norm lacks
  for broken in ({k: v for k, v in config.items() if k != "family"}, [config]):
    (path / "model.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="model.json"):
      sj.load_model(path)


def test_normalize_kinds():
  rng = np.random.default_rng(0)
  image = rng.normal(5.0, 2.0, size=(32, 32, 2)).astype(np.float32)
  original = image.copy()
  z = sj.normalize(image, {"kind": "zscore"})
  np.testing.assert_allclose(z.mean(axis=(0, 1)), 0.0, atol=1e-5)
  np.testing.assert_allclose(z.std(axis=(0, 1)), 1.0, atol=1e-4)
  m = sj.normalize(image, [{"kind": "minmax"}, {"kind": "scale", "factor": 0.5}])
  assert m[..., 0].min() == 0.0 and m[..., 0].max() == pytest.approx(1.0)
  np.testing.assert_allclose(m[..., 1], image[..., 1] * 0.5)
  ct = sj.normalize(image, {"kind": "ct", "lower": 4.0, "upper": 6.0, "mean": 5.0, "std": 0.5})
  assert ct.min() == pytest.approx(-2.0) and ct.max() == pytest.approx(2.0)
  p = sj.normalize(image, {"kind": "percentile", "lower": 1, "upper": 99})
  assert p.min() == 0.0 and p.max() == 1.0
  np.testing.assert_array_equal(image, original)
  with pytest.raises(ValueError, match="unknown normalisation kind"):
    sj.normalize(image, {"kind": "magic"})
  with pytest.raises(ValueError, match="2 channels"):
    sj.normalize(image[..., :1], [{"kind": "none"}, {"kind": "none"}])


def test_normalize_needs_a_channel_axis_or_spatial_dims():
  image = np.arange(256, dtype=np.float32).reshape(16, 16)
  with pytest.raises(ValueError, match="spatial_dims=2"):
    sj.normalize(image, {"kind": "minmax"})  # was: each column scaled on its own
  flat = sj.normalize(image, {"kind": "minmax"}, spatial_dims=2)
  assert flat.shape == (16, 16)
  np.testing.assert_allclose(flat.ravel(), np.arange(256) / 255, atol=1e-6)  # one range for the image
  np.testing.assert_array_equal(sj.normalize(image[..., None], {"kind": "minmax"}, spatial_dims=2)[..., 0], flat)
  volume = np.arange(512, dtype=np.float32).reshape(8, 8, 8)
  np.testing.assert_allclose(
    sj.normalize(volume, {"kind": "minmax"}, spatial_dims=3).ravel(), np.arange(512) / 511, atol=1e-6
  )
  with pytest.raises(ValueError, match="3D image has 3 axes"):
    sj.normalize(image, {"kind": "minmax"}, spatial_dims=3)


@pytest.mark.parametrize(
  "spec, message",
  [
    ({"kind": "zscore", "mean": 0, "std": -1}, "std must be positive"),
    ({"kind": "zscore", "std": 0}, "std must be positive"),
    ({"kind": "percentile", "lower": 99, "upper": 1}, "lower < upper"),
    ({"kind": "percentile", "lower": -5, "upper": 50}, "0 <= lower"),
    ({"kind": "ct", "lower": 100, "upper": 0, "mean": 0, "std": 1}, "lower < upper"),
    ({"kind": "scale", "factor": 0}, "factor 0"),
    ({"kind": "scale", "factor": float("nan")}, "finite"),
    ({"kind": "zscore", "mean": "a"}, "must be a number"),
  ],
)
def test_normalize_refuses_meaningless_specs(spec, message):
  with pytest.raises(ValueError, match=message):
    sj.normalize(np.ones((4, 4, 1), np.float32), spec)


def test_masked_zscore_normalises_the_filled_nonzero_region_only():
  image = np.zeros((12, 12, 2), np.float32)
  image[2:10, 2:10, 0] = np.arange(64).reshape(8, 8) + 1.0
  image[5, 5, 0] = 0.0  # a hole: inside the region
  image[3, 3, 1] = 7.0  # channel 1 is non-zero at one pixel only
  out = sj.normalize(image, {"kind": "zscore", "mask": "nonzero"})
  region = np.zeros((12, 12), bool)
  region[2:10, 2:10] = True
  for c in range(2):
    np.testing.assert_allclose(out[..., c][region].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[..., c][region].std(), 1.0, atol=1e-5)
  assert (out[~region] == 0).all() and out[5, 5, 0] < 0
  with pytest.raises(ValueError, match="only 'zscore' takes a mask"):
    sj.normalize(image, {"kind": "minmax", "mask": "nonzero"})
