"""bf16 compute, layer-wise rematerialisation and the compiled-memory report."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scribblejax as sj
from scribblejax import kernels
from scribblejax.refinement import backend as backend_lib
from scribblejax.refinement import network, trunk
from scribblejax.testing import random_unet

CONV_BACKENDS = ["xla"] + (["onednn"] if kernels.kernel_status().available else [])


@functools.cache
def _unet(dims: int, channels=(4, 8)):
  return random_unet(dims, channels, classes=3)


def _problem(dims: int = 2, size: int = 16, seed: int = 1):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(size,) * dims).astype(np.float32)
  marks = np.full((size,) * dims, -1, np.int32)
  marks[(slice(2, 4),) * dims] = 1
  marks[(slice(size - 5, size - 3),) * dims] = 2
  marks[(0,) * dims] = 0
  return image, marks


CFG = sj.RefineConfig.paper(max_steps=15, learning_rate=0.05, prox_weight=0.01, early_stop=False)


@pytest.mark.slow
def test_bf16_compute_keeps_float32_parameters_and_tracks_float32():
  split = sj.split_params(_unet(2), sj.last_layers(4))
  image, marks = _problem()
  f32 = sj.refine(split, image, marks, CFG)
  bf16 = sj.refine(split, image, marks, dataclasses.replace(CFG, compute_dtype="bfloat16"))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.tunable))
  assert bf16.logits.dtype == jnp.float32 and int(bf16.num_steps) == 15
  # the network really computed in bf16: its logits differ from float32 ...
  scale = float(jnp.max(jnp.abs(f32.logits)))
  diff = float(jnp.max(jnp.abs(bf16.logits - f32.logits)))
  assert diff > 0
  # ... by about bf16's resolution (8 bits of mantissa), not by a different result
  assert diff < 0.1 * scale
  assert float(jnp.mean(bf16.labels == f32.labels)) > 0.95
  # and the weights moved the same way
  moved32 = jax.tree.leaves(jax.tree.map(lambda a, b: a - b, f32.tunable, split.tunable))
  moved16 = jax.tree.leaves(jax.tree.map(lambda a, b: a - b, bf16.tunable, split.tunable))
  cos = sum(float(jnp.sum(a * b)) for a, b in zip(moved32, moved16)) / np.sqrt(
    sum(float(jnp.sum(a * a)) for a in moved32) * sum(float(jnp.sum(b * b)) for b in moved16)
  )
  assert cos > 0.95


def test_bf16_with_early_stop_honours_the_marks():
  split = sj.split_params(_unet(2), sj.last_layers(4))
  image, marks = _problem(seed=3)
  result = sj.refine(
    split,
    image,
    marks,
    sj.RefineConfig.paper(max_steps=80, learning_rate=0.05, prox_weight=0.01, compute_dtype="bfloat16"),
  )
  assert bool(result.satisfied)
  labels = np.asarray(result.labels)
  assert np.all(labels[marks >= 0] == marks[marks >= 0])


def test_unknown_compute_dtype_is_refused():
  with pytest.raises(ValueError, match="compute_dtype"):
    sj.RefineConfig.paper(compute_dtype="float16")


@pytest.mark.slow
@pytest.mark.parametrize("dims, cache_trunk, driver", [(2, True, "host"), (2, False, "host"), (3, True, "loop")])
def test_remat_gives_the_same_refinement(dims, cache_trunk, driver):
  split = sj.split_params(_unet(dims), sj.last_layers(4))
  image, marks = _problem(dims, 16 if dims == 2 else 8)
  config = dataclasses.replace(CFG, max_steps=6, cache_trunk=cache_trunk, driver=driver)
  plain = sj.refine(split, image, marks, config)
  remat = sj.refine(split, image, marks, dataclasses.replace(config, remat=True))
  assert int(plain.num_steps) == int(remat.num_steps) == 6
  for a, b in zip(jax.tree.leaves(plain.tunable), jax.tree.leaves(remat.tunable)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(remat.logits), np.asarray(plain.logits), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_remat_tail_checkpoints_each_layer_and_recomputes(backend):
  split = sj.split_params(_unet(2), sj.last_layers(4))
  image = jnp.asarray(_problem()[0][..., None])
  fn = network.Forward(split.graphdef)
  # without "split_concat_conv", which applies only without remat (plain would count its extra convolutions)
  rewrites = tuple(r for r in backend_lib.default_rewrites(backend) if r != "split_concat_conv")
  residuals = trunk.partition(fn, split.tunable, split.frozen, image, rewrites=rewrites).trunk(split.frozen, image)
  loss = lambda remat: (
    lambda t: jnp.sum(
      jnp.sin(
        trunk.partition(fn, split.tunable, split.frozen, image, rewrites=rewrites, remat=remat).tail(t, residuals)
      )
    )
  )
  plain = jax.make_jaxpr(jax.grad(loss(False)))(split.tunable)
  remat = jax.make_jaxpr(jax.grad(loss(True)))(split.tunable)
  # forward convolutions: XLA's, or oneDNN's forward calls
  convs = lambda j: str(j).count("conv_general_dilated") + str(j).count("onednn_conv_forward")
  # one checkpoint per tunable layer that starts with a convolution or a matrix product
  assert str(remat).count("remat") >= 3
  assert convs(remat) > convs(plain)  # the backward pass recomputes forward convolutions
  g_plain = jax.grad(loss(False))(split.tunable)
  g_remat = jax.grad(loss(True))(split.tunable)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_memory_analysis_reports_each_program():
  split = sj.split_params(_unet(2), sj.last_layers(4))
  image, marks = _problem()
  host = sj.refinement.memory_analysis(split, image, marks, sj.RefineConfig.paper(driver="host"))
  assert host["driver"] == "host" and set(host["programs"]) == {"trunk", "chunk", "finalize"}
  chunk = host["programs"]["chunk"]
  # the chunk takes the image, the marks and the trunk's residuals as arguments
  assert chunk["argument_bytes"] >= image.nbytes + marks.nbytes
  assert chunk["alias_bytes"] > 0  # the loop state is donated
  assert host["peak_bytes"] == max(p["peak_bytes"] for p in host["programs"].values())
  loop = sj.refinement.memory_analysis(split, image, marks, sj.RefineConfig.paper(driver="loop", cache_trunk=False))
  assert set(loop["programs"]) == {"loop"} and loop["peak_bytes"] > 0
  # a bigger image needs more memory
  big_image, big_marks = _problem(size=64)
  assert (
    sj.refinement.memory_analysis(split, big_image, big_marks, sj.RefineConfig.paper(driver="host"))["peak_bytes"]
    > host["peak_bytes"]
  )


def test_memory_analysis_refuses_bad_input():
  split = sj.split_params(_unet(2), sj.last_layers(4))
  image, marks = _problem()
  with pytest.raises(ValueError, match="do not match"):
    sj.refinement.memory_analysis(split, image, marks[:8])


def test_cached_shape_check_raises_every_time():
  split = sj.split_params(_unet(2), sj.last_layers(4))
  for _ in range(2):  # the second call answers from the cache, with the same error
    with pytest.raises(ValueError, match="does not accept an image"):
      sj.refinement.num_classes_of(split, (16, 16, 3))


@pytest.mark.slow
@pytest.mark.parametrize("driver, check_every", [("host", 1), ("host", 4), ("loop", 1)])
def test_progress_reports_steps_as_they_are_taken(driver, check_every):
  split = sj.split_params(_unet(2), sj.last_layers(4))
  image, marks = _problem()
  seen = []
  config = dataclasses.replace(CFG, max_steps=9, driver=driver, check_every=check_every)
  result = sj.refine(split, image, marks, config, progress=lambda steps, total: seen.append((steps, total)))
  assert int(result.num_steps) == 9 and all(total == 9 for _, total in seen)
  steps = [s for s, _ in seen]
  assert steps == sorted(steps) and steps[-1] == 9
  if driver == "host":  # before the first chunk, then after each chunk
    assert steps == list(range(0, 9, check_every)) + [9]
  else:  # one compiled loop: once, at the end
    assert steps == [9]
