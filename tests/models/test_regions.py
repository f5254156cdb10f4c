"""Region-based networks read as classes (scribblejax.models.Regions), without torch."""

import jax
import numpy as np
import pytest
from flax import nnx

import scribblejax as sj
from scribblejax.models.store import load_model, save_model


@pytest.mark.parametrize("order", [(1, 2, 3), (3, 1, 2), (2, 1), (1,)])
def test_the_scores_argmax_is_nnunets_rule(order):
  rng = np.random.default_rng(len(order))
  z = (rng.normal(size=(4000, len(order))) * 3).astype(np.float32)
  scores = np.asarray(sj.models.region_scores(z, order))
  want = sj.models.region_labels(z, order)
  assert scores.shape == (4000, len(order) + 1)
  assert (scores.argmax(-1) == want).all()
  assert np.bincount(want, minlength=len(order) + 1).min() > 100  # every class occurs: a real test
  # nnU-Net's rule written out: each region in turn writes its class where its sigmoid exceeds 0.5
  seg = np.zeros(4000, np.int32)
  for i, c in enumerate(order):
    seg[1 / (1 + np.exp(-z[:, i])) > 0.5] = c
  np.testing.assert_array_equal(want, seg)


def test_bad_class_orders_are_refused():
  for bad in ([], [0, 1], [1, 1], [1, 3], "12", [1.5, 2]):
    with pytest.raises(ValueError, match="class order"):
      sj.models.region_scores(np.zeros((2, max(len(bad), 1)), np.float32), bad)
  with pytest.raises(ValueError, match="2 regions in the class order, but the network gives 3"):
    sj.models.region_scores(np.zeros((2, 3), np.float32), [1, 2])
  net = sj.UNet(spatial_dims=2, in_channels=1, num_classes=3, channels=[4, 8], rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="gives 3 outputs but the class order names 2 regions"):
    sj.models.Regions.of(net, [1, 2])


@pytest.mark.slow
def test_a_regions_network_stores_reloads_and_refines_as_classes(tmp_path):
  kwargs = dict(spatial_dims=2, in_channels=1, num_classes=2, channels=[4, 8])
  model = sj.models.Regions.of(sj.UNet(**kwargs, rngs=nnx.Rngs(1)), [2, 1], "scribblejax.UNet")
  assert model.num_classes == 3 and model.spatial_dims == 2 and model.in_channels == 1
  folder = save_model(
    tmp_path / "m",
    model,
    family="scribblejax.Regions",
    kwargs={"family": "scribblejax.UNet", "kwargs": kwargs, "order": [2, 1]},
  )
  loaded, info = load_model(folder)
  image = np.random.default_rng(0).normal(size=(24, 24, 1)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(loaded(image[None])), np.asarray(model(image[None])), atol=1e-6)
  raw = np.asarray(model.net(image[None]))[0]
  np.testing.assert_array_equal(
    np.asarray(sj.predict(sj.split_params(loaded, sj.head()), image)).argmax(-1), sj.models.region_labels(raw, [2, 1])
  )
  # "the last l layers" are the wrapped network's; marks of every class are honoured
  split = sj.split_params(loaded, sj.last_layers(3))
  inner = sj.params.tunable_paths(loaded.net, sj.last_layers(3))
  assert (
    sj.params.tunable_paths(loaded, sj.last_layers(3)) == tuple(("net", *p) for p in inner)
    and ("head", "kernel") in inner
  )
  labels = sj.models.region_labels(raw, [2, 1])
  marks = np.full((24, 24), -1, np.int32)
  for c in range(3):
    wrong = np.argwhere(labels != c)[:2]
    for r, col in wrong:
      marks[r, col] = c
  result = sj.refine(split, image, marks, sj.RefineConfig.paper(max_steps=300, learning_rate=0.05))
  assert bool(result.satisfied)
  got = sj.models.region_labels(np.asarray(sj.params.merge_params(split, result.tunable).net(image[None]))[0], [2, 1])
  assert (got[marks >= 0] == marks[marks >= 0]).all()


@pytest.mark.slow
def test_the_sliding_window_blends_region_logits_and_the_wrappers_refuse_scores():
  # nnU-Net blends the patches' region logits, then reads classes; blending class scores would differ.
  from scribblejax.pipeline.sliding_window import Mirrored, PatchBlend

  net = sj.UNet(spatial_dims=2, in_channels=1, num_classes=2, channels=[4, 8], rngs=nnx.Rngs(3))
  model = sj.models.Regions.of(net, [1, 2])
  image = np.random.default_rng(1).normal(size=(40, 36, 1)).astype(np.float32)
  split = sj.split_params(model, sj.last_layers(2))
  got = sj.pipeline.sliding_window_logits(split, image, (16, 16))
  raw = sj.pipeline.sliding_window_logits(sj.split_params(net, sj.last_layers(2)), image, (16, 16))
  np.testing.assert_allclose(got, np.asarray(sj.models.region_scores(raw, [1, 2])), atol=1e-5)
  assert got.shape == (40, 36, 3) and (got.argmax(-1) == sj.models.region_labels(raw, [1, 2])).all()
  # with other tunable weights too (given in the Regions split's structure)
  tunable = jax.tree.map(lambda w: w * 1.5, split.tunable)
  inner = sj.split_params(net, sj.last_layers(2))
  raw2 = sj.pipeline.sliding_window_logits(
    inner, image, (16, 16), jax.tree.unflatten(jax.tree.structure(inner.tunable), jax.tree.leaves(tunable))
  )
  np.testing.assert_allclose(
    sj.pipeline.sliding_window_logits(split, image, (16, 16), tunable),
    np.asarray(sj.models.region_scores(raw2, [1, 2])),
    atol=1e-5,
  )
  assert np.abs(raw2 - raw).max() > 1e-3
  for wrap in (
    lambda: Mirrored(model, (0,), (16, 16, 1)),
    lambda: PatchBlend(model, [(0, 0)], (16, 16), 1),
    lambda: sj.models.Ensemble.of([model, model]),
  ):
    with pytest.raises(ValueError, match="class scores"):
      wrap()


@pytest.mark.slow
def test_wrappers_of_a_network_without_a_stated_layer_order_are_traced():
  # Regions and Ensemble read their network's stated order; without one, sj.models.ordering traces the
  # wrapper's forward pass like any other model's (was: a ValueError naming the wrapper)
  class Plain(nnx.Module):
    def __init__(self, rngs):
      self.first = nnx.Conv(1, 4, (3, 3), rngs=rngs)
      self.last = nnx.Conv(4, 2, (1, 1), rngs=rngs)

    def __call__(self, x):
      return self.last(nnx.relu(self.first(x)))

  example = jax.ShapeDtypeStruct((1, 8, 8, 1), np.float32)
  for model in (
    sj.models.Regions.of(Plain(nnx.Rngs(0)), [1, 2]),
    sj.models.Ensemble.of([Plain(nnx.Rngs(0)), Plain(nnx.Rngs(1))]),
  ):
    assert sj.models.layer_order(model, example) == (("net", "first"), ("net", "last"))
    with pytest.raises(ValueError, match="states no layer order; pass an example input"):
      sj.models.layer_order(model)
  assert sj.params.tunable_paths(sj.models.Regions.of(Plain(nnx.Rngs(0)), [1, 2]), sj.last_layers(1), example) == (
    ("net", "last", "bias"),
    ("net", "last", "kernel"),
  )
