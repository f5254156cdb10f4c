"""oneDNN convolutions through the XLA FFI (scribblejax.kernels): equal to XLA's, forward and
gradients, under jit, vmap, loops and refinement; clear errors where they cannot run."""

import dataclasses
import importlib
import importlib.metadata
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scribblejax as sj
from scribblejax import kernels
from scribblejax.refinement import backend as backend_lib
from scribblejax.refinement import network, trunk
from scribblejax.testing import random_unet

AVAILABLE = kernels.kernel_status().available
needs_kernels = pytest.mark.skipif(
  not AVAILABLE, reason=f"oneDNN kernels unavailable: {kernels.kernel_status().reason}"
)
DN = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def _installed(name: str) -> bool:
  try:
    importlib.metadata.distribution(name)
    return True
  except importlib.metadata.PackageNotFoundError:
    return False


def test_kernels_build_wherever_onednn_and_a_compiler_are_installed():
  # `make test` installs the `cpu` extra; if the kernels then fail to build, fail loudly here instead
  # of skipping every oneDNN test below.
  if not (_installed("onednn-cpu-gomp") and _installed("onednn-devel-cpu-gomp") and kernels._compiler()):
    pytest.skip("the `cpu` extra or a C++ compiler is not installed")
  status = kernels.kernel_status()
  assert status.available, status.reason
  assert os.path.isfile(status.library)


def _xla_conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(
    x, w, strides, padding, dimension_numbers=DN[x.ndim - 2], precision=jax.lax.Precision.HIGHEST
  )


