"""Ensembles: the mean of several networks' logits, stored like any model, refined as one."""

import jax
import numpy as np
import pytest
from flax import nnx

import scribblejax as sj
from scribblejax.models import surgery
from scribblejax.models.ensemble import Ensemble
from scribblejax.models.store import load_model, save_model

KWARGS = {"spatial_dims": 2, "in_channels": 1, "num_classes": 2, "channels": [4, 8]}


def _nets(n=3):
  return [sj.UNet(**KWARGS, rngs=nnx.Rngs(k)) for k in range(n)]


def _x():
  return np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)


@pytest.mark.slow
def test_an_ensemble_is_the_mean_of_its_networks_and_tunes_each_ones_last_layers():
  nets = _nets()
  ensemble = Ensemble.of(nets, "scribblejax.UNet")
  want = sum(np.asarray(n(_x())) for n in nets) / 3
  np.testing.assert_allclose(np.asarray(ensemble(_x())), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ensemble.member(2)(_x())), np.asarray(nets[2](_x())), rtol=1e-6, atol=1e-6)
  assert ensemble.layer_order() == [("net", *p) for p in nets[0].layer_order()]
  split = sj.split_params(ensemble, sj.last_layers(2))
  one = sj.split_params(nets[0], sj.last_layers(2))
  assert [a.shape for a in jax.tree.leaves(split.tunable)] == [(3, *b.shape) for b in jax.tree.leaves(one.tunable)]
  # what the library reads off a network: an image without its channel axis is accepted as for one UNet
  assert (ensemble.spatial_dims, ensemble.in_channels, ensemble.num_classes) == (2, 1, 2)
  np.testing.assert_allclose(
    np.asarray(sj.predict(split, _x()[0, ..., 0])), np.asarray(ensemble(_x()[:1]))[0], rtol=1e-5, atol=1e-6
  )
  with pytest.raises(ValueError, match=r"the ensemble has members 0..2, not 3"):
    ensemble.member(3)


def test_the_patches_per_call_count_mirrored_copies_and_networks():
  from scribblejax.pipeline.network import network_passes as _passes
  from scribblejax.pipeline.sliding_window import Mirrored, SliceWise

  ensemble = Ensemble.of(_nets(3), "scribblejax.UNet")
  assert _passes(ensemble) == 3 and _passes(_nets(1)[0]) == 1
  assert _passes(Mirrored(ensemble, (0, 1), (16, 16, 1))) == 12
  assert _passes(SliceWise(Mirrored(ensemble, (1,), (16, 16, 1)), (16, 16, 1))) == 6


def test_an_ensemble_is_stored_and_loaded_like_any_model(tmp_path):
  ensemble = Ensemble.of(_nets(2), "scribblejax.UNet")
  kwargs = {"family": "scribblejax.UNet", "kwargs": KWARGS, "members": 2}
  save_model(tmp_path / "m", ensemble, family="scribblejax.Ensemble", kwargs=kwargs, class_names=["bg", "fg"])
  loaded, info = load_model(tmp_path / "m")
  assert isinstance(loaded, Ensemble) and loaded.members == 2 and info.family == "scribblejax.Ensemble"
  np.testing.assert_array_equal(np.asarray(loaded(_x())), np.asarray(ensemble(_x())))
  fresh = Ensemble("scribblejax.UNet", KWARGS, 2, rngs=nnx.Rngs(0))  # members drawn apart
  assert not np.allclose(np.asarray(fresh.member(0)(_x())), np.asarray(fresh.member(1)(_x())))


def test_classes_are_added_and_suppressed_in_every_network():
  ensemble = Ensemble.of(_nets(2), "scribblejax.UNet")
  before = np.asarray(ensemble(_x()))
  added = np.asarray(surgery.add_classes(ensemble, 1)(_x()))
  assert added.shape[-1] == 3 and np.array_equal(added.argmax(-1), before.argmax(-1))
  np.testing.assert_allclose(added[..., :2], before, rtol=1e-6, atol=1e-6)
  assert before.argmax(-1).any()
  assert not np.asarray(surgery.suppress_class(ensemble, 1, amount=100.0)(_x())).argmax(-1).any()


def test_bad_ensembles_are_refused_by_name():
  with pytest.raises(ValueError, match="network 1 of the ensemble differs in structure or shapes from network 0"):
    Ensemble.of([sj.UNet(**KWARGS, rngs=nnx.Rngs(0)), sj.UNet(**{**KWARGS, "channels": [4, 4]}, rngs=nnx.Rngs(0))])
  with pytest.raises(ValueError, match="at least one network"):
    Ensemble.of([])
  with pytest.raises(ValueError, match="positive number of members, got 0"):
    Ensemble("scribblejax.UNet", KWARGS, 0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="members cannot be ensembles"):
    Ensemble("scribblejax.Ensemble", {}, 2, rngs=nnx.Rngs(0))
