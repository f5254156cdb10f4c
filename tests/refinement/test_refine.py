"""The refinement engine: stop rule, frozen weights, equality with a plain loop, no retracing, bad input."""

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import scribblejax as sj
from scribblejax import config as config_lib
from scribblejax.refinement import algorithm, drivers, network
from scribblejax.refinement import backend as backend_lib


@functools.cache
def _model(dims: int, classes: int = 3, seed: int = 0):
  return sj.UNet(spatial_dims=dims, in_channels=1, num_classes=classes, channels=(8, 16), rngs=nnx.Rngs(seed))


def _image(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _marks_2d():
  marks = np.full((16, 16), -1, np.int32)
  marks[2:4, 2:10] = 1
  marks[10:12, 4:12] = 2
  marks[14, 14] = 0
  return marks


CFG = sj.RefineConfig.paper(max_steps=60, learning_rate=0.05, momentum=0.9, prox_weight=0.01, driver="host")


def _leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["host", "loop"])
def test_two_classes_corrected_in_one_call_2d(driver):
  split = sj.split_params(_model(2), sj.last_layers(3))
  marks = _marks_2d()
  before = np.asarray(sj.predict(split, _image((16, 16))).argmax(-1))
  assert not np.all(before[marks >= 0] == marks[marks >= 0])
  result = sj.refine(split, _image((16, 16)), marks, dataclasses.replace(CFG, driver=driver))
  assert bool(result.satisfied)
  labels = np.asarray(result.labels)
  assert np.all(labels[marks >= 0] == marks[marks >= 0])
  assert 0 < int(result.num_steps) <= CFG.max_steps


def _without_class(dims: int, absent: int):
  """A model whose head is biased so that class `absent` is predicted nowhere."""
  model = sj.UNet(spatial_dims=dims, in_channels=1, num_classes=3, channels=(8, 16), rngs=nnx.Rngs(1))
  model.head.bias[...] = model.head.bias[...].at[absent].set(-4.0)
  return model


@pytest.mark.slow
@pytest.mark.parametrize("dims, shape", [(2, (16, 16)), (3, (8, 8, 8))])
def test_class_absent_from_prediction_is_inserted(dims, shape):
  absent = 2
  split = sj.split_params(_without_class(dims, absent), sj.last_layers(3))
  image = _image(shape, seed=1)
  before = np.asarray(sj.predict(split, image).argmax(-1))
  assert not np.any(before == absent)
  marks = np.full(shape, -1, np.int32)
  region = (slice(1, 4),) * dims
  marks[region] = absent
  marks[(slice(-3, -1),) * dims] = 0
  marks[(slice(5, 6),) * dims] = 1
  result = sj.refine(
    split, image, marks, sj.RefineConfig.paper(max_steps=150, learning_rate=0.05, momentum=0.9, prox_weight=0.01)
  )
  assert bool(result.satisfied), int(result.num_steps)
  labels = np.asarray(result.labels)
  assert np.all(labels[marks >= 0] == marks[marks >= 0])
  assert np.all(labels[region] == absent)


def test_stops_at_first_satisfied_step():
  split = sj.split_params(_model(2), sj.last_layers(3))
  image, marks = _image((16, 16)), _marks_2d()
  result = sj.refine(split, image, marks, CFG)
  n = int(result.num_steps)
  assert bool(result.satisfied) and n > 1
  earlier = sj.refine(split, image, marks, dataclasses.replace(CFG, max_steps=n - 1))
  assert int(earlier.num_steps) == n - 1 and not bool(earlier.satisfied)
  later = sj.refine(split, image, marks, dataclasses.replace(CFG, max_steps=n + 20))
  assert int(later.num_steps) == n
  # the loss trace holds one value per evaluated step (n updates + the satisfied check), NaN after
  trace = np.asarray(result.loss_trace)
  assert np.all(np.isfinite(trace[: n + 1])) and np.all(np.isnan(trace[n + 1 :]))