@needs_kernels
@pytest.mark.parametrize(
  "nd,strides,padding",
  [
    (1, (1,), ((1, 1),)),
    (2, (1, 1), ((1, 1), (1, 1))),
    (2, (2, 1), ((0, 2), (1, 0))),
    (3, (1, 1, 1), ((1, 1), (1, 1), (1, 1))),
    (3, (1, 2, 1), ((0, 0), (2, 1), (1, 1))),
  ],
)
def test_conv_and_its_gradients_equal_xla(nd, strides, padding):
  rng = np.random.default_rng(nd)
  spatial, kernel = (7, 6, 5)[:nd], (3, 2, 3)[:nd]
  x = jnp.asarray(rng.normal(size=(2, *spatial, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(*kernel, 3, 4)), jnp.float32)
  ours = jax.jit(kernels.conv, static_argnums=(2, 3))(x, w, strides, padding)
  theirs = _xla_conv(x, w, strides, padding)
  assert ours.shape == theirs.shape == kernels.output_shape(x.shape, w.shape, strides, padding)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-4)
  cot = jnp.asarray(rng.normal(size=theirs.shape), jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, strides, padding)) * cot)
  g_ours = jax.jit(jax.grad(loss(kernels.conv), argnums=(0, 1)))(x, w)
  g_theirs = jax.grad(loss(_xla_conv), argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_theirs):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize(
  "nd,strides,kernel,padding",
  [
    (2, (2, 2), (2, 2), ((0, 0), (0, 0))),  # a U-Net's up-sampling
    (2, (2, 1), (3, 2), ((1, 0), (0, 1))),
    (3, (2, 2, 2), (2, 2, 2), ((0, 0),) * 3),
    (3, (1, 2, 3), (3, 3, 3), ((1, 1), (0, 2), (2, 0))),
  ],
)
def test_conv_transpose_and_its_gradients_equal_xla(nd, strides, kernel, padding):
  rng = np.random.default_rng(10 + nd)
  x = jnp.asarray(rng.normal(size=(2, *(4, 5, 3)[:nd], 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(*kernel, 3, 4)), jnp.float32)

  def theirs(x, w):  # the gradient of a convolution: an input-dilated convolution, kernel flipped
    flipped = jnp.flip(w, axis=tuple(range(nd)))
    pads = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel, padding)]
    return jax.lax.conv_general_dilated(
      x, flipped, (1,) * nd, pads, lhs_dilation=strides, dimension_numbers=DN[nd], precision=jax.lax.Precision.HIGHEST
    )

  ours = lambda x, w: kernels.conv_transpose(x, w, strides, padding)
  assert ours(x, w).shape == theirs(x, w).shape == kernels.output_shape(x.shape, w.shape, strides, padding, True)
  np.testing.assert_allclose(np.asarray(jax.jit(ours)(x, w)), np.asarray(theirs(x, w)), rtol=1e-4, atol=1e-4)
  cot = jnp.asarray(rng.normal(size=theirs(x, w).shape), jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)) * cot)
  for a, b in zip(jax.grad(loss(ours), argnums=(0, 1))(x, w), jax.grad(loss(theirs), argnums=(0, 1))(x, w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize(
  "strides,kernel,padding", [((2, 2), (2, 2), "VALID"), ((2, 2), (3, 3), "SAME"), ((1, 1), (3, 3), "SAME")]
)
def test_trunk_rewrite_runs_lax_conv_transpose_on_onednn(strides, kernel, padding):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(1, 5, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(*kernel, 3, 4)), jnp.float32)
  up = lambda k, img: jax.lax.conv_transpose(img, k, strides, padding, dimension_numbers=DN[2])
  part = trunk.partition(lambda t, f, img: up(t, img), w, (), x, rewrites=("onednn_conv",))
  rewritten = lambda k: part.tail(k, part.trunk((), x))
  jaxpr = str(jax.make_jaxpr(rewritten)(w))
  assert "onednn_conv_forward" in jaxpr and "conv_general_dilated" not in jaxpr
  np.testing.assert_allclose(np.asarray(rewritten(w)), np.asarray(up(w, x)), rtol=1e-4, atol=1e-4)
  loss = lambda f: lambda k: jnp.sum(jnp.sin(f(k)))
  np.testing.assert_allclose(
    np.asarray(jax.grad(loss(rewritten))(w)), np.asarray(jax.grad(loss(lambda k: up(k, x)))(w)), rtol=1e-4, atol=1e-4
  )


@needs_kernels
def test_conv_under_vmap_with_per_example_weights_and_in_a_while_loop():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 1, 6, 6, 2)), jnp.float32)  # 3 examples of batch 1
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 2, 4)), jnp.float32)  # one kernel per example
  pad = ((1, 1), (1, 1))
  batched = jax.vmap(lambda a, b: kernels.conv(a, b, (1, 1), pad))(x, w)
  for i in range(3):
    np.testing.assert_allclose(
      np.asarray(batched[i]), np.asarray(_xla_conv(x[i], w[i], (1, 1), pad)), rtol=1e-4, atol=1e-4
    )

  def descend(w0):  # 5 gradient steps inside one compiled while_loop
    def body(carry):
      i, k = carry
      g = jax.grad(lambda k: jnp.sum(kernels.conv(x[0], k, (1, 1), pad) ** 2))(k)
      return i + 1, k - 1e-3 * g

    return jax.lax.while_loop(lambda c: c[0] < 5, body, (0, w0))[1]

  def descend_xla(w0):
    k = w0
    for _ in range(5):
      k = k - 1e-3 * jax.grad(lambda k: jnp.sum(_xla_conv(x[0], k, (1, 1), pad) ** 2))(k)
    return k

  np.testing.assert_allclose(np.asarray(jax.jit(descend)(w[0])), np.asarray(descend_xla(w[0])), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("dims", [2, 3])
def test_refine_on_onednn_equals_refine_on_xla(dims):
  model = random_unet(dims, (4, 8))
  split = sj.split_params(model, sj.last_layers(3))
  size = 16 if dims == 2 else 8
  rng = np.random.default_rng(dims)
  image = rng.normal(size=(size,) * dims + (1,)).astype(np.float32)
  marks = np.full((size,) * dims, -1, np.int32)
  marks[(slice(1, 3),) * dims] = 1
  marks[(slice(5, 7),) * dims] = 0
  config = sj.RefineConfig.paper(max_steps=6, early_stop=False, learning_rate=0.05, conv_backend="xla")
  xla = sj.refine(split, image, marks, config)
  ours = sj.refine(split, image, marks, dataclasses.replace(config, conv_backend="onednn"))
  assert int(ours.num_steps) == int(xla.num_steps) == 6
  np.testing.assert_allclose(np.asarray(ours.logits), np.asarray(xla.logits), rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(ours.tunable), jax.tree.leaves(xla.tunable)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # the weights moved: the comparison is not between two untouched copies
  assert (
    max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ours.tunable), jax.tree.leaves(split.tunable)))
    > 1e-4
  )
  # the loop driver (one compiled while_loop) and a batch give the same
  loop = sj.refine(split, image, marks, dataclasses.replace(config, conv_backend="onednn", driver="loop"))
  np.testing.assert_allclose(np.asarray(loop.logits), np.asarray(xla.logits), rtol=1e-4, atol=1e-4)
  batch = sj.refine_batch(
    split,
    np.stack([image, image[::-1]]),
    np.stack([marks, marks]),
    dataclasses.replace(config, conv_backend="onednn", batch_scheme="vmap"),
  )
  np.testing.assert_allclose(np.asarray(batch.logits[0]), np.asarray(xla.logits), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_auto_means_onednn_on_cpu_and_bf16_stays_with_xla():
  if jax.default_backend() != "cpu":
    pytest.skip("oneDNN runs on the CPU only")
  assert sj.kernels.resolve_conv_backend("auto") == "onednn"
  assert sj.kernels.resolve_conv_backend("xla") == "xla"
  # one compiled loop when every convolution is oneDNN's; host-driven chunks when XLA's are left
  assert sj.refinement.resolve_driver("auto") == sj.refinement.resolve_driver("auto", "onednn") == "loop"
  assert (
    sj.refinement.resolve_driver("auto", "xla") == sj.refinement.resolve_driver("auto", "auto", "bfloat16") == "host"
  )
  assert sj.refinement.resolve_driver("auto", cache_trunk=False) == "host"  # the full forward runs XLA's convolutions
  assert sj.refinement.resolve_driver("host") == "host"
  split = sj.split_params(random_unet(2, (4, 8)), sj.last_layers(3))
  image = np.zeros((8, 8, 1), np.float32)
  fn = network.Forward(split.graphdef, "bfloat16")
  part = trunk.partition(fn, split.tunable, split.frozen, image, rewrites=backend_lib.default_rewrites("onednn"))
  jaxpr = str(jax.make_jaxpr(lambda t: part.tail(t, part.trunk(split.frozen, image)))(split.tunable))
  assert "onednn_conv" not in jaxpr and "conv_general_dilated" in jaxpr  # bf16 convolutions stay with XLA


@needs_kernels
def test_public_conv_refuses_what_it_cannot_compute():
  x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4))
  for args, bad in [
    ((x.astype(jnp.bfloat16), w, (1, 1), ((1, 1), (1, 1))), "bfloat16"),  # was: FFI decode error
    ((x.astype(jnp.int32), w, (1, 1), ((1, 1), (1, 1))), "int32"),
    ((x, w, (0, 1), ((1, 1), (1, 1))), "strides (0, 1)"),  # was: ZeroDivisionError
    ((x[:, :2, :2], jnp.ones((5, 5, 2, 4)), (1, 1), ((0, 0), (0, 0))), "non-empty output"),
  ]:
    with pytest.raises(ValueError, match=bad.replace("(", r"\(").replace(")", r"\)")):
      kernels.conv(*args)
  np.testing.assert_allclose(
    np.asarray(kernels.conv(x, w, (1, 1), ((1, 1), (1, 1)))),
    np.asarray(
      jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ),
    rtol=1e-5,
  )


