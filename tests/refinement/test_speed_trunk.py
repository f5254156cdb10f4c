"""The cached trunk: trunk + tail equals the full forward pass (values and gradients), for any model."""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import scribblejax as sj
from scribblejax import kernels
from scribblejax.refinement import backend as backend_lib
from scribblejax.refinement import drivers, network, trunk
from scribblejax.testing import random_unet

CONV_BACKENDS = ["xla"] + (["onednn"] if kernels.kernel_status().available else [])


@functools.cache
def _unet(dims: int, channels=(4, 8, 16)):
  return random_unet(dims, channels, classes=3)


def _image(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _max_rel(a, b):
  return max(
    float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


@pytest.mark.parametrize(
  "dims, layers, rewrites",
  [(2, 5, ()), (2, 5, backend_lib.DEFAULT_REWRITES), (2, 8, ()), (3, 3, ("transposed_conv", "conv_as_matmul"))],
)
@pytest.mark.slow
def test_trunk_then_tail_equals_full_forward(dims, layers, rewrites):
  split = sj.split_params(_unet(dims) if layers == 5 else _unet(dims, (4, 8)), sj.last_layers(layers))
  image = _image((12,) * dims + (1,) if dims == 2 else (8,) * dims + (1,))
  fn = network.Forward(split.graphdef)
  part = trunk.partition(fn, split.tunable, split.frozen, image, rewrites=rewrites)
  residuals = jax.jit(part.trunk)(split.frozen, image)
  assert [tuple(r.shape) for r in residuals] == [tuple(s.shape) for s in part.residual_shapes]
  full = jax.jit(fn)(split.tunable, split.frozen, image)
  cached = jax.jit(part.tail)(split.tunable, residuals)
  if rewrites:
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), rtol=1e-5, atol=1e-5)
  else:
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))  # the very same operations
  # gradients with respect to the tunable weights, at weights other than W
  moved = jax.tree.map(lambda w: w * 1.1 + 0.01, split.tunable)
  loss = lambda f: lambda t: jnp.sum(jnp.sin(f(t)))
  g_full = jax.jit(jax.grad(loss(lambda t: fn(t, split.frozen, image))))(moved)
  g_tail = jax.jit(jax.grad(loss(lambda t: part.tail(t, residuals))))(moved)
  assert _max_rel(g_tail, g_full) < 1e-4


def test_residuals_are_the_tails_inputs_only():
  # last 5 layers of a 3-level U-Net: head, decoder/1/1, decoder/1/0, up/1 and decoder/0/1; the tail
  # reads the input of decoder/0/1 (6x6x8) and the level-0 skip connection (12x12x4).
  split = sj.split_params(_unet(2), sj.last_layers(5))
  image = _image((12, 12, 1))
  part = trunk.partition(network.Forward(split.graphdef), split.tunable, split.frozen, image)
  assert sorted(tuple(s.shape) for s in part.residual_shapes) == [(1, 6, 6, 8), (1, 12, 12, 4)]