def test_empty_marks_return_initial_prediction_with_zero_steps():
  split = sj.split_params(_model(2), sj.last_layers(3))
  image = _image((16, 16))
  result = sj.refine(split, image, np.full((16, 16), -1, np.int32), CFG)
  assert int(result.num_steps) == 0 and bool(result.satisfied)
  # the final logits come from the cached trunk and the tail: equal to the prediction up to rounding
  expected = np.asarray(sj.predict(split, image))
  np.testing.assert_allclose(np.asarray(result.logits), expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(result.labels), expected.argmax(-1))
  assert _leaves_equal(result.tunable, split.tunable)


def test_frozen_and_original_weights_untouched_tunable_moved():
  model = _model(2)
  original = jax.tree.map(np.array, nnx.state(model))
  split = sj.split_params(model, sj.last_layers(3))
  frozen_before = jax.tree.map(np.array, split.frozen)
  tunable_before = jax.tree.map(np.array, split.tunable)
  image, marks = _image((16, 16)), _marks_2d()
  image_copy, marks_copy = image.copy(), marks.copy()
  result = sj.refine(split, image, marks, CFG)
  assert _leaves_equal(split.frozen, frozen_before)
  assert _leaves_equal(split.tunable, tunable_before)
  assert _leaves_equal(nnx.state(model), original)
  assert not _leaves_equal(result.tunable, tunable_before)
  np.testing.assert_array_equal(image, image_copy)
  np.testing.assert_array_equal(marks, marks_copy)
  # the refined model = frozen part of W + refined tunable part
  refined = sj.params.merge_params(split, result.tunable)
  np.testing.assert_allclose(
    np.asarray(refined(jnp.asarray(image)[None, ..., None])[0]), np.asarray(result.logits), atol=1e-5
  )