def test_bad_backend_and_unavailable_kernels_raise_clear_errors(monkeypatch):
  with pytest.raises(ValueError, match="conv_backend must be one of"):
    sj.RefineConfig.paper(conv_backend="cudnn")
  with pytest.raises(ValueError, match="computes float32 only"):
    sj.RefineConfig.paper(conv_backend="onednn", compute_dtype="bfloat16")  # was: XLA's convolutions, silently
  with pytest.raises(ValueError, match="conv_backend must be one of"):
    sj.kernels.resolve_conv_backend("fast")
  monkeypatch.setattr(kernels, "kernel_status", lambda: kernels.KernelStatus(False, "oneDNN not found (test)", None))
  assert sj.kernels.resolve_conv_backend("auto") == "xla"  # auto falls back
  with pytest.raises(RuntimeError, match="oneDNN not found"):
    sj.kernels.resolve_conv_backend("onednn")
  with pytest.raises(RuntimeError, match="oneDNN not found"):
    trunk.partition(lambda t, f, x: t * x, jnp.ones(3), (), jnp.ones(3), rewrites=("onednn_conv",))


def test_status_names_what_is_missing(monkeypatch, tmp_path):
  status = kernels.kernel_status.__wrapped__
  monkeypatch.setattr(kernels, "_onednn_prefixes", lambda: [tmp_path])
  missing = status()
  assert not missing.available and "oneDNN not found" in missing.reason and str(tmp_path) in missing.reason
  (tmp_path / "include" / "oneapi" / "dnnl").mkdir(parents=True)
  (tmp_path / "include" / "oneapi" / "dnnl" / "dnnl.hpp").write_text("#error not a real header\n")
  (tmp_path / "lib").mkdir()
  (tmp_path / "lib" / "libdnnl.so").write_bytes(b"")
  monkeypatch.setattr(kernels, "_compiler", lambda: None)
  assert "no C++ compiler" in status().reason
  if kernels.shutil.which("g++") is None:
    return
  monkeypatch.setattr(kernels, "_compiler", lambda: kernels.shutil.which("g++"))
  monkeypatch.setenv("SCRIBBLEJAX_KERNEL_CACHE", str(tmp_path / "cache"))
  failed = status()  # the fake header stops the compiler
  assert not failed.available and "compiling onednn_conv.cc failed" in failed.reason
  assert "not a real header" in failed.reason
  assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-written is left behind