class _JitInside(nnx.Module):
  """A model whose forward pass calls a jitted function that mixes frozen and tunable inputs."""

  def __init__(self):
    self.body = nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0))
    self.head = nnx.Conv(4, 2, (1, 1), rngs=nnx.Rngs(1))

  def __call__(self, x):
    @jax.jit
    def mixed(x, body_kernel, head_kernel, head_bias):
      h = jax.nn.relu(
        jax.lax.conv_general_dilated(x, body_kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      )
      h2 = jnp.tanh(h)  # frozen: stays in the trunk even inside the jitted call
      return jnp.einsum("nhwc,co->nhwo", h2, head_kernel[0, 0]) + head_bias

    return mixed(x, self.body.kernel[...], self.head.kernel[...], self.head.bias[...])


def test_nested_jit_is_unzipped_and_matches():
  model = _JitInside()
  split = sj.split_params(model, sj.params.by_regex("head/.*"))
  image = _image((10, 10, 1), seed=3)
  fn = network.Forward(split.graphdef)
  part = trunk.partition(fn, split.tunable, split.frozen, image)
  # the residual is tanh(relu(conv)), computed inside the jitted call: the trunk reached into it
  assert [tuple(s.shape) for s in part.residual_shapes] == [(1, 10, 10, 4)]
  np.testing.assert_allclose(
    np.asarray(part.tail(split.tunable, part.trunk(split.frozen, image))),
    np.asarray(fn(split.tunable, split.frozen, image)),
    rtol=1e-6,
    atol=1e-6,
  )


class _Constants(nnx.Module):
  """A model whose tail reads numpy constants it closes over (a weighting map, an empty index)."""

  def __init__(self):
    self.body = nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0))
    self.head = nnx.Conv(4, 2, (1, 1), rngs=nnx.Rngs(1))

  def __call__(self, x):
    shape = (*x.shape[:-1], 2)  # the output's shape: the multiply reads the constant itself
    weights = np.linspace(0.5, 2.0, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    features = jax.nn.relu(self.body(x))
    skip = jnp.tanh(features[..., :2])  # frozen: a residual the tail reads after the constant
    return self.head(features) * jnp.asarray(weights) + skip


@pytest.mark.slow
def test_constants_the_tail_reads_do_not_shift_the_residuals():
  # Was: the trunk handed the constants over as residuals that the tail never read back, so every
  # later residual came one place late (a shape error, or silently wrong values).
  split = sj.split_params(_Constants(), sj.params.by_regex("head/.*"))
  image = _image((6, 7, 1), seed=4)
  fn = network.Forward(split.graphdef)
  part = trunk.partition(fn, split.tunable, split.frozen, image)
  np.testing.assert_array_equal(
    np.asarray(part.tail(split.tunable, part.trunk(split.frozen, image))),
    np.asarray(fn(split.tunable, split.frozen, image)),
  )


@jax.jit
def _scale(a, w):
  return a * w + 1.0


class _HeldIntoJit(_Constants):
  """Values the tail already holds passed into a nested jit: a constant, or a residual read before."""

  def __init__(self, case):
    super().__init__()
    self.case = case

  def __call__(self, x):
    shape = (*x.shape[:-1], 2)
    weights = np.linspace(0.5, 2.0, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    features = jax.nn.relu(self.body(x))
    skip = jnp.tanh(features[..., :2])
    h = self.head(features)
    if self.case == "constant":
      return _scale(h, jnp.asarray(weights)) + skip
    return h * skip + _scale(h, skip) + h * jnp.sin(features[..., 1:3])


@pytest.mark.parametrize("case", ["constant", "residual"])
def test_values_the_tail_holds_are_not_handed_over_again_to_a_nested_call(case):
  # Was: the trunk handed them over again inside the nested call; the tail did not read them back, so
  # later residuals came one place late (silently wrong logits, up to 2.0 off).
  split = sj.split_params(_HeldIntoJit(case), sj.params.by_regex("head/.*"))
  image = _image((6, 7, 1), seed=5)
  fn = network.Forward(split.graphdef)
  part = trunk.partition(fn, split.tunable, split.frozen, image)
  np.testing.assert_allclose(
    np.asarray(part.tail(split.tunable, part.trunk(split.frozen, image))),
    np.asarray(fn(split.tunable, split.frozen, image)),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.parametrize("dn", [("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW"), ("NHWC", "OIHW", "NCHW")])
def test_rewrites_equal_lax_convolutions(dn):
  rng = np.random.default_rng(0)
  lhs_shape = {"NHWC": (2, 5, 7, 3), "NCHW": (2, 3, 5, 7)}[dn[0]]
  x = jnp.asarray(rng.normal(size=lhs_shape), jnp.float32)

  def kernel(kh, kw, i, o):
    w = rng.normal(size=(kh, kw, i, o))
    return jnp.asarray(w if dn[1] == "HWIO" else np.transpose(w, (3, 2, 0, 1)), jnp.float32)

  up = lambda x, k: jax.lax.conv_transpose(x, k, (2, 2), "VALID", dimension_numbers=dn)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (0, 2)), dimension_numbers=dn)
  for fn, k, rewrites in [
    (up, kernel(2, 2, 3, 4), ("transposed_conv",)),
    (conv, kernel(3, 3, 3, 4), ("conv_as_matmul",)),
  ]:
    part = trunk.partition(lambda t, f, img: fn(img, t), k, (), x, rewrites=rewrites)  # noqa: B023
    jaxpr = str(jax.make_jaxpr(lambda t: part.tail(t, part.trunk((), x)))(k))  # noqa: B023
    assert "conv_general_dilated" not in jaxpr  # the rewrite took the convolution's place
    np.testing.assert_allclose(np.asarray(part.tail(k, part.trunk((), x))), np.asarray(fn(x, k)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "dn, padding",
  [
    (("NDHWC", "DHWIO", "NDHWC"), ((1, 1), (1, 1), (1, 1))),
    (("NCDHW", "OIDHW", "NCDHW"), ((0, 2), (1, 0), (2, 2))),
    (("NDHWC", "OIDHW", "NCDHW"), ((0, 0), (0, 0), (0, 0))),
  ],
)
@pytest.mark.slow
def test_conv3d_as_2d_equals_lax_convolution_and_its_gradients(dn, padding, monkeypatch):
  rng = np.random.default_rng(1)
  spatial, kernel_size = (5, 6, 7), (3, 2, 3)
  x = rng.normal(size=(2, *spatial, 3)) if dn[0] == "NDHWC" else rng.normal(size=(2, 3, *spatial))
  w = rng.normal(size=(*kernel_size, 3, 4))
  w = w if dn[1] == "DHWIO" else np.transpose(w, (4, 3, 0, 1, 2))
  x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1, 1), padding, dimension_numbers=dn)
  part = trunk.partition(lambda t, f, img: conv(img, t), w, (), x, rewrites=("conv3d_as_2d",))
  rewritten = lambda k: part.tail(k, part.trunk((), x))
  jaxpr = str(jax.make_jaxpr(rewritten)(w))
  assert "conv_general_dilated" in jaxpr and "lhs_dilation=(1, 1)" in jaxpr  # one 2D convolution
  np.testing.assert_allclose(np.asarray(rewritten(w)), np.asarray(conv(x, w)), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda k: jnp.sum(jnp.sin(f(k)))
  np.testing.assert_allclose(
    np.asarray(jax.grad(loss(rewritten))(w)), np.asarray(jax.grad(loss(lambda k: conv(x, k)))(w)), rtol=1e-4, atol=1e-4
  )
  # a convolution whose stacked input would be too big stays 3D
  monkeypatch.setattr(trunk, "CONV3D_AS_2D_MAX_BYTES", 1024)
  part = trunk.partition(lambda t, f, img: conv(img, t), w, (), x, rewrites=("conv3d_as_2d",))
  assert "lhs_dilation=(1, 1, 1)" in str(jax.make_jaxpr(lambda k: part.tail(k, part.trunk((), x)))(w))
  # strided convolutions keep the lax form
  strided = lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 1, 1), padding, dimension_numbers=dn)
  part = trunk.partition(lambda t, f, img: strided(img, t), w, (), x, rewrites=("conv3d_as_2d",))
  assert "window_strides=(2, 1, 1)" in str(jax.make_jaxpr(lambda k: part.tail(k, part.trunk((), x)))(w))