def _plain_python_loop(split, image, marks, config):
  """Algorithm 1 written out without jit or while_loop."""
  tx = optax.sgd(config.learning_rate, momentum=config.momentum)
  w0 = split.tunable
  w = w0
  opt_state = tx.init(w)
  x = jnp.asarray(image)[..., None]
  m = jnp.asarray(marks)

  def objective(w):
    logits = nnx.merge(split.graphdef, w, split.frozen)(x[None])[0]
    ce = sj.refinement.marked_cross_entropy(logits, m)
    return ce + config.prox_weight * sj.refinement.proximal_norm(w, w0), logits

  steps = 0
  for _ in range(config.max_steps):
    (_, logits), grads = jax.value_and_grad(objective, has_aux=True)(w)
    if bool(sj.refinement.marks_satisfied(logits, m)):
      break
    updates, opt_state = tx.update(grads, opt_state, w)
    w = optax.apply_updates(w, updates)
    steps += 1
  return w, steps


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["host", "loop"])
def test_jitted_loop_equals_plain_python_loop(driver):
  split = sj.split_params(_model(2), sj.last_layers(3))
  image, marks = _image((16, 16)), _marks_2d()
  config = sj.RefineConfig.paper(max_steps=25, learning_rate=0.05, momentum=0.9, prox_weight=0.05, driver=driver)
  result = sj.refine(split, image, marks, config)
  w, steps = _plain_python_loop(split, image, marks, config)
  assert int(result.num_steps) == steps
  for a, b in zip(jax.tree.leaves(result.tunable), jax.tree.leaves(w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_host_and_loop_drivers_agree_3d():
  split = sj.split_params(_model(3), sj.last_layers(2))
  image = _image((8, 8, 8), seed=3)
  marks = np.full((8, 8, 8), -1, np.int32)
  marks[1:3, 1:3, 1:3] = 1
  marks[5:7, 5:7, 5:7] = 2
  results = [
    sj.refine(split, image, marks, sj.RefineConfig.paper(max_steps=40, prox_weight=0.01, driver=d, check_every=k))
    for d, k in [("host", 1), ("host", 4), ("loop", 1)]
  ]
  for other in results[1:]:
    assert int(other.num_steps) == int(results[0].num_steps)
    assert bool(other.satisfied) == bool(results[0].satisfied)
    np.testing.assert_allclose(np.asarray(other.logits), np.asarray(results[0].logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("driver", ["host", "loop"])
def test_new_marks_and_settings_do_not_retrace(driver):
  split = sj.split_params(_model(2), sj.last_layers(3))
  image = _image((16, 16))
  compiled = drivers.loop_program if driver == "loop" else drivers.chunk_program
  sj.refine(split, image, _marks_2d(), sj.RefineConfig.paper(max_steps=5, driver=driver))
  size = compiled.cache_size()
  other = np.full((16, 16), -1, np.int32)
  other[5:9, 5:9] = 0
  other[0, 0] = 2
  sj.refine(
    split,
    image + 1.0,
    other,
    sj.RefineConfig.paper(max_steps=7, learning_rate=0.01, momentum=0.5, prox_weight=0.3, driver=driver),
  )
  assert compiled.cache_size() == size


def _loop_with(split, image, marks, config, **backend_changes):
  """The loop driver, run with some of its backend settings changed."""
  assert config.driver == "loop" and config.keep_weight == 0
  image, marks = sj.refinement.prepare_inputs(split, image, marks)
  backend = dataclasses.replace(backend_lib.Backend.of(config), **backend_changes)
  return drivers.drive(split, image, marks, config, backend=backend)


@pytest.mark.slow
@pytest.mark.parametrize("dims", [2, 3])
def test_flat_carry_equals_per_leaf_carry(dims):
  # the loop carries W_lam as one flat vector (one kernel for the optimiser on a GPU); same refinement
  split = sj.split_params(_model(dims), sj.last_layers(3))
  image = _image((16, 16) if dims == 2 else (8, 8, 8), seed=dims)
  marks = _marks_2d() if dims == 2 else np.where(_image((8, 8, 8), seed=9) > 1.2, 1, -1).astype(np.int32)
  assert backend_lib.flat_carry() == (jax.default_backend() != "cpu")
  config = dataclasses.replace(CFG, max_steps=20, early_stop=False, driver="loop")
  flat, per_leaf = (_loop_with(split, image, marks, config, flat_params=f) for f in (True, False))
  assert int(flat.num_steps) == int(per_leaf.num_steps) == 20
  assert jax.tree.structure(flat.tunable) == jax.tree.structure(split.tunable)
  for a, b in zip(jax.tree.leaves(flat.tunable), jax.tree.leaves(per_leaf.tunable)):
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(flat.logits), np.asarray(per_leaf.logits), rtol=1e-5, atol=1e-5)
  assert not _leaves_equal(flat.tunable, split.tunable)  # it did move


@pytest.mark.slow
@pytest.mark.parametrize("early_stop", [True, False])
def test_lazy_backward_gives_the_same_refinement(early_stop):
  # the backward pass under lax.cond (run only when its update is taken): same steps, weights, logits
  split = sj.split_params(_model(2), sj.last_layers(3))
  image, marks = _image((16, 16), seed=5), _marks_2d()
  config = dataclasses.replace(CFG, max_steps=40, early_stop=early_stop, driver="loop")
  lazy, eager = (_loop_with(split, image, marks, config, lazy_backward=b) for b in (True, False))
  assert int(lazy.num_steps) == int(eager.num_steps) > 0
  assert bool(lazy.satisfied) == bool(eager.satisfied) and (early_stop or int(lazy.num_steps) == 40)
  for a, b in zip(
    jax.tree.leaves((lazy.tunable, lazy.logits, lazy.loss_trace)),
    jax.tree.leaves((eager.tunable, eager.logits, eager.loss_trace)),
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)  # float rounding over 40 steps
  assert backend_lib.Backend.of(config).lazy_backward == (
    jax.default_backend() == "cpu" and sj.kernels.resolve_conv_backend("auto") == "onednn"
  )


@pytest.mark.parametrize("max_steps", [40, 2])
def test_returned_logits_are_those_of_the_returned_weights(max_steps):
  # stopping on honoured marks, the loop returns the logits its last step evaluated; they must be W_lam's
  split = sj.split_params(_model(2), sj.last_layers(3))
  image, marks = _image((16, 16), seed=6), _marks_2d()
  result = sj.refine(split, image, marks, dataclasses.replace(CFG, max_steps=max_steps, driver="loop"))
  assert bool(result.satisfied) == (max_steps == 40)
  fresh = sj.predict(split, image, tunable=result.tunable)
  np.testing.assert_allclose(np.asarray(result.logits), np.asarray(fresh), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(result.labels), np.asarray(result.logits).argmax(-1))


def test_flat_carry_only_for_the_built_in_sgd_and_one_dtype():
  split = sj.split_params(_model(2), sj.last_layers(3))
  backend = dataclasses.replace(backend_lib.Backend.of(CFG), flat_params=True)
  assert backend_lib.flattens(backend, CFG.optimizer, split.tunable)
  assert not backend_lib.flattens(dataclasses.replace(backend, flat_params=False), CFG.optimizer, split.tunable)
  # a user's optimiser may treat leaves differently (per-layer norms): the carry stays per leaf
  assert not backend_lib.flattens(backend, optax.adam(1e-3), split.tunable)
  mixed = jax.tree.map(lambda x: x, split.tunable)
  leaves, treedef = jax.tree.flatten(mixed)
  mixed = jax.tree.unflatten(treedef, [leaves[0].astype(jnp.bfloat16), *leaves[1:]])
  assert not backend_lib.flattens(backend, CFG.optimizer, mixed)


def test_one_optimizer_table_gives_the_names_the_flat_carry_and_the_default_learning_rate(monkeypatch):
  assert config_lib.OPTIMIZERS == tuple(config_lib.BUILTIN_OPTIMIZERS) == ("sgd", "adam")
  assert config_lib.default_learning_rate("sgd") == config_lib.PAPER["learning_rate"]
  assert config_lib.default_learning_rate("adam") is None and config_lib.default_learning_rate(None) is None
  assert config_lib.default_learning_rate("nesterov") is None
  # a new entry is valid at once; the flat carry follows its `elementwise` (LAMB scales each layer)
  lamb = config_lib.BuiltinOptimizer(
    lambda learning_rate, momentum: optax.inject_hyperparams(optax.lamb)(learning_rate=learning_rate),
    elementwise=False,
    default_learning_rate=1e-3,
  )
  monkeypatch.setitem(config_lib.BUILTIN_OPTIMIZERS, "lamb", lamb)
  assert config_lib.default_learning_rate("lamb") == 1e-3
  split = sj.split_params(_model(2), sj.last_layers(3))
  config = dataclasses.replace(CFG, optimizer="lamb", max_steps=2)
  backend = dataclasses.replace(backend_lib.Backend.of(config), flat_params=True)
  assert not backend_lib.flattens(backend, "lamb", split.tunable)
  assert backend_lib.flattens(backend, "adam", split.tunable) and backend_lib.flattens(backend, None, split.tunable)
  result = sj.refine(split, _image((16, 16)), _marks_2d(), config)
  assert int(result.num_steps) == 2 and not _leaves_equal(result.tunable, split.tunable)
  monkeypatch.delitem(config_lib.BUILTIN_OPTIMIZERS, "lamb")
  with pytest.raises(ValueError, match="optimizer must be one of"):
    sj.RefineConfig(optimizer="lamb")


def test_objective_reads_the_keep_targets_beside_the_users_marks():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
  marks = np.full((4, 5), -1, np.int32)
  marks[0, :3] = [1, 2, 0]
  keep = rng.integers(0, 3, size=(4, 5)).astype(np.int32)
  settings = algorithm.Settings.of(CFG)
  hyper = algorithm.Hyper.of(dataclasses.replace(CFG, keep_weight=0.5, prox_weight=0.25))
  anchor, tunable = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}

  def loss(targets):
    return float(
      algorithm.objective(lambda t: logits, anchor, jnp.asarray(marks), targets, settings, hyper, tunable)[0]
    )

  marked_ce = float(algorithm.marked_cross_entropy(logits, jnp.asarray(marks)))
  keep_ce = float(algorithm.marked_cross_entropy(logits, jnp.asarray(np.where(marks < 0, keep, -1))))
  np.testing.assert_allclose(loss(jnp.asarray(keep)), marked_ce + 0.5 * keep_ce + 0.25 * np.sqrt(2), rtol=1e-6)
  # the keep targets of marked pixels are never read
  other = keep.copy()
  other[marks >= 0] = (other[marks >= 0] + 1) % 3
  assert loss(jnp.asarray(other)) == loss(jnp.asarray(keep))
  # no targets (what the drivers pass when keep_weight is 0), or None: no keep term
  np.testing.assert_allclose(loss(algorithm.no_keep(jnp.asarray(marks))), marked_ce + 0.25 * np.sqrt(2), rtol=1e-6)
  assert loss(None) == loss(algorithm.no_keep(jnp.asarray(marks)))


@pytest.mark.parametrize("driver", ["host", "loop"])
def test_the_programs_get_the_users_marks_and_the_keep_targets_apart(driver, monkeypatch):
  split = sj.split_params(_model(2), sj.last_layers(3))
  image, marks = sj.refinement.prepare_inputs(split, _image((16, 16)), _marks_2d())
  initial = np.asarray(sj.predict(split, image)).argmax(-1)
  np.testing.assert_array_equal(np.asarray(drivers.keep_targets(split, image, marks, 0.5)), initial)
  np.testing.assert_array_equal(np.asarray(drivers.keep_targets(split, image, marks, 0.0)), np.full((16, 16), -1))
  name = "loop_program" if driver == "loop" else "chunk_program"
  program, seen = getattr(drivers, name), []

  def spy(*args, **kwargs):
    seen.append((np.asarray(args[8]), np.asarray(args[9])))  # marks, keep
    return program(*args, **kwargs)

  monkeypatch.setattr(drivers, name, spy)
  config = dataclasses.replace(CFG, driver=driver, max_steps=3)
  sj.refine(split, image, marks, config)
  size = program.cache_size()
  sj.refine(split, image, marks, dataclasses.replace(config, keep_weight=0.5))
  assert program.cache_size() == size  # keep_weight is traced; the keep targets are always an argument
  for (m, keep), expected in zip((seen[0], seen[-1]), (np.full((16, 16), -1), initial)):
    np.testing.assert_array_equal(m, _marks_2d())
    np.testing.assert_array_equal(keep, expected)


def test_graph_key_hashes_once_and_resplitting_the_model_does_not_recompile():
  model = _model(2)
  split = sj.split_params(model, sj.last_layers(3))
  key = network.graph_key(split.graphdef)
  assert network.graph_key(split.graphdef) is key and network.graph_key(key) is key
  assert hash(key) == hash(split.graphdef)
  image, marks = _image((16, 16)), _marks_2d()
  config = sj.RefineConfig.paper(max_steps=3, driver="loop")
  first = sj.refine(split, image, marks, config)
  size = drivers.loop_program.cache_size()
  again = sj.split_params(model, sj.last_layers(3))  # a new but equal graphdef
  assert again.graphdef is not split.graphdef and network.graph_key(again.graphdef) == key
  second = sj.refine(again, image, marks, config)
  assert drivers.loop_program.cache_size() == size
  np.testing.assert_array_equal(np.asarray(first.labels), np.asarray(second.labels))
  other = sj.split_params(_model(2, classes=2), sj.last_layers(3))
  assert network.graph_key(other.graphdef) != key


@pytest.mark.slow
def test_conv_layout_option_follows_the_environment():
  code = "from scribblejax.refinement import backend; print(backend.COMPILER_OPTIONS)"
  out = {
    v: subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      check=True,
      env={**os.environ, "SCRIBBLEJAX_FORCE_CONV_NHWC": v},
    ).stdout.strip()
    for v in ("0", "1")
  }
  assert out == {"0": "None", "1": "{'xla_gpu_force_conv_nhwc': True}"}
  # the options go to GPU programs only: elsewhere the compiled functions are plain jax.jit ones
  on_gpu = jax.default_backend() == "gpu"
  for fn in (drivers.loop_program, drivers.chunk_program, drivers.predict_program):
    assert fn.compiler_options() == (backend_lib.COMPILER_OPTIONS if on_gpu else None)


def test_nonfinite_loss_stops_with_last_finite_weights():
  split = sj.split_params(_model(2), sj.last_layers(3))
  image, marks = _image((16, 16)), _marks_2d()
  result = sj.refine(split, image, marks, sj.RefineConfig.paper(max_steps=50, learning_rate=1e30, momentum=0.0))
  assert bool(result.nonfinite) and not bool(result.satisfied)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(result.tunable))
  assert np.all(np.isfinite(np.asarray(result.logits)))
  assert int(result.num_steps) < 50


