"""oneDNN convolutions for XLA:CPU, through the XLA FFI (optional; ``pip install scribblejax[cpu]``).

XLA:CPU computes convolutions on its own generic kernels; oneDNN (the library behind PyTorch's CPU
convolutions) is faster on the same cores (``docs/performance.md``). This module compiles
``onednn_conv.cc`` against the oneDNN shipped in the ``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp``
wheels (once per machine and version, cached under ``~/.cache/scribblejax/kernels``), registers its
three handlers with XLA, checks them against XLA once, and exposes :func:`conv` and
:func:`conv_transpose`: channels-last (transposed) convolutions whose forward pass and both gradients
run in oneDNN, usable under ``jit``, ``grad``, ``vmap``, ``lax.while_loop`` and ``shard_map`` like any
JAX function.

:mod:`scribblejax.refinement.trunk` applies it to every float32 convolution it can (rewrite ``"onednn_conv"``)
when :attr:`scribblejax.RefineConfig.conv_backend` resolves to ``"onednn"``: by default on the CPU
whenever the kernels are available (:func:`kernel_status`).

Environment:
  SCRIBBLEJAX_ONEDNN_ROOT: a prefix holding ``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so``,
    searched before the Python environment's own prefixes.
  SCRIBBLEJAX_KERNEL_CACHE: where built kernels are kept (default ``$XDG_CACHE_HOME/scribblejax/kernels``).
  CXX: the C++ compiler (default ``c++``, then ``g++``).
  OMP_NUM_THREADS: how many threads oneDNN's convolutions use (GNU OpenMP; default: every core).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CONV_BACKENDS = ("auto", "xla", "onednn")
SOURCE = Path(__file__).with_name("onednn_conv.cc")
_TARGETS = {
  "forward": "SjConvForward",
  "backward_data": "SjConvBackwardData",
  "backward_weights": "SjConvBackwardWeights",
}
_FFI_NAMES = {k: f"scribblejax_onednn_conv_{k}" for k in _TARGETS}


class KernelStatus(NamedTuple):
  """Whether the oneDNN kernels can run in this process."""

  available: bool
  reason: str  # where the built library is, or why the kernels are unavailable
  library: str | None  # path of the built shared library


def _onednn_prefixes() -> list[Path]:
  roots = [os.environ.get("SCRIBBLEJAX_ONEDNN_ROOT"), sys.prefix, site.getuserbase(), sys.base_prefix]
  return [Path(r) for r in dict.fromkeys(r for r in roots if r)]


def _find_onednn() -> tuple[Path, Path] | str:
  """``(include dir, lib dir)`` of a oneDNN 3 installation, or why none was found."""
  for root in _onednn_prefixes():
    include, lib = root / "include", root / "lib"
    if (include / "oneapi" / "dnnl" / "dnnl.hpp").is_file() and (lib / "libdnnl.so").exists():
      return include, lib
  return (
    "oneDNN not found (looked for include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so under "
    f"{', '.join(map(str, _onednn_prefixes()))}); install it with `pip install scribblejax[cpu]` "
    "or set SCRIBBLEJAX_ONEDNN_ROOT"
  )


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def _cache_dir() -> Path:
  env = os.environ.get("SCRIBBLEJAX_KERNEL_CACHE")
  if env:
    return Path(env)
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "scribblejax" / "kernels"


def _build_command(cxx: str, include: Path, lib: Path, out: Path) -> list[str]:
  return [
    cxx,
    "-O2",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-w",
    str(SOURCE),
    f"-I{jax.ffi.include_dir()}",
    f"-I{include}",
    f"-L{lib}",
    "-ldnnl",
    f"-Wl,-rpath,{lib}",
    "-o",
    str(out),
  ]


def _build(cxx: str, include: Path, lib: Path) -> Path:
  """The shared library, compiled unless a build of the same source and toolchain is cached.

  Raises:
    RuntimeError: the compiler failed (with the start of its output).
  """
  key = hashlib.sha256()
  key.update(SOURCE.read_bytes())
  for part in (cxx, str(include), str(lib), jax.ffi.include_dir(), jax.__version__, _jaxlib_version(), sys.platform):
    key.update(part.encode())
  for dnnl in sorted(lib.glob("libdnnl.so*")):
    key.update(f"{dnnl.name}:{dnnl.stat().st_size}".encode())
  target = _cache_dir() / f"onednn_conv-{key.hexdigest()[:16]}.so"
  if target.is_file():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  try:
    done = subprocess.run(
      _build_command(cxx, include, lib, Path(tmp)), capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
      raise RuntimeError(
        f"compiling {SOURCE.name} failed (exit {done.returncode}); the compiler said: "
        f"{(done.stderr or done.stdout)[:2000]}"
      )  # the first error is the cause
    os.replace(tmp, target)  # atomic: another process sees the whole library or none
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return target


@functools.cache
def kernel_status() -> KernelStatus:
  """Finds oneDNN and a C++ compiler, builds the kernels if needed and registers them with XLA
  (once per process).

  Returns:
    A :class:`KernelStatus`; ``available`` is False (with the reason) when oneDNN or a compiler is
    missing, the build fails, or JAX has no CPU backend.
  """
  found = _find_onednn()
  if isinstance(found, str):
    return KernelStatus(False, found, None)
  cxx = _compiler()
  if cxx is None:
    return KernelStatus(False, "no C++ compiler found (set CXX, or install g++)", None)
  try:
    jax.devices("cpu")
    library = _build(cxx, *found)
    handle = ctypes.CDLL(str(library))
    for kind, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(_FFI_NAMES[kind], jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu")
    error = _self_check()
  except (RuntimeError, OSError, subprocess.SubprocessError) as err:
    return KernelStatus(False, f"the oneDNN kernels are unavailable: {err}", None)
  if error is not None:
    return KernelStatus(False, f"the oneDNN kernels built at {library} failed their self-check: {error}", None)
  return KernelStatus(True, f"built at {library}", str(library))


def _self_check() -> str | None:
  """Compares one small convolution, transposed convolution and their gradients with XLA's; what
  differs, or ``None``. Runs eagerly even when first called while a function is being traced."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
  w = rng.normal(size=(3, 2, 3, 4)).astype(np.float32)
  dn = ("NHWC", "HWIO", "NHWC")
  pads = ((1, 0), (0, 1))

  def xla(x, w, transposed):
    if transposed:
      flipped = jnp.flip(w, axis=(0, 1))
      return jax.lax.conv_general_dilated(
        x,
        flipped,
        (1, 1),
        [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(w.shape, pads)],
        lhs_dilation=(2, 1),
        dimension_numbers=dn,
        precision=jax.lax.Precision.HIGHEST,
      )
    return jax.lax.conv_general_dilated(x, w, (2, 1), pads, dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST)

  def ours(x, w, transposed):  # the unchecked kernels: the public ones ask kernel_status, which runs this
    return _conv(x, w, (2, 1), pads, transposed)

  with jax.ensure_compile_time_eval():
    for transposed in (False, True):
      for name, f in (
        ("forward", lambda f, x, w: f(x, w, transposed)),  # noqa: B023 (called in this iteration)
        (
          "gradients",
          lambda f, x, w: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w, transposed))), argnums=(0, 1))(x, w),  # noqa: B023
        ),
      ):
        for a, b in zip(jax.tree.leaves(f(ours, x, w)), jax.tree.leaves(f(xla, x, w))):
          if a.shape != b.shape or not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4):
            return f"{'transposed ' if transposed else ''}convolution {name} differ from XLA's"
  return None