def _conv_ranks(jaxpr) -> list[int]:
  """Spatial rank of every convolution in a jaxpr, nested calls included."""
  ranks = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      ranks.append(len(eqn.params["window_strides"]))
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", None)
      if inner is not None:
        ranks += _conv_ranks(inner if hasattr(inner, "eqns") else inner.jaxpr)
  return ranks


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the 3D-as-2D rewrite is a CPU default")
@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_3d_unet_on_cpu_runs_2d_or_onednn_convolutions_with_the_same_logits(backend):
  split = sj.split_params(_unet(3, (4, 8)), sj.last_layers(3))
  image = _image((8, 8, 8, 1), seed=3)
  fn = network.Forward(split.graphdef)
  part = trunk.partition(fn, split.tunable, split.frozen, image, rewrites=backend_lib.default_rewrites(backend))
  rewritten = lambda t, f, x: part.tail(t, part.trunk(f, x))
  jaxpr = jax.make_jaxpr(rewritten)(split.tunable, split.frozen, image).jaxpr
  ranks, plain = _conv_ranks(jaxpr), _conv_ranks(jax.make_jaxpr(fn)(split.tunable, split.frozen, image).jaxpr)
  assert plain and set(plain) == {3}
  if backend == "xla":
    assert ranks and set(ranks) == {2}  # conv3d_as_2d
  else:
    # every convolution, the U-Net's up-sampling (a transposed convolution) included
    assert not ranks and str(jaxpr).count("onednn_conv_forward") == len(plain)
  np.testing.assert_allclose(
    np.asarray(rewritten(split.tunable, split.frozen, image)),
    np.asarray(fn(split.tunable, split.frozen, image)),
    rtol=1e-5,
    atol=1e-5,
  )