@pytest.mark.slow
def test_any_optax_transformation_and_probabilities_output():
  split = sj.split_params(_model(2), sj.last_layers(3))
  result = sj.refine(
    split,
    _image((16, 16)),
    _marks_2d(),
    sj.RefineConfig.paper(max_steps=100, optimizer=optax.adam(1e-2), prox_weight=0.01, output="probabilities"),
  )
  assert bool(result.satisfied)
  np.testing.assert_allclose(np.asarray(result.logits).sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_class_balanced_cross_entropy():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4, 3)), jnp.float32)
  marks = np.full((4, 4), -1, np.int32)
  marks[0, :] = 0
  marks[1, 0] = 2
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(jnp.asarray(marks), 0))
  ce = np.asarray(ce)
  plain = ce[marks >= 0].mean()
  balanced = (ce[marks == 0].mean() + ce[marks == 2].mean()) / 2
  np.testing.assert_allclose(float(sj.refinement.marked_cross_entropy(logits, jnp.asarray(marks))), plain, rtol=1e-6)
  np.testing.assert_allclose(
    float(sj.refinement.marked_cross_entropy(logits, jnp.asarray(marks), True)), balanced, rtol=1e-6
  )
  assert float(sj.refinement.marked_cross_entropy(logits, jnp.full((4, 4), -1))) == 0.0


