"""Every backend choice of the refinement, in one module.

:mod:`scribblejax.refinement.algorithm` states Algorithm 1 without asking where it runs. What differs
between a CPU, a GPU and a TPU is decided here, each choice a function of the config and
``jax.default_backend()`` (looked up when a refinement starts, never at import):

* the driver (:func:`resolve_driver`): one compiled ``lax.while_loop``, or compiled chunks of steps
  driven from Python;
* the batch scheme (:func:`resolve_batch_scheme`) and the convolution rewrites of the tail
  (:func:`default_rewrites`, :func:`tail_rewrites`);
* the flat carry (:func:`flat_carry`, :func:`flattens`): W_lam as one vector in the loop;
* the lazy backward pass (:func:`lazy_value_and_grad`): skipped under ``lax.cond`` when its update
  will not be taken;
* XLA's convolution layout on GPUs (:data:`COMPILER_OPTIONS`, :class:`jit`).

The reasons and the measurements behind each choice are in ``docs/performance.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from scribblejax import kernels
from scribblejax.config import RefineConfig, builtin_optimizer
from scribblejax.refinement import algorithm

# XLA options of every compiled refinement program on GPUs: channels-last cuDNN convolutions. XLA:GPU's
# own choice for float32 3D convolutions on Hopper is channels-first, which cuDNN converts at every
# call (docs/performance.md). SCRIBBLEJAX_FORCE_CONV_NHWC=0 (read at import) leaves the layout to XLA.
COMPILER_OPTIONS = (
  {"xla_gpu_force_conv_nhwc": True} if os.environ.get("SCRIBBLEJAX_FORCE_CONV_NHWC", "1") != "0" else None
)


class jit:  # noqa: N801 (used as jax.jit is)
  """``jax.jit`` that compiles with :data:`COMPILER_OPTIONS` when the default backend is a GPU and
  without them elsewhere (CPU and TPU programs stay as plain ``jax.jit`` makes them). The backend
  is looked up at each call, not at import, so importing never starts one."""

  def __init__(self, fn, **kwargs):
    self._plain = jax.jit(fn, **kwargs)
    self._gpu = jax.jit(fn, compiler_options=COMPILER_OPTIONS, **kwargs) if COMPILER_OPTIONS else self._plain
    functools.update_wrapper(self, fn)

  def _pick(self):
    return self._gpu if jax.default_backend() == "gpu" else self._plain

  def __call__(self, *args, **kwargs):
    return self._pick()(*args, **kwargs)

  def lower(self, *args, **kwargs):
    """``jax.jit(...).lower`` of the program this backend runs."""
    return self._pick().lower(*args, **kwargs)

  def cache_size(self) -> int:
    """How many programs this backend's function has compiled (tests count them to prove no retracing)."""
    return self._pick()._cache_size()

  def compiler_options(self) -> dict | None:
    """The XLA options this backend's programs compile with: :data:`COMPILER_OPTIONS` on a GPU, else ``None``."""
    return COMPILER_OPTIONS if self._pick() is not self._plain else None


@dataclasses.dataclass(frozen=True)
class Backend:
  """How the network is evaluated and the loop carried: static settings, part of the compilation cache key.

  None of them changes what Algorithm 1 computes (up to float rounding, and ``compute_dtype``'s
  precision).
  """

  cache_trunk: bool = True  # the frozen trunk is computed once; the loop runs the tail alone
  compute_dtype: str | None = None  # None: the parameters' own dtype (float32)
  remat: bool = False  # rematerialise the forward pass in the backward pass
  conv_backend: str = "xla"  # resolved: "xla" or "onednn"
  conv_rewrite: str | None = None  # batches: "conv_as_matmul" or "conv_as_shifted_matmul" in the tail
  flat_params: bool = False  # the loop driver carries W_lam as one flat vector (see flattens)
  lazy_backward: bool = False  # the backward pass runs only when its update will be taken

  @classmethod
  def of(cls, config: RefineConfig, batched: bool = False) -> Backend:
    """The backend settings of ``config`` here, for one image or (``batched``) a vmapped batch.

    The lazy backward pass is on for the CPU with oneDNN convolutions only: it takes a ``lax.cond``,
    which costs nothing on the CPU but a device-to-host sync per step on a GPU, and XLA:CPU's own
    convolution gradients are only fast outside nested computations.
    """
    rewrite = _SCHEME_REWRITES.get(resolve_batch_scheme(config.batch_scheme)) if batched else None
    compute_dtype = None if config.compute_dtype == "float32" else config.compute_dtype
    conv_backend = kernels.resolve_conv_backend(config.conv_backend)
    lazy = jax.default_backend() == "cpu" and conv_backend == "onednn"
    return cls(bool(config.cache_trunk), compute_dtype, bool(config.remat), conv_backend, rewrite, flat_carry(), lazy)


_SCHEME_REWRITES = {"matmul": "conv_as_matmul", "shifted": "conv_as_shifted_matmul"}