def test_unknown_rewrite_raises():
  with pytest.raises(ValueError, match="unknown rewrite"):
    trunk.partition(lambda t, f, x: t * x, jnp.ones(3), (), jnp.ones(3), rewrites=("fast_everything",))


@pytest.mark.slow
def test_refine_with_cached_trunk_equals_full_forward():
  split = sj.split_params(_unet(2, (4, 8)), sj.last_layers(4))
  image = np.asarray(_image((16, 16), seed=1))
  marks = np.full((16, 16), -1, np.int32)
  marks[2:4, 2:8] = 1
  marks[10:12, 3:9] = 2
  marks[14, 14] = 0
  config = sj.RefineConfig.paper(max_steps=25, learning_rate=0.05, prox_weight=0.01, driver="loop")
  cached = sj.refine(split, image, marks, config)
  full = sj.refine(split, image, marks, dataclasses.replace(config, cache_trunk=False))
  assert int(cached.num_steps) == int(full.num_steps) > 0
  assert bool(cached.satisfied) == bool(full.satisfied)
  np.testing.assert_allclose(np.asarray(cached.logits), np.asarray(full.logits), rtol=1e-4, atol=1e-4)


def test_early_stop_off_takes_every_step_and_no_retrace():
  split = sj.split_params(_unet(2, (4, 8)), sj.last_layers(4))
  image = np.asarray(_image((16, 16), seed=2))
  marks = np.full((16, 16), -1, np.int32)
  marks[0, 0] = 1
  stopping = sj.refine(split, image, marks, sj.RefineConfig.paper(max_steps=12, learning_rate=0.05, prox_weight=0.01))
  assert int(stopping.num_steps) < 12 and bool(stopping.satisfied)
  fixed = sj.refine(
    split, image, marks, sj.RefineConfig.paper(max_steps=12, learning_rate=0.05, prox_weight=0.01, early_stop=False)
  )
  assert int(fixed.num_steps) == 12 and bool(fixed.satisfied)
  sizes = (drivers.trunk_program.cache_size(), drivers.chunk_program.cache_size())
  other = np.full((16, 16), -1, np.int32)
  other[5:9, 5:9] = 2
  sj.refine(
    split, image + 1.0, other, sj.RefineConfig.paper(max_steps=3, learning_rate=0.01, prox_weight=0.5, early_stop=False)
  )
  assert (drivers.trunk_program.cache_size(), drivers.chunk_program.cache_size()) == sizes


def _trunk_case(seed=3):
  split = sj.split_params(_unet(2, (4, 8)), sj.last_layers(4))
  image = np.array(_image((16, 16), seed=seed))
  marks = np.full((16, 16), -1, np.int32)
  marks[2:4, 2:8] = 1
  marks[10:12, 3:9] = 2
  return split, image, marks