def test_proximal_norm_has_finite_gradient_at_anchor():
  w = {"a": jnp.ones((3,)), "b": jnp.zeros((2, 2))}
  grad = jax.grad(sj.refinement.proximal_norm)(w, w)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grad))
  moved = {"a": jnp.ones((3,)) + 3.0, "b": jnp.zeros((2, 2)) + 4.0 / 2.0}
  np.testing.assert_allclose(float(sj.refinement.proximal_norm(moved, w)), np.sqrt(3 * 9 + 4 * 4), rtol=1e-6)
  with pytest.raises(ValueError, match="same structure"):
    sj.refinement.proximal_norm([w["a"], w["b"]], [w["a"]])  # was: the unmatched leaf dropped
  with pytest.raises(ValueError, match="same structure and leaf shapes"):
    sj.refinement.proximal_norm(
      {"a": jnp.ones((3,)), "b": jnp.zeros((2, 2))}, {"a": jnp.ones((3,)), "b": jnp.zeros((4,))}
    )


def test_loss_and_stop_rule_refuse_logits_of_another_shape():
  logits, marks = jnp.zeros((4, 4, 2)), jnp.zeros((4,), jnp.int32)
  for fn in (sj.refinement.marks_satisfied, sj.refinement.marked_cross_entropy):
    with pytest.raises(ValueError, match=r"logits of shape \(4, 4, 2\) are not \[\*marks.shape, classes\]"):
      fn(logits, marks)  # was: broadcast, True