def resolve_conv_backend(backend: str) -> str:
  """``"xla"`` or ``"onednn"``: what ``backend`` (one of :data:`CONV_BACKENDS`) means here.

  ``"auto"`` is ``"onednn"`` when JAX's default backend is the CPU and :func:`kernel_status` says the
  kernels are available, else ``"xla"``.

  Raises:
    ValueError: ``backend`` is not one of :data:`CONV_BACKENDS`.
    RuntimeError: ``"onednn"`` was asked for but cannot run here (the error says why).
  """
  if backend not in CONV_BACKENDS:
    raise ValueError(f"conv_backend must be one of {CONV_BACKENDS}, got {backend!r}")
  if backend == "xla":
    return "xla"
  on_cpu = jax.default_backend() == "cpu"
  if backend == "auto":
    return "onednn" if on_cpu and kernel_status().available else "xla"
  if not on_cpu:
    raise RuntimeError(
      f"conv_backend='onednn' runs on the CPU only; JAX's default backend is {jax.default_backend()!r}"
    )
  status = kernel_status()
  if not status.available:
    raise RuntimeError(f"conv_backend='onednn': {status.reason}")
  return "onednn"


def _attrs(strides, padding, transposed) -> dict:
  return dict(
    strides=np.asarray(strides, np.int64),
    padding_lo=np.asarray([p[0] for p in padding], np.int64),
    padding_hi=np.asarray([p[1] for p in padding], np.int64),
    transposed=bool(transposed),
  )


def _call(kind: str, shape, *args, strides, padding, transposed):
  return jax.ffi.ffi_call(_FFI_NAMES[kind], jax.ShapeDtypeStruct(tuple(shape), jnp.float32), vmap_method="sequential")(
    *args, **_attrs(strides, padding, transposed)
  )