@pytest.mark.slow
@pytest.mark.parametrize("driver, backend", [("loop", "auto"), ("host", "xla")])
def test_a_computed_trunk_gives_the_same_refinement_and_is_used(driver, backend):
  split, image, marks = _trunk_case()
  config = sj.RefineConfig.paper(
    max_steps=15, learning_rate=0.05, prox_weight=0.01, driver=driver, conv_backend=backend
  )
  computed = sj.compute_trunk(split, image, config)
  plain = sj.refine(split, image, marks, config)
  reused = sj.refine(split, image, marks, config, trunk=computed)
  assert int(reused.num_steps) == int(plain.num_steps) > 0
  for a, b in zip(jax.tree.leaves((plain.logits, plain.tunable)), jax.tree.leaves((reused.logits, reused.tunable))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  # a second interaction with new marks compiles nothing
  sizes = (drivers.loop_program.cache_size(), drivers.chunk_program.cache_size(), drivers.trunk_program.cache_size())
  other = marks.copy()
  other[14, 14] = 0
  sj.refine(split, image, other, config, trunk=computed)
  assert (
    drivers.loop_program.cache_size(),
    drivers.chunk_program.cache_size(),
    drivers.trunk_program.cache_size(),
  ) == sizes
  # predict with the trunk runs only the tail: the same logits
  np.testing.assert_allclose(
    np.asarray(sj.predict(split, image, trunk=computed)), np.asarray(sj.predict(split, image)), rtol=1e-5, atol=1e-5
  )
  with pytest.raises(ValueError, match="another image"):
    sj.predict(split, image * 2.0, trunk=computed)
  # the loop reads the given values: zeroed ones give another prediction
  zeroed = computed._replace(residuals=[jnp.zeros_like(r) for r in computed.residuals])
  blind = sj.refine(split, image, marks, dataclasses.replace(config, max_steps=0), trunk=zeroed)
  assert not np.allclose(np.asarray(blind.logits), np.asarray(sj.predict(split, image)), atol=1e-3)


def test_a_trunk_holds_the_keep_terms_targets_and_a_round_does_not_run_the_whole_network_for_them(monkeypatch):
  split, image, marks = _trunk_case()
  config = sj.RefineConfig(max_steps=5, keep_weight=1.0)
  computed = sj.compute_trunk(split, image, config)
  expected = drivers.keep_targets(split, jnp.asarray(computed.image), jnp.asarray(marks), 1.0)
  np.testing.assert_array_equal(np.asarray(computed.keep_targets), np.asarray(expected))  # W's labels, exactly
  assert sj.compute_trunk(split, image, dataclasses.replace(config, keep_weight=0.0)).keep_targets is None
  plain = sj.refine(split, image, marks, config)
  calls = []
  whole = drivers.predict_program
  monkeypatch.setattr(drivers, "predict_program", lambda *a, **k: calls.append(1) or whole(*a, **k))
  reused = sj.refine(split, image, marks, config, trunk=computed)
  assert calls == [] and int(reused.num_steps) == int(plain.num_steps) > 0
  # the same refinement bit for bit as a trunk without the targets (the round runs the network for them)
  uncached = sj.refine(split, image, marks, config, trunk=computed._replace(keep_targets=None))
  assert calls == [1]
  for a, b in zip(jax.tree.leaves(reused), jax.tree.leaves(uncached), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  continued = [
    sj.refine(split, image, marks, config, start=reused.tunable, trunk=t)
    for t in (computed, computed._replace(keep_targets=None))
  ]
  np.testing.assert_array_equal(np.asarray(continued[0].logits), np.asarray(continued[1].logits))  # targets: W's
  # a split holding other weights W (the same frozen trunk): its own targets, from its own network
  other = split._replace(tunable=jax.tree.map(lambda x: x * 1.5, split.tunable))
  calls.clear()
  sj.refine(other, image, marks, config, trunk=computed)
  assert calls == [1]


def test_a_trunk_of_another_image_split_or_setting_is_refused():
  split, image, marks = _trunk_case()
  config = sj.RefineConfig.paper(max_steps=2, learning_rate=0.05, prox_weight=0.01)
  computed = sj.compute_trunk(split, image, config)
  image_before = image.copy()
  with pytest.raises(ValueError, match="another image"):
    sj.refine(split, image + 0.5, marks, config, trunk=computed)
  with pytest.raises(ValueError, match="another split"):
    sj.refine(sj.split_params(_unet(2, (4, 8)), sj.last_layers(4)), image, marks, config, trunk=computed)
  with pytest.raises(ValueError, match="cache_trunk is off"):
    sj.refine(split, image, marks, dataclasses.replace(config, cache_trunk=False), trunk=computed)
  with pytest.raises(ValueError, match="compute_dtype=float32"):
    sj.refine(split, image, marks, dataclasses.replace(config, compute_dtype="bfloat16"), trunk=computed)
  with pytest.raises(ValueError, match="must come from compute_trunk"):
    sj.refine(split, image, marks, config, trunk=computed.residuals)
  with pytest.raises(ValueError, match="cache_trunk=True"):
    sj.compute_trunk(split, image, dataclasses.replace(config, cache_trunk=False))
  # the trunk keeps its own copy: changing the caller's array afterwards is caught, not used
  image[0, 0] += 1.0
  with pytest.raises(ValueError, match="another image"):
    sj.refine(split, image, marks, config, trunk=computed)
  np.testing.assert_array_equal(computed.image[..., 0], image_before)


def test_a_session_computes_the_trunk_once_for_all_rounds(monkeypatch):
  split, image, marks = _trunk_case(seed=4)
  config = sj.RefineConfig.paper(max_steps=15, learning_rate=0.05, prox_weight=0.01)
  session = sj.start_session(split, image, config)
  assert isinstance(session.trunk, sj.refinement.Trunk)
  session_lib = importlib.import_module("scribblejax.session")
  given = []
  original = session_lib.refine
  monkeypatch.setattr(session_lib, "refine", lambda *a, **k: given.append(k.get("trunk")) or original(*a, **k))
  session = sj.add_marks(session, marks)
  more = np.full((16, 16), -1, np.int32)
  more[14, 14] = 0
  session = sj.add_marks(session, more)
  assert len(given) == 2 and all(t is session.trunk for t in given)
  direct = sj.refine(split, image, sj.session.current_marks(session), config)
  np.testing.assert_allclose(
    np.asarray(session.rounds[-1].result.logits), np.asarray(direct.logits), rtol=1e-6, atol=1e-6
  )
  # a round with another compute setting computes its own trunk
  other = sj.add_marks(session, marks, dataclasses.replace(config, compute_dtype="bfloat16"))
  assert given[-1] is None
  np.testing.assert_array_equal(np.asarray(other.rounds[-1].marks), np.asarray(session.rounds[-1].marks))


class _MappedBlocks(nnx.Module):
  """A network applied to chunks in turn (``lax.map``) under ``jax.checkpoint``, as PatchBlend runs
  patches: the tail reads a frozen matrix (loop-invariant), per-chunk trunk values (stacked), a value
  from a nested jit, and a known output of the map."""

  def __init__(self, checkpoint: bool):
    self.body = nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0))
    self.mix = nnx.Param(jnp.array([[0.5, 1.0], [-1.0, 2.0]]))
    self.head = nnx.Conv(4, 2, (1, 1), rngs=nnx.Rngs(1))
    self.checkpoint = checkpoint

  def block(self, x):
    features = _relu_jit(self.body(x))
    return self.head(features) @ self.mix[...] + jnp.tanh(features[..., :2]), jnp.sin(features[..., 2:])

  def __call__(self, x):
    chunks = x.reshape(3, x.shape[0] // 3, *x.shape[1:])
    fn = jax.checkpoint(self.block) if self.checkpoint else self.block
    out, known = jax.lax.map(fn, chunks)
    out, known = out.reshape(x.shape[0], *out.shape[2:]), known.reshape(x.shape[0], *known.shape[2:])
    return out * known + known


@jax.jit
def _relu_jit(x):
  return jax.nn.relu(x)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("remat", [False, True])
def test_a_map_and_checkpoints_are_unzipped_and_the_tail_keeps_its_checkpoints(checkpoint, remat):
  model = _MappedBlocks(checkpoint)
  split = sj.split_params(model, sj.params.by_regex("head/.*"))
  image = np.random.default_rng(6).normal(size=(6, 6, 7, 1)).astype(np.float32)
  fn = functools.partial(lambda graphdef, t, f, x: nnx.merge(graphdef, t, f)(x), split.graphdef)
  part = trunk.partition(fn, split.tunable, split.frozen, image, rewrites=(), remat=remat)
  residuals = part.trunk(split.frozen, image)
  # the tail gets each chunk's trunk values stacked, the frozen matrix once, the map's known output;
  # never the frozen convolution's weights
  shapes = sorted(tuple(s.shape) for s in part.residual_shapes)
  assert shapes == [(2, 2), (3, 2, 6, 7, 2), (3, 2, 6, 7, 4), (6, 6, 7, 2)], shapes
  want = fn(split.tunable, split.frozen, image)
  np.testing.assert_allclose(np.asarray(part.tail(split.tunable, residuals)), np.asarray(want), rtol=1e-6, atol=1e-6)
  loss = lambda f: lambda t: jnp.sum(f(t) ** 2)
  got = jax.jit(jax.grad(loss(lambda t: part.tail(t, residuals))))(split.tunable)
  ref = jax.grad(loss(lambda t: fn(t, split.frozen, image)))(split.tunable)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  tail = str(jax.make_jaxpr(lambda t: part.tail(t, residuals))(split.tunable))
  assert tail.count("conv_general_dilated") == 1  # the head only: the body's convolution is trunk
  assert ("remat" in tail or "checkpoint[" in tail) == (checkpoint or remat)
  batched = jax.vmap(lambda t: part.tail(t, residuals))(jax.tree.map(lambda a: jnp.stack([a, 2 * a]), split.tunable))
  np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(want), rtol=1e-6, atol=1e-6)