def test_the_loss_refuses_a_label_of_no_class_and_is_nan_under_jit():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4, 2)), jnp.float32)
  marks = jnp.full((4, 4), -1, jnp.int32).at[1, 1].set(2)
  for balance in (False, True):
    with pytest.raises(ValueError, match=r"marks hold label 2, but the logits have 2 classes \(0..1\)"):
      sj.refinement.marked_cross_entropy(logits, marks, balance)
    traced = jax.jit(sj.refinement.marked_cross_entropy, static_argnums=2)
    assert np.isnan(float(traced(logits, marks, balance)))  # was: the mark silently left out of the loss
    assert np.isfinite(float(traced(logits, marks.at[1, 1].set(1), balance)))


@pytest.mark.parametrize(
  "image_shape, marks_shape, message",
  [
    ((16, 16), (16, 15), "do not match"),
    ((16, 16, 1), (16, 16, 1), "3 spatial axes but the model is 2D"),
    ((8, 8, 8), (8, 8), "channels"),  # read as a 2D image with 8 channels; the model wants 1
  ],
)
def test_shape_mismatch_raises(image_shape, marks_shape, message):
  split = sj.split_params(_model(2), sj.last_layers(3))
  with pytest.raises(ValueError, match=message):
    sj.refine(split, np.zeros(image_shape, np.float32), np.full(marks_shape, -1, np.int32), CFG)