def output_shape(x_shape, w_shape, strides, padding, transposed: bool = False) -> tuple[int, ...]:
  """Shape of ``conv(x, w, strides, padding)`` (or of ``conv_transpose`` when ``transposed``)."""
  nd = len(strides)
  if transposed:
    spatial = [(x_shape[1 + d] - 1) * strides[d] + w_shape[d] - padding[d][0] - padding[d][1] for d in range(nd)]
  else:
    spatial = [(x_shape[1 + d] + padding[d][0] + padding[d][1] - w_shape[d]) // strides[d] + 1 for d in range(nd)]
  return (x_shape[0], *spatial, w_shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, transposed):
  return _call(
    "forward",
    output_shape(x.shape, w.shape, strides, padding, transposed),
    x,
    w,
    strides=strides,
    padding=padding,
    transposed=transposed,
  )


def _conv_fwd(x, w, strides, padding, transposed):
  return _conv(x, w, strides, padding, transposed), (x, w)


def _conv_bwd(strides, padding, transposed, res, dy):
  x, w = res
  kw = dict(strides=strides, padding=padding, transposed=transposed)
  return _call("backward_data", x.shape, dy, w, **kw), _call("backward_weights", w.shape, x, dy, **kw)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _checked(x, w, strides, padding, transposed: bool) -> tuple:
  """``(strides, padding)`` as tuples, after refusing what the kernels cannot compute (a clear error
  instead of one from XLA's custom-call machinery), and with the kernels registered."""
  strides, padding = tuple(int(s) for s in strides), tuple(tuple(int(p) for p in pair) for pair in padding)
  if not supports(x.shape, w.shape, x.dtype, strides, padding, transposed) or jnp.dtype(w.dtype) != jnp.float32:
    name = "conv_transpose" if transposed else "conv"
    raise ValueError(
      f"kernels.{name} computes float32 x [N, *S, I] with w [*K, I, O], 1 to 3 spatial axes, "
      f"strides >= 1, padding >= 0 and a non-empty output; got x {tuple(x.shape)} {x.dtype}, "
      f"w {tuple(w.shape)} {w.dtype}, strides {strides}, padding {padding}"
    )
  status = kernel_status()
  if not status.available:
    raise RuntimeError(f"the oneDNN kernels cannot run here: {status.reason}")
  return strides, padding


def conv(x: jax.Array, w: jax.Array, strides: tuple[int, ...], padding: tuple[tuple[int, int], ...]) -> jax.Array:
  """A channels-last convolution on oneDNN: ``float32`` x ``[N, *S, I]``, w ``[*K, I, O]`` ->
  ``[N, *S', O]``, with 1 to 3 spatial axes, non-negative ``padding`` (``(lo, hi)`` per axis) and
  ``strides``; no dilation, no feature groups. Equal to ``lax.conv_general_dilated`` with dimension
  numbers ``("NHWC", "HWIO", "NHWC")`` up to float rounding; differentiable (both gradients run on
  oneDNN too). Needs :func:`kernel_status` available.

  Raises:
    ValueError: a case :func:`supports` refuses (another dtype, a stride of 0, an empty output ...).
    RuntimeError: the kernels cannot run here (:func:`kernel_status` says why).
  """
  return _conv(x, w, *_checked(x, w, strides, padding, False), False)


def conv_transpose(
  x: jax.Array, w: jax.Array, strides: tuple[int, ...], padding: tuple[tuple[int, int], ...]
) -> jax.Array:
  """A channels-last transposed convolution on oneDNN (the gradient of a convolution with respect to
  its input, as ``torch.nn.ConvTranspose``): x ``[N, *S, I]``, w ``[*K, I, O]`` -> ``[N, *S', O]``
  with ``S' = (S - 1) * strides + K - lo - hi``. Equal to
  ``lax.conv_transpose(x, w, strides, padding, transpose_kernel=False)`` with the kernel flipped
  along its spatial axes and each side's padding ``K - 1 - pad``; differentiable.

  Raises:
    ValueError, RuntimeError: as :func:`conv`.
  """
  return _conv(x, w, *_checked(x, w, strides, padding, True), True)


def supports(x_shape, w_shape, dtype, strides, padding, transposed: bool = False) -> bool:
  """Whether :func:`conv` (or :func:`conv_transpose`) computes this case: float32, 1 to 3 spatial
  axes, strides >= 1, padding >= 0, no empty axis."""
  nd = len(strides)
  return (
    1 <= nd <= 3
    and jnp.dtype(dtype) == jnp.float32
    and len(padding) == nd
    and len(x_shape) == len(w_shape) == nd + 2
    and x_shape[-1] == w_shape[-2]
    and all(s >= 1 for s in strides)
    and all(lo >= 0 and hi >= 0 for lo, hi in padding)
    and all(n > 0 for n in x_shape)
    and all(n > 0 for n in w_shape)
    and all(n > 0 for n in output_shape(x_shape, w_shape, strides, padding, transposed))
  )