def _known_output(wrap):
  def fn(t, frozen, x):
    w, v = frozen

    def block(t, x):
      f = jnp.tanh(x @ w)  # trunk, returned and read by the block's own tail
      return f * t, f

    out, f = wrap(block)(t, x)
    return out + f * t + jnp.cos(x @ v) * t  # a later residual: was read one place late

  return fn


def _literal_output(wrap):
  def fn(t, frozen, x):
    w, v = frozen
    a, c = wrap(lambda t, x: (t @ w, jnp.float32(3.0)))(t, x)
    return a * c + jnp.cos(x @ v) @ t

  return fn


@pytest.mark.parametrize("wrap", [jax.jit, jax.checkpoint], ids=["jit", "checkpoint"])
@pytest.mark.parametrize("make", [_known_output, _literal_output], ids=["known", "literal"])
def test_known_outputs_of_a_nested_call_do_not_shift_the_residuals(wrap, make):
  # Was: a nested call handed a known output it held (a residual it read, a literal) to the enclosing
  # tail, whose trunk handed it over again when read later: wrong values (1.4 off) or a crash.
  fn = make(wrap)
  rng = np.random.default_rng(7)
  w, v, x, t = (jnp.asarray(rng.normal(size=(4, 4)), jnp.float32) for _ in range(4))
  part = trunk.partition(fn, t, (w, v), x, rewrites=())
  residuals = part.trunk((w, v), x)
  np.testing.assert_allclose(np.asarray(part.tail(t, residuals)), np.asarray(fn(t, (w, v), x)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(jax.grad(lambda t: part.tail(t, residuals).sum())(t)),
    np.asarray(jax.grad(lambda t: fn(t, (w, v), x).sum())(t)),
    rtol=1e-5,
    atol=1e-5,
  )