def test_bad_marks_and_images_raise_before_compiling():
  split = sj.split_params(_model(2), sj.last_layers(3))
  image = _image((16, 16))
  size = drivers.chunk_program.cache_size()
  with pytest.raises(ValueError, match="3"):
    sj.refine(split, image, np.full((16, 16), 3, np.int32), CFG)  # label >= number of classes
  with pytest.raises(ValueError, match="-2"):
    sj.refine(split, image, np.full((16, 16), -2, np.int32), CFG)  # label < -1
  with pytest.raises(ValueError, match="integer"):
    sj.refine(split, image, np.zeros((16, 16), np.float32), CFG)  # non-integer marks
  bad = image.copy()
  bad[3, 3] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    sj.refine(split, bad, _marks_2d(), CFG)
  bad[3, 3] = np.inf
  with pytest.raises(ValueError, match="Inf"):
    sj.refine(split, bad, _marks_2d(), CFG)
  with pytest.raises(ValueError, match="channels"):
    sj.refine(split, np.zeros((16, 16, 2), np.float32), _marks_2d(), CFG)  # model wants 1 channel
  assert drivers.chunk_program.cache_size() == size


def test_a_bfloat16_image_is_refined_as_its_float32_values():
  split = sj.split_params(_model(2), sj.last_layers(3))
  image = jnp.asarray(_image((16, 16)), jnp.bfloat16)
  as_f32 = np.asarray(image.astype(jnp.float32))
  low, high = (sj.refine(split, x, _marks_2d(), CFG) for x in (image, as_f32))
  assert int(low.num_steps) == int(high.num_steps) > 0
  np.testing.assert_array_equal(np.asarray(low.logits), np.asarray(high.logits))
  np.testing.assert_array_equal(np.asarray(sj.predict(split, image)), np.asarray(sj.predict(split, as_f32)))


def test_values_beyond_float32_and_weights_that_do_not_fit_are_refused():
  split = sj.split_params(_model(2), sj.last_layers(3))
  image = _image((16, 16)).astype(np.float64)
  image[0, 0] = 1e39  # finite in float64, inf in float32
  with pytest.raises(ValueError, match="beyond float32's range"):
    sj.predict(split, image)  # was: all-NaN logits
  with pytest.raises(ValueError, match="beyond float32's range"):
    sj.refine(split, image, _marks_2d(), CFG)
  image = _image((16, 16))
  batched = jax.tree.map(lambda x: jnp.stack([x, x]), split.tunable)
  with pytest.raises(ValueError, match=r"has shape \(2, .*it looks batched"):
    sj.predict(split, image, batched)
  with pytest.raises(ValueError, match="it looks batched"):
    sj.params.merge_params(split, batched)  # was: a model that failed when called
  with pytest.raises(ValueError, match="start parameter .* has dtype int32"):
    sj.refine(split, image, _marks_2d(), CFG, start=jax.tree.map(lambda x: x.astype(jnp.int32), split.tunable))
  with pytest.raises(ValueError, match="start parameter .* holds NaN or Inf"):  # was: NaN weights out
    sj.refine(split, image, _marks_2d(), CFG, start=jax.tree.map(lambda x: x * np.nan, split.tunable))
  as_f64 = jax.tree.map(lambda x: np.asarray(x, np.float64), split.tunable)
  np.testing.assert_allclose(
    np.asarray(sj.refine(split, image, _marks_2d(), CFG, start=as_f64).logits),
    np.asarray(sj.refine(split, image, _marks_2d(), CFG).logits),
    rtol=1e-6,
    atol=1e-6,
  )


