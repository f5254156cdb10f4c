"""Batched refinement: every batch scheme equals refining the images one by one."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scribblejax as sj
from scribblejax.testing import random_unet


@functools.cache
def _split():
  return sj.split_params(random_unet(2, (4, 8), classes=3), sj.last_layers(3))


def _batch(n=3, size=16, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, size, size)).astype(np.float32)
  marks = np.full((n, size, size), -1, np.int32)
  marks[0, 2:4, 2:10] = 1
  marks[0, 10:12, 4:12] = 2
  marks[0, 14, 14] = 0
  marks[1, 5:7, 5:7] = 0
  marks[1, 0, 0] = 2
  marks[1, 12, 3] = 1
  # image 2 has no marks: no step, satisfied
  return images, marks


CFG = sj.RefineConfig.paper(max_steps=30, learning_rate=0.05, momentum=0.9, prox_weight=0.01)


def _assert_matches(batched, singles, atol=1e-4):
  for i, one in enumerate(singles):
    assert int(batched.num_steps[i]) == int(one.num_steps)
    assert bool(batched.satisfied[i]) == bool(one.satisfied)
    assert bool(batched.nonfinite[i]) == bool(one.nonfinite)
    np.testing.assert_allclose(np.asarray(batched.logits[i]), np.asarray(one.logits), rtol=1e-4, atol=atol)
    for a, b in zip(jax.tree.leaves(batched.tunable), jax.tree.leaves(one.tunable)):
      np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
  "scheme, driver", [("vmap", "host"), ("sequential", "host"), ("matmul", "loop"), ("shifted", "loop")]
)
@pytest.mark.slow
def test_batch_equals_one_by_one(scheme, driver):
  split = _split()
  images, marks = _batch()
  config = dataclasses.replace(CFG, driver=driver)
  singles = [sj.refine(split, images[i], marks[i], config) for i in range(len(images))]
  steps = [int(r.num_steps) for r in singles]
  assert steps[0] != steps[1] and steps[2] == 0  # the examples really differ
  batched = sj.refine_batch(split, images, marks, dataclasses.replace(config, batch_scheme=scheme))
  assert batched.logits.shape == (3, 16, 16, 3)
  _assert_matches(batched, singles)


@pytest.mark.slow
def test_batch_with_per_image_start_weights_continues_each_image():
  split = _split()
  images, marks = _batch()
  short = dataclasses.replace(CFG, max_steps=3)
  first = [sj.refine(split, images[i], marks[i], short) for i in range(len(images))]
  start = jax.tree.map(lambda *xs: jnp.stack(xs), *[r.tunable for r in first])
  singles = [sj.refine(split, images[i], marks[i], CFG, start=first[i].tunable) for i in range(len(images))]
  assert int(singles[0].num_steps) > 0
  for scheme in ("vmap", "sequential"):
    batched = sj.refine_batch(split, images, marks, dataclasses.replace(CFG, batch_scheme=scheme), start=start)
    _assert_matches(batched, singles)


def test_bad_batched_start_and_scheme_raise():
  split = _split()
  images, marks = _batch()
  with pytest.raises(ValueError, match="leading batch axis|shape"):
    sj.refine_batch(split, images, marks, CFG, start=split.tunable)  # no batch axis
  with pytest.raises(ValueError, match="batch_scheme"):
    sj.RefineConfig.paper(batch_scheme="parallel")
  with pytest.raises(ValueError, match="a batch needs a leading batch axis"):
    sj.refine_batch(split, images[0], marks[0], CFG)  # one image, not a batch
  with pytest.raises(ValueError, match="at least one image"):
    sj.refine_batch(split, images[:0], marks[:0], CFG)
  assert sj.refine_batch.__module__ == "scribblejax.refinement.api"