@pytest.mark.slow
@needs_kernels
def test_a_built_library_is_reused(monkeypatch, tmp_path):
  found = kernels._find_onednn()
  monkeypatch.setenv("SCRIBBLEJAX_KERNEL_CACHE", str(tmp_path))
  first = kernels._build(kernels._compiler(), *found)
  stamp = first.stat().st_mtime_ns
  monkeypatch.setattr(kernels.subprocess, "run", lambda *a, **k: pytest.fail("compiled a second time"))
  assert kernels._build(kernels._compiler(), *found) == first and first.stat().st_mtime_ns == stamp
  assert [p.name for p in tmp_path.iterdir()] == [first.name]


@needs_kernels
def test_self_check_passes_even_when_first_run_inside_a_trace_and_catches_wrong_results(monkeypatch):
  assert kernels._self_check() is None
  seen = []
  jax.jit(lambda v: seen.append(kernels._self_check()) or v)(1.0)  # first call from inside a jit trace
  assert seen == [None]
  right = kernels._conv
  wrong = lambda x, w, strides, padding, transposed: right(x, w, strides, padding, transposed) * 1.01
  monkeypatch.setattr(kernels, "_conv", wrong)  # the self-check runs the unchecked kernels
  assert "convolution forward differ" in kernels._self_check()


@needs_kernels
def test_a_library_that_fails_its_self_check_is_not_used(monkeypatch):
  monkeypatch.setattr(kernels, "_self_check", lambda: "convolution forward differ from XLA's")
  status = kernels.kernel_status.__wrapped__()
  assert not status.available and "failed their self-check" in status.reason


@pytest.mark.slow
@needs_kernels
def test_convolution_of_tail_and_skip_concatenation_is_split_with_the_same_value_and_gradient():
  split = sj.split_params(random_unet(2, (4, 8)), sj.last_layers(4))  # up/0 is tunable: [up(x), skip]
  image = jnp.asarray(np.random.default_rng(5).normal(size=(12, 12, 1)), jnp.float32)
  fn = network.Forward(split.graphdef)
  counts = {}
  for name, rewrites in (
    ("split", backend_lib.default_rewrites("onednn")),
    ("whole", tuple(r for r in backend_lib.default_rewrites("onednn") if r != "split_concat_conv")),
  ):
    part = trunk.partition(fn, split.tunable, split.frozen, image, rewrites=rewrites)
    residuals = part.trunk(split.frozen, image)
    tail = lambda t: part.tail(t, residuals)  # noqa: B023 (used in this iteration)
    counts[name] = str(jax.make_jaxpr(tail)(split.tunable)).count("onednn_conv_forward")
    np.testing.assert_allclose(
      np.asarray(tail(split.tunable)), np.asarray(fn(split.tunable, split.frozen, image)), rtol=1e-5, atol=1e-5
    )
    loss = lambda f: lambda t: jnp.sum(jnp.sin(f(t)))
    ours = jax.grad(loss(tail))(split.tunable)
    theirs = jax.grad(loss(lambda t: fn(t, split.frozen, image)))(split.tunable)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  assert counts["split"] == counts["whole"] + 1  # decoder/0/0 runs as two convolutions