def test_bad_config_raises():
  with pytest.raises(ValueError, match="max_steps"):
    sj.RefineConfig.paper(max_steps=-1)
  with pytest.raises(ValueError, match="learning_rate"):
    sj.RefineConfig.paper(learning_rate=float("nan"))
  with pytest.raises(ValueError, match="driver"):
    sj.RefineConfig.paper(driver="gpu")
  for bad, message in [
    (dict(check_every=2.5), "check_every must be an integer"),
    (dict(trace_length=2.5), "trace_length must be an integer"),
    (dict(optimizer="lbfgs"), "optimizer must be one of"),
    (dict(optimizer=3), "optimizer must be one of"),
    (dict(merge_confidence=1.5), "merge_confidence is a probability"),
    (dict(progressive_merge="yes"), "progressive_merge must be True or False"),
    (dict(learning_rate="0.1"), "learning_rate must be a number"),
    (dict(learning_rate=None), "learning_rate must be a number"),
    (dict(max_steps=2**40), "at most"),
    (dict(max_steps=True), "max_steps must be a non-negative integer"),
    (dict(early_stop="False"), "early_stop must be True or False"),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
  ]:
    with pytest.raises(ValueError, match=message):
      sj.RefineConfig.paper(**bad)
  assert sj.RefineConfig.paper(max_steps=np.int64(5), optimizer=optax.adam(1e-3)).max_steps == 5


def test_refine_batch_equals_one_by_one():
  split = sj.split_params(_model(2), sj.last_layers(3))
  images = np.stack([_image((16, 16), seed=s) for s in range(3)])
  marks = np.full((3, 16, 16), -1, np.int32)
  marks[0] = _marks_2d()
  marks[1, 4:6, 4:6] = 2
  # example 2: no marks at all -> 0 steps
  config = sj.RefineConfig.paper(max_steps=40, prox_weight=0.01, driver="host")
  batch = sj.refine_batch(split, images, marks, config)
  for i in range(3):
    one = sj.refine(split, images[i], marks[i], config)
    assert int(batch.num_steps[i]) == int(one.num_steps)
    assert bool(batch.satisfied[i]) == bool(one.satisfied)
    np.testing.assert_allclose(np.asarray(batch.logits[i]), np.asarray(one.logits), rtol=1e-4, atol=1e-4)
  assert int(batch.num_steps[2]) == 0


def test_keep_weight_anchors_unmarked_pixels_without_recompiling():
  split = sj.split_params(_model(2), sj.last_layers(3))
  image, marks = _image((16, 16)), _marks_2d()
  initial = np.asarray(sj.predict(split, image)).argmax(-1)
  plain = sj.refine(split, image, marks, CFG)
  size = drivers.chunk_program.cache_size()
  kept = sj.refine(split, image, marks, dataclasses.replace(CFG, keep_weight=1.0, max_steps=200))
  assert drivers.chunk_program.cache_size() == size
  assert bool(kept.satisfied) and bool(plain.satisfied)
  unmarked = marks < 0
  changed_plain = (np.asarray(plain.labels) != initial)[unmarked].mean()
  changed_kept = (np.asarray(kept.labels) != initial)[unmarked].mean()
  assert changed_kept < changed_plain, (changed_kept, changed_plain)
  with pytest.raises(ValueError, match="keep_weight"):
    sj.RefineConfig.paper(keep_weight=-1.0)