def resolve_batch_scheme(scheme: str) -> str:
  """``"auto"`` -> ``"sequential"`` on CPU, ``"matmul"`` on GPU and TPU.

  On CPU one image already keeps every core busy and both batched forms are slower per image. On
  GPUs ``vmap`` over per-image weights makes each tunable convolution a grouped convolution;
  ``"matmul"`` turns them into batched matrix products, ``"shifted"`` into one batched product per
  kernel tap. One image already keeps a GPU busy, so no scheme gains much (``docs/performance.md``).
  """
  if scheme != "auto":
    return scheme
  return "sequential" if jax.default_backend() == "cpu" else "matmul"


def resolve_driver(
  driver: str, conv_backend: str = "auto", compute_dtype: str = "float32", cache_trunk: bool = True
) -> str:
  """What ``driver`` means here: ``"auto"`` is ``"loop"`` on GPU and TPU, and on the CPU too when
  every convolution runs on oneDNN (``conv_backend`` resolves to ``"onednn"``, ``compute_dtype`` is
  float32 and ``cache_trunk`` is on: without it every step runs the model's own forward pass, on
  XLA's convolutions); else ``"host"`` on the CPU.

  XLA:CPU runs its own convolution gradients inside a ``while_loop`` body on a slow generic path, so
  its CPU refinement is driven from Python. oneDNN's convolutions are custom calls that run at full
  speed in a loop body, where one compiled loop is the faster driver (``docs/performance.md``).
  """
  if driver != "auto":
    return driver
  if jax.default_backend() != "cpu":
    return "loop"
  onednn = kernels.resolve_conv_backend(conv_backend) == "onednn" and compute_dtype == "float32" and cache_trunk
  return "loop" if onednn else "host"


def driver_of(config: RefineConfig) -> str:
  """:func:`resolve_driver` of ``config``'s settings."""
  return resolve_driver(config.driver, config.conv_backend, config.compute_dtype, config.cache_trunk)


def flat_carry() -> bool:
  """Whether the loop driver carries W_lam flat on this backend: on GPUs and TPUs, where one kernel for
  the optimiser, the proximal term and the finiteness checks replaces one per parameter. On the CPU the
  slicing and concatenation are copies, and it is no faster (``docs/performance.md``)."""
  return jax.default_backend() != "cpu"


def flattens(backend: Backend, optimizer: Any, tunable: Any) -> bool:
  """Whether the loop carries W_lam flat: asked for (``backend.flat_params``), a built-in optimiser that works
  element by element (:attr:`scribblejax.config.BuiltinOptimizer.elementwise`: the same steps on one vector),
  and one dtype for every tunable leaf."""
  leaves = jax.tree.leaves(tunable)
  builtin = builtin_optimizer(optimizer)
  return (
    backend.flat_params
    and builtin is not None
    and builtin.elementwise
    and len(leaves) > 1
    and len({jnp.result_type(x) for x in leaves}) == 1
  )


def lazy_value_and_grad(loss: Callable, tunable: Any) -> tuple[jax.Array, jax.Array, Callable]:
  """:func:`scribblejax.refinement.algorithm.value_and_grad` with the backward pass under ``lax.cond``.

  ``gradient(wanted)`` runs the backward pass only when ``wanted()`` is true (zeros otherwise): the
  step that finds every mark honoured takes no update, so it needs no gradient.
  """
  value, pullback, logits = jax.vjp(loss, tunable, has_aux=True)

  def gradient(wanted: Callable) -> Any:
    return jax.lax.cond(
      wanted(), lambda: pullback(jnp.ones_like(value))[0], lambda: jax.tree.map(jnp.zeros_like, tunable)
    )

  return value, logits, gradient


def differentiate(backend: Backend) -> Callable:
  """The gradient form for :func:`scribblejax.refinement.algorithm.step` under these settings."""
  return lazy_value_and_grad if backend.lazy_backward else algorithm.value_and_grad


DEFAULT_REWRITES = ("transposed_conv",)
ONEDNN_REWRITES = ("onednn_conv", "split_concat_conv")
CPU_REWRITES = ("conv3d_as_2d",)


def default_rewrites(conv_backend: str = "auto") -> tuple[str, ...]:
  """The rewrites :func:`scribblejax.refinement.trunk.partition` applies unless told otherwise, in order.

  :data:`ONEDNN_REWRITES` when ``conv_backend`` (see :func:`scribblejax.kernels.resolve_conv_backend`)
  resolves to ``"onednn"`` (every float32 convolution and transposed convolution on oneDNN, and
  convolutions of concatenated tail and trunk values split); then :data:`DEFAULT_REWRITES`; then
  :data:`CPU_REWRITES` when JAX's default backend is the CPU, for the convolutions oneDNN does not take
  (3D convolutions as 2D ones). Why each is faster: ``docs/performance.md``.

  Raises:
    ValueError, RuntimeError: as :func:`scribblejax.kernels.resolve_conv_backend`.
  """
  onednn = ONEDNN_REWRITES if kernels.resolve_conv_backend(conv_backend) == "onednn" else ()
  return onednn + DEFAULT_REWRITES + (CPU_REWRITES if jax.default_backend() == "cpu" else ())


def tail_rewrites(backend: Backend) -> tuple[str, ...]:
  """The rewrites of the tail that the refinement loop runs: the batch scheme's, then :func:`default_rewrites`."""
  return ((backend.conv_rewrite,) if backend.conv_rewrite else ()) + default_rewrites(backend.conv_backend)
