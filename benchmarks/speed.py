"""Speed of scribble-conditioned refinement, side by side with PyTorch implementations of it.

Times, on whatever device JAX finds (and torch, when installed, on the matching device):

* one interaction with a fixed number of steps (early stop off) and with early stop;
* milliseconds per step, with the compile time reported apart (first call minus the median call);
* images per second for batches of 1, 8 and 32 (``refine_batch``; torch refines one image at a time);
* 2D 256^2 and 512^2, 3D 64^3, 96^3 and 128^3, on a U-Net with channels (32, 64, 128, 256),
  instance norm, the last 5 layers tunable (the setting of the issue's table).

PyTorch: the loop a researcher would first write (``torch_eager``) and the peer a demanding user
would write (``torch_cached``, ``torch_compiled``, ``torch_cuda_graphs``, their bf16 and early-stop
forms: :class:`benchmarks.torch_reference.TorchPeer`), each checked first to give scribblejax's logits.

Every interaction of a timed series gets new marks of the same shape, and the benchmark records
whether any of scribblejax's compiled functions was traced again after the warm-up calls
(``retraced``: it never should be). The variants of a case and batch are timed in turns: one warm-up
call each, then ``--repeats`` rounds of one call each, the order rotated every round; times are the
medians, with the fastest and slowest call. Each timed record names the strongest (fastest) PyTorch
variant of its case, batch, precision and stopping rule, and its ratio to it.

Usage::

    python -m benchmarks.speed                      # the full suite on the default device
    python -m benchmarks.speed --quick              # CI-sized smoke run (tiny sizes, 2 steps)
    python -m benchmarks.speed --cases 2d256 --batches 1 --variants scribblejax,torch_eager

Results: ``--out PATH.json`` (one record per measurement; default ``benchmarks/results/speed_DEVICE.json``,
``speed_DEVICE_quick.json`` for ``--quick``)
and a markdown table next to it (``PATH.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from scribblejax.testing import random_unet  # noqa: F401 (benchmarks and tests build their models with it)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CHECK_TOLERANCE = 1e-3  # largest |logit difference| at which check_torch_vs_scribblejax passes


class Case(NamedTuple):
  """One problem size."""

  name: str
  dims: int
  size: int
  steps: int  # fixed steps per interaction (early stop off)


CASES = {
  "2d256": Case("2d256", 2, 256, 100),
  "2d512": Case("2d512", 2, 512, 100),
  "3d64": Case("3d64", 3, 64, 50),
  "3d96": Case("3d96", 3, 96, 50),
  "3d128": Case("3d128", 3, 128, 50),
}
QUICK_CASES = {
  "2d32": Case("2d32", 2, 32, 2),
  "3d16": Case("3d16", 3, 16, 2),
}
# The PyTorch peer (benchmarks.torch_reference.TorchPeer), trunk cached, no host sync in a fixed-step
# loop: base name -> PeerOptions fields. Each has "_bf16" (autocast) and "_early_stop" forms.
TORCH_PEERS = {
  "torch_cached": {},
  "torch_compiled": {"compile": True},
  "torch_cuda_graphs": {"cuda_graphs": True},
  "torch_compiled_cuda_graphs": {"compile": True, "cuda_graphs": True},
  "torch_full_forward": {"cache_trunk": False},
}
PEER_VARIANTS = tuple(
  f"{base}{bf16}{early}" for base in TORCH_PEERS for bf16 in ("", "_bf16") for early in ("", "_early_stop")
)
VARIANTS = (
  "scribblejax",
  "scribblejax_early_stop",
  "scribblejax_full_forward",
  "scribblejax_loop_driver",
  "scribblejax_host_driver",
  "scribblejax_vmap",
  "scribblejax_matmul",
  "scribblejax_shifted",
  "scribblejax_sequential",
  "scribblejax_sharded",
  "scribblejax_bf16",
  "scribblejax_remat",
  "scribblejax_xla",
  "scribblejax_trunk_reused",
  "scribblejax_trunk_reused_early_stop",
  "torch_eager",
  "torch_eager_early_stop",
  *PEER_VARIANTS,
)
DEFAULT_VARIANTS = (
  "scribblejax",
  "scribblejax_early_stop",
  "scribblejax_full_forward",
  "scribblejax_bf16",
  "torch_eager",
  "torch_eager_early_stop",
  "torch_cached",
  "torch_cached_early_stop",
  "torch_cached_bf16",
  "torch_compiled",
  "torch_compiled_early_stop",
  "torch_compiled_bf16",
  "torch_cuda_graphs",
  "torch_cuda_graphs_early_stop",
  "torch_cuda_graphs_bf16",
  "torch_compiled_cuda_graphs",
  "torch_compiled_cuda_graphs_bf16",
)
# variants that take a batch; the others run at batch 1 only
BATCHED_VARIANTS = (
  "scribblejax",
  "scribblejax_vmap",
  "scribblejax_matmul",
  "scribblejax_shifted",
  "scribblejax_sequential",
  "scribblejax_sharded",
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every measurement of one run shares."""

  channels: tuple = (32, 64, 128, 256)
  layers: int = 5
  classes: int = 2
  repeats: int = 3
  learning_rate: float = 0.01
  momentum: float = 0.9
  prox_weight: float = 1.0
  early_stop_steps: int | None = None  # M for the early-stop variants (None: the case's steps)
  batch_steps: int | None = None  # fixed steps for batch > 1 (None: the case's steps)
  check_size_2d: int = 64  # size of the torch-vs-scribblejax consistency check
  check_size_3d: int = 16
  check_steps: int = 3
  memory: bool = False  # add XLA's compiled-memory analysis to batch-1 scribblejax records


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def make_model(dims: int, settings: Settings, seed: int = 0):
  """The benchmark U-Net (random weights, fixed seed)."""
  return random_unet(dims, settings.channels, settings.classes, seed)


def _ball(shape: tuple, centre: np.ndarray, radius: float) -> tuple[tuple, np.ndarray]:
  """The bounding box of a Euclidean ball (slices) and the ball's mask inside it."""
  lo = [max(int(np.floor(c - radius)), 0) for c in centre]
  hi = [min(int(np.ceil(c + radius)) + 1, n) for c, n in zip(centre, shape)]
  axes = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
  d2 = sum((ax - c) ** 2 for ax, c in zip(axes, centre))
  return tuple(slice(a, b) for a, b in zip(lo, hi)), d2 <= radius**2


def make_inputs(dims: int, size: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Synthetic images ``f32[batch, *spatial, 1]`` (bright blobs on noise) and marks ``[batch, *spatial]``.

  Each image gets 4 blobs; the marks are small disks (2D) or balls (3D) of class 1 at the 4 blob
  centres and class 0 at 4 background points, so early stopping ends after a realistic number of steps.
  """
  rng = np.random.default_rng(seed)
  shape = (size,) * dims
  images = np.empty((batch, *shape, 1), np.float32)
  marks = np.full((batch, *shape), -1, np.int32)
  radius = max(size / 16, 2.0)
  mark_radius = max(1.0, size / 128)
  for b in range(batch):
    centres = rng.uniform(2 * radius, size - 2 * radius, (4, dims))
    blobs = np.zeros(shape, np.float32)
    for c in centres:
      box, ball = _ball(shape, c, radius)
      blobs[box][ball] = 1.0
    images[b, ..., 0] = blobs + 0.3 * rng.standard_normal(shape).astype(np.float32)
    points = [(c, 1) for c in centres]
    while len(points) < 8:
      p = rng.uniform(0, size, dims)
      if np.min(np.linalg.norm(centres - p, axis=-1)) > 2 * radius:
        points.append((p, 0))
    for p, label in points:
      box, ball = _ball(shape, p, mark_radius)
      marks[b][box][ball] = label
  return images, marks


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


class Timing(NamedTuple):
  first_s: float  # the warm-up call (compilation + one run)
  median_s: float
  times_s: tuple
  last: Any  # what the last call returned


def time_calls(fn: Callable[[int], Any], repeats: int) -> Timing:
  """Calls ``fn(i)`` once to warm up and ``repeats`` more times (``i`` = 0, 1, ...); wall times."""
  start = time.perf_counter()
  out = fn(0)
  first = time.perf_counter() - start
  times = []
  for i in range(1, repeats + 1):
    start = time.perf_counter()
    out = fn(i)
    times.append(time.perf_counter() - start)
  return Timing(first, statistics.median(times) if times else first, tuple(times), out)


class Interrupted(Exception):
  """Ctrl-C, or a time limit's SIGINT, in the middle of a series: ``partial`` holds what it measured."""

  def __init__(self, partial: list):
    super().__init__("interrupted")
    self.partial = partial


def time_interleaved(
  calls: Sequence[Callable[[int], Any]], repeats: int, after_warmup: Callable[[], None] | None = None
) -> list[Timing | Exception]:
  """Times several contestants in one series, so that a change of load hits them all alike.

  Each ``calls[k](0)`` runs once to warm up (compilation + one run), one after another; then come
  ``repeats`` rounds, each calling every contestant once (``calls[k](i)`` in round ``i``), the order
  rotated by one place each round (A B C, B C A, C A B, ...): no contestant always runs first, or
  always after the same one. A contestant that raises is dropped; its slot holds the exception.

  Args:
    calls: one function per contestant.
    repeats: rounds after the warm-up.
    after_warmup: called once between the warm-up calls and the first round.

  Returns:
    One :class:`Timing` (or the exception it raised) per contestant, in the order of ``calls``.

  Raises:
    Interrupted: on ``KeyboardInterrupt``; its ``partial`` holds the same list for the rounds that
      ended (a contestant whose warm-up call did not end holds a ``RuntimeError``).
  """
  n = len(calls)
  lasts, times = [None] * n, [[] for _ in range(n)]
  failed: dict[int, Exception] = {}

  def one(k, i):
    start = time.perf_counter()
    try:
      lasts[k] = calls[k](i)
    except Exception as err:  # noqa: BLE001 (one failing contestant must not stop the others)
      failed[k] = err
      return None
    return time.perf_counter() - start

  def results():
    return [
      failed.get(k)
      or (
        RuntimeError("interrupted before its warm-up call ended")
        if firsts[k] is None
        else Timing(firsts[k], statistics.median(times[k]) if times[k] else firsts[k], tuple(times[k]), lasts[k])
      )
      for k in range(n)
    ]

  firsts = [None] * n
  try:
    for k in range(n):
      firsts[k] = one(k, 0)
    if after_warmup:
      after_warmup()
    for i in range(1, repeats + 1):
      for k in [(j + i - 1) % n for j in range(n)]:
        if k not in failed:
          elapsed = one(k, i)
          if elapsed is not None:
            times[k].append(elapsed)
  except KeyboardInterrupt:
    raise Interrupted(results()) from None
  return results()


def _compiled_cache_sizes() -> dict:
  """Cache sizes of scribblejax's compiled entry points (to detect retracing)."""
  from scribblejax.refinement import drivers

  return {f"scribblejax.refinement.drivers.{name}": size for name, size in drivers.cache_sizes().items()}


def device_name() -> str:
  import jax

  return jax.devices()[0].device_kind


def versions() -> dict:
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
    try:
      out[name] = importlib.import_module(name).__version__
    except Exception:  # noqa: BLE001 (absent or broken: not part of this run)
      pass
  return out


def host_info() -> dict:
  import jax

  from scribblejax.research.evaluate import host_cpu

  cpu = host_cpu()
  return {
    "platform": jax.default_backend(),
    "devices": jax.device_count(),
    "host_cpu": cpu["cpu_model"] or platform.processor(),
    "cpu_features": cpu["cpu_features"],
    "cpu_count": os.cpu_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "scribblejax_env": {k: v for k, v in os.environ.items() if k.startswith("SCRIBBLEJAX_")},
  }


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _record(variant, case, batch, steps, timing, settings, extra=None) -> dict:
  ms = 1000 * timing.median_s
  rec = {
    "device": device_name(),
    "variant": variant,
    "dims": case.dims,
    "size": case.size,
    "batch": batch,
    "steps": int(steps),
    "ms_per_interaction": round(ms / batch, 3) if batch > 1 else round(ms, 3),
    "ms_per_batch": round(ms, 3),
    "ms_per_step": round(ms / max(int(steps), 1), 3),
    "images_per_s": round(batch / timing.median_s, 4),
    "compile_s": round(max(timing.first_s - timing.median_s, 0.0), 3),
    "first_call_s": round(timing.first_s, 3),
    "times_s": [round(t, 4) for t in timing.times_s],
    "spread_ms_per_interaction": [round(1000 * t / batch, 3) for t in (min(timing.times_s), max(timing.times_s))]
    if timing.times_s
    else None,
    "versions": versions(),
    "settings": {**dataclasses.asdict(settings), **host_info()},
  }
  rec.update(extra or {})
  return rec


def _jax_config(variant: str, steps: int, settings: Settings):
  import scribblejax as sj

  early = variant.endswith("early_stop")
  kwargs = dict(
    max_steps=(settings.early_stop_steps or steps) if early else steps,
    early_stop=early,
    learning_rate=settings.learning_rate,
    momentum=settings.momentum,
    prox_weight=settings.prox_weight,
  )
  if variant == "scribblejax_full_forward":
    kwargs["cache_trunk"] = False
  if variant == "scribblejax_loop_driver":
    kwargs["driver"] = "loop"
  if variant == "scribblejax_host_driver":
    kwargs["driver"] = "host"
  if variant in ("scribblejax_vmap", "scribblejax_matmul", "scribblejax_shifted", "scribblejax_sequential"):
    kwargs["batch_scheme"] = variant.split("_")[1]
  if variant == "scribblejax_bf16":
    kwargs["compute_dtype"] = "bfloat16"
  if variant == "scribblejax_remat":
    kwargs["remat"] = True
  if variant == "scribblejax_xla":
    kwargs["conv_backend"] = "xla"
  return sj.RefineConfig.paper(**kwargs)  # the algorithm the PyTorch peer implements (SGD, alpha)


class Contestant(NamedTuple):
  """One variant of one case and batch, ready to time."""

  variant: str
  call: Callable[[int], Any]  # call(i): interaction i (0: the warm-up)
  finish: Callable[[Timing, bool], dict]  # finish(timing, retraced): its record


class Unavailable(Exception):
  """A variant that cannot run here (CUDA graphs on a CPU, torch.compile without a compiler)."""


def bench_jax(variant: str, case: Case, batch: int, settings: Settings, split) -> dict:
  """One scribblejax measurement, timed alone (its record; a failure's holds ``error``)."""
  return measure([variant], case, batch, settings, None, split, order="sequential")[0]


def prepare_jax(variant: str, case: Case, batch: int, settings: Settings, split) -> Contestant:
  """One scribblejax measurement, ready to time (:class:`Contestant`)."""
  import jax

  import scribblejax as sj

  steps = case.steps if batch == 1 or settings.batch_steps is None else settings.batch_steps
  config = _jax_config(variant, steps, settings)
  inputs = [make_inputs(case.dims, case.size, batch, seed=1000 * case.size + i) for i in range(settings.repeats + 1)]

  if variant.startswith("scribblejax_trunk_reused"):
    # a later interaction on an image: its trunk was computed once before (as a session does), untimed
    trunks = [sj.compute_trunk(split, x[0][0], config) for x in inputs]

    def call(i):
      return jax.block_until_ready(sj.refine(split, inputs[i][0][0], inputs[i][1][0], config, trunk=trunks[i]))
  elif batch == 1 and variant not in BATCHED_VARIANTS[1:]:

    def call(i):
      result = sj.refine(split, inputs[i][0][0], inputs[i][1][0], config)
      return jax.block_until_ready(result)
  elif variant == "scribblejax_sharded":
    from scribblejax.refinement import sharding

    def call(i):
      return jax.block_until_ready(sharding.refine_sharded(split, inputs[i][0], inputs[i][1], config))
  else:

    def call(i):
      return jax.block_until_ready(sj.refine_batch(split, inputs[i][0], inputs[i][1], config))

  def finish(timing: Timing, retraced: bool) -> dict:
    extra = {}
    if settings.memory and batch == 1 and variant not in BATCHED_VARIANTS[1:]:
      memory = sj.refinement.memory_analysis(split, inputs[0][0][0], inputs[0][1][0], config)
      extra.update(memory=memory, peak_bytes=memory["peak_bytes"])
    return _jax_record(variant, case, batch, settings, config, timing, retraced, extra)

  return Contestant(variant, call, finish)


def _jax_record(variant, case, batch, settings, config, timing, retraced, extra) -> dict:
  import scribblejax as sj

  last = timing.last
  if isinstance(last, list):
    taken = max(int(r.num_steps) for r in last)
    satisfied = all(bool(r.satisfied) for r in last)
  else:
    taken = int(np.max(np.asarray(last.num_steps)))
    satisfied = bool(np.all(np.asarray(last.satisfied)))
  extra = {
    **extra,
    "retraced": retraced,
    "satisfied": satisfied,
    "max_steps": config.max_steps,
    "driver": sj.refinement.resolve_driver(
      config.driver, config.conv_backend, config.compute_dtype, config.cache_trunk
    ),
    "cache_trunk": config.cache_trunk,
    "batch_scheme": refine_scheme(config) if batch > 1 else None,
    "compute_dtype": config.compute_dtype,
    "remat": config.remat,
    "conv_backend": sj.kernels.resolve_conv_backend(config.conv_backend),
  }
  return _record(variant, case, batch, taken, timing, settings, extra)


def refine_scheme(config) -> str:
  from scribblejax.refinement import resolve_batch_scheme

  return resolve_batch_scheme(config.batch_scheme)


def torch_device() -> str:
  import jax
  import torch

  if jax.default_backend() == "gpu" and torch.cuda.is_available():
    return "cuda"
  return "cpu"


def peer_options(variant: str):
  """The :class:`~benchmarks.torch_reference.PeerOptions` of a ``TORCH_PEERS`` variant (any suffixes)."""
  from benchmarks import torch_reference as ref

  base = variant.removesuffix("_early_stop")
  bf16 = base.endswith("_bf16")
  return ref.PeerOptions(autocast_bf16=bf16, **TORCH_PEERS[base.removesuffix("_bf16")])


def peer_unavailable(options, device: str) -> str | None:
  """Why a peer with ``options`` cannot run on ``device`` (``None``: it can)."""
  from benchmarks import torch_reference as ref

  if options.cuda_graphs and device != "cuda":
    return "CUDA graphs need a CUDA device"
  if options.compile:
    reason = ref.compile_unavailable(device)
    if reason:
      return f"torch.compile failed on a tiny function: {reason}"
  return None


def bench_torch(variant: str, case: Case, batch: int, settings: Settings, model, split) -> dict:
  """One PyTorch measurement, timed alone, images one at a time (its record; a failure's holds ``error``,
  a variant that cannot run here ``unavailable``)."""
  return measure([variant], case, batch, settings, model, split, order="sequential")[0]


def prepare_torch(variant: str, case: Case, batch: int, settings: Settings, model, split) -> Contestant:
  """One PyTorch measurement, ready to time: ``torch_eager*``, the researcher's loop as it was
  (:func:`~benchmarks.torch_reference.refine_torch`), or a peer (:class:`~benchmarks.torch_reference.TorchPeer`).

  Raises:
    Unavailable: the variant cannot run here.
  """
  import torch

  from benchmarks import torch_reference as ref

  device = torch_device()
  if device == "cuda":
    torch.backends.cudnn.benchmark = True
  net = ref.build_torch_unet(model).to(device)
  names = ref.tunable_names(split)
  early = variant.endswith("early_stop")
  steps = case.steps if batch == 1 or settings.batch_steps is None else settings.batch_steps
  max_steps = (settings.early_stop_steps or steps) if early else steps
  inputs = [make_inputs(case.dims, case.size, batch, seed=1000 * case.size + i) for i in range(settings.repeats + 1)]
  hyper = dict(learning_rate=settings.learning_rate, momentum=settings.momentum, prox_weight=settings.prox_weight)
  extra = {"torch_device": device, "cudnn_benchmark": device == "cuda", "torch_threads": torch.get_num_threads()}
  if variant.startswith("torch_eager"):

    def one(im, mk):
      return ref.refine_torch(net, names, im, mk, max_steps=max_steps, early_stop=early, device=device, **hyper)
  else:
    options = peer_options(variant)
    reason = peer_unavailable(options, device)
    if reason:
      raise Unavailable(reason)
    peer = ref.TorchPeer(net, names, options, device=device, **hyper)
    extra.update(peer_options=dataclasses.asdict(options), autocast_bf16=options.autocast_bf16)

    def one(im, mk):
      return peer.refine(im, mk, max_steps=max_steps, early_stop=early)

  def call(i):
    out = [one(im, mk) for im, mk in zip(*inputs[i])]
    if device == "cuda":
      torch.cuda.synchronize()
    return out

  def finish(timing: Timing, retraced: bool) -> dict:
    del retraced  # nothing of scribblejax's runs here
    taken = max(r[1] for r in timing.last)
    return _record(variant, case, batch, taken, timing, settings, {**extra, "max_steps": max_steps})

  return Contestant(variant, call, finish)


def check_torch_matches(case: Case, settings: Settings) -> dict:
  """Runs both implementations for ``check_steps`` fixed steps at a small size; records the logit error."""
  import scribblejax as sj
  from benchmarks import torch_reference as ref

  size = settings.check_size_2d if case.dims == 2 else settings.check_size_3d
  model = make_model(case.dims, settings)
  split = sj.split_params(model, sj.last_layers(settings.layers))
  images, marks = make_inputs(case.dims, size, 1, seed=7)
  start = time.perf_counter()
  err = ref.check_same(
    split,
    model,
    images[0],
    marks[0],
    steps=settings.check_steps,
    device=torch_device(),
    learning_rate=settings.learning_rate,
    momentum=settings.momentum,
    prox_weight=settings.prox_weight,
  )
  timing = Timing(time.perf_counter() - start, time.perf_counter() - start, (), None)
  small = case._replace(size=size, steps=settings.check_steps)
  return _record("check_torch_vs_scribblejax", small, 1, settings.check_steps, timing, settings, check_outcome(err))


def check_outcome(err: float, tolerance: float = CHECK_TOLERANCE) -> dict:
  """The fields of a consistency-check record: ``passed`` is ``err <= tolerance`` (NaN fails).

  A failed check also gets an ``error`` field, so the table shows it and the run exits 1.
  """
  passed = bool(err <= tolerance)
  out = {"max_abs_logit_diff": err, "logit_tolerance": tolerance, "passed": passed}
  if not passed:
    out["error"] = f"torch and scribblejax logits differ by {err:.3g} > {tolerance:g}"
  return out


def peer_checks(variants: Sequence[str]) -> list[str]:
  """The peer variants whose logits :func:`check_peer_matches` compares: one per set of options (an
  ``_early_stop`` form runs the same steps as its fixed-step form)."""
  out = []
  for v in variants:
    base = v.removesuffix("_early_stop")
    if v in PEER_VARIANTS and base not in out:
      out.append(base)
  return out


def check_peer_matches(variant: str, case: Case, settings: Settings) -> dict:
  """Runs scribblejax and one PyTorch peer for ``check_steps`` fixed steps at a small size; records the
  logit error (``passed``: within the tolerance, ``BF16_TOLERANCE`` for the bf16 forms, against
  ``compute_dtype="bfloat16"``), or why the peer cannot run here (``unavailable``)."""
  import scribblejax as sj
  from benchmarks import torch_reference as ref

  size = settings.check_size_2d if case.dims == 2 else settings.check_size_3d
  small = case._replace(size=size, steps=settings.check_steps)
  name = f"check_{variant}_vs_scribblejax"
  options = peer_options(variant)
  reason = peer_unavailable(options, torch_device())
  if reason:
    return {
      "device": device_name(),
      "variant": name,
      "dims": case.dims,
      "size": size,
      "batch": 1,
      "unavailable": reason,
      "versions": versions(),
      "settings": {**dataclasses.asdict(settings), **host_info()},
    }
  model = make_model(case.dims, settings)
  split = sj.split_params(model, sj.last_layers(settings.layers))
  images, marks = make_inputs(case.dims, size, 1, seed=7)
  tolerance = ref.BF16_TOLERANCE if options.autocast_bf16 else {"rtol": 1e-3, "atol": 1e-3}
  start = time.perf_counter()
  try:
    err, passed = (
      ref.check_peer(
        split,
        model,
        images[0],
        marks[0],
        options,
        steps=settings.check_steps,
        device=torch_device(),
        learning_rate=settings.learning_rate,
        momentum=settings.momentum,
        prox_weight=settings.prox_weight,
        **tolerance,
      ),
      True,
    )
  except AssertionError as failure:
    err, passed = str(failure), False
  elapsed = time.perf_counter() - start
  return _record(
    name,
    small,
    1,
    settings.check_steps,
    Timing(elapsed, elapsed, (), None),
    settings,
    {"max_abs_logit_diff": err, "passed": passed, "tolerance": tolerance, "peer_options": dataclasses.asdict(options)},
  )


def _contest_key(record: dict) -> tuple | None:
  """What a record competes in: ``(dims, size, batch, precision, early stop)``; ``None`` for checks,
  failures and the variants that are not one interaction from W (``scribblejax_trunk_reused*``)."""
  variant = record["variant"]
  if "ms_per_interaction" not in record or variant.startswith(("check_", "scribblejax_trunk_reused")):
    return None
  bf16 = record.get("compute_dtype") == "bfloat16" or bool(record.get("autocast_bf16"))
  return (
    record["dims"],
    record["size"],
    record["batch"],
    "bfloat16" if bf16 else "float32",
    variant.endswith("early_stop"),
  )


def add_ratios(records: Sequence[dict]) -> None:
  """Sets, on every timed record, the strongest (fastest) PyTorch variant of the same run, case, batch,
  precision and stopping rule: ``strongest_torch`` (its name), ``strongest_torch_ms_per_interaction``,
  ``strongest_torch_steps`` and ``speedup_vs_strongest_torch`` (its time over this record's; below 1 for
  the slower PyTorch variants). In place."""
  best = {}
  for r in records:
    key = _contest_key(r)
    if (
      key
      and r["variant"].startswith("torch")
      and (key not in best or r["ms_per_interaction"] < best[key]["ms_per_interaction"])
    ):
      best[key] = r
  for r in records:
    strongest = best.get(_contest_key(r))
    if strongest is not None:
      r.update(
        strongest_torch=strongest["variant"],
        strongest_torch_ms_per_interaction=strongest["ms_per_interaction"],
        strongest_torch_steps=strongest["steps"],
        speedup_vs_strongest_torch=round(strongest["ms_per_interaction"] / r["ms_per_interaction"], 3),
      )


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def markdown_table(records: Sequence[dict]) -> str:
  """A markdown table with one row per record (``spread``: the fastest and slowest timed call, ms per
  interaction; ``vs strongest torch``: the strongest PyTorch variant's time over this one's)."""
  head = (
    "| device | variant | case | batch | steps | ms / interaction | ms / step | images / s | compile s | peak MiB "
    "| spread | vs strongest torch |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
  )
  rows = []
  for r in records:
    case = f"{r['dims']}D {r['size']}^{r['dims']}"
    if "error" in r:
      rows.append(
        f"| {r['device']} | {r['variant']} | {case} | {r['batch']} | | failed: {r['error'][:80]} | | | | | | |"
      )
      continue
    if "unavailable" in r:
      rows.append(
        f"| {r['device']} | {r['variant']} | {case} | {r['batch']} | | unavailable: {r['unavailable'][:80]} "
        "| | | | | | |"
      )
      continue
    if r["variant"].startswith("check_"):
      diff = r["max_abs_logit_diff"]
      diff = f"{diff:.2e}" if isinstance(diff, float) else "see record"
      rows.append(
        f"| {r['device']} | {r['variant']} | {case} | 1 | {r['steps']} | max logit diff "
        f"{diff}{'' if r.get('passed', True) else ' FAILED'} | | | | | | |"
      )
      continue
    peak = f"{r['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in r else ""
    spread = "{:.1f}-{:.1f}".format(*r["spread_ms_per_interaction"]) if r.get("spread_ms_per_interaction") else ""
    ratio = (
      f"{r['speedup_vs_strongest_torch']:.2f}x vs {r['strongest_torch']}" if "speedup_vs_strongest_torch" in r else ""
    )
    rows.append(
      f"| {r['device']} | {r['variant']} | {case} | {r['batch']} | {r['steps']} | "
      f"{r['ms_per_interaction']:.1f} | {r['ms_per_step']:.2f} | {r['images_per_s']:.3f} | "
      f"{r['compile_s']:.1f} | {peak} | {spread} | {ratio} |"
    )
  return head + "\n".join(rows) + "\n"


def write_results(records: Sequence[dict], out: Path) -> tuple[Path, Path]:
  """Writes ``out`` (JSON list of records) and ``out`` with suffix ``.md`` (the table), atomically."""
  from scribblejax.io import fileio  # lazy, like every scribblejax import here

  out = Path(out)
  md = out.with_suffix(".md")
  fileio.write_text(out, json.dumps(list(records), indent=1) + "\n")
  fileio.write_text(md, f"# Speed benchmark ({datetime.date.today().isoformat()})\n\n" + markdown_table(records))
  return out, md


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
  parser = parser or argparse.ArgumentParser(
    prog="python -m benchmarks.speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--quick", action="store_true", help="CI-sized smoke run: tiny sizes, 2 steps, 1 repeat")
  parser.add_argument(
    "--cases",
    default=None,
    help=f"comma-separated cases from {sorted(CASES)} (default: all; --quick: {sorted(QUICK_CASES)})",
  )
  parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32; --quick 1,2)")
  parser.add_argument(
    "--variants", default=None, help=f"comma-separated from {VARIANTS} (default: {','.join(DEFAULT_VARIANTS)})"
  )
  parser.add_argument("--repeats", type=int, default=None, help="timed calls after the warm-up (default 3; --quick 1)")
  parser.add_argument("--steps", type=int, default=None, help="override every case's fixed step count")
  parser.add_argument("--batch-steps", type=int, default=None, help="fixed steps for batches > 1 (default: the case's)")
  parser.add_argument("--channels", default=None, help="U-Net channels (default 32,64,128,256; --quick 4,8)")
  parser.add_argument("--no-check", action="store_true", help="skip the torch-vs-scribblejax logit check")
  parser.add_argument(
    "--memory",
    action="store_true",
    help="add XLA's compiled-memory analysis (scribblejax.refinement.memory_analysis) to batch-1 records",
  )
  parser.add_argument(
    "--out",
    default=None,
    help="JSON output path (default benchmarks/results/speed_<device>.json; --quick: speed_<device>_quick.json)",
  )
  parser.add_argument(
    "--order",
    choices=("interleaved", "sequential"),
    default="interleaved",
    help="interleaved (default): the variants of a case and batch take turns, call by call, the "
    "order rotated each round; sequential: each variant's calls one after another",
  )
  parser.add_argument("--notes", default="", help="free text stored in every record (say, what else ran)")
  return parser


def _validate(args) -> tuple[list[Case], list[int], list[str], Settings]:
  table = QUICK_CASES if args.quick and args.cases is None else {**CASES, **QUICK_CASES}
  names = _csv(args.cases) if args.cases else list(table)
  unknown = [n for n in names if n not in table]
  if unknown:
    raise ValueError(f"unknown case(s) {unknown}; choose from {sorted({**CASES, **QUICK_CASES})}")
  cases = [table[n] for n in names]
  if args.steps is not None:
    if args.steps < 1:
      raise ValueError(f"--steps must be >= 1, got {args.steps}")
    cases = [c._replace(steps=args.steps) for c in cases]
  try:
    batches = [int(b) for b in _csv(args.batches or ("1,2" if args.quick else "1,8,32"))]
  except ValueError as err:
    raise ValueError(f"--batches must be comma-separated integers, got {args.batches!r}") from err
  if not batches or min(batches) < 1:
    raise ValueError(f"--batches must be positive integers, got {args.batches!r}")
  variants = _csv(args.variants) if args.variants else list(DEFAULT_VARIANTS)
  bad = [v for v in variants if v not in VARIANTS]
  if bad:
    raise ValueError(f"unknown variant(s) {bad}; choose from {VARIANTS}")
  repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
  if repeats < 1:
    raise ValueError(f"--repeats must be >= 1, got {repeats}")
  try:
    channels = (
      tuple(int(c) for c in _csv(args.channels)) if args.channels else ((4, 8) if args.quick else (32, 64, 128, 256))
    )
  except ValueError:
    raise ValueError(f"--channels must be comma-separated integers, got {args.channels!r}") from None
  if len(channels) < 2 or min(channels) < 1:
    raise ValueError(f"--channels must be at least two positive integers (U-Net levels), got {args.channels!r}")
  if args.batch_steps is not None and args.batch_steps < 1:
    raise ValueError(f"--batch-steps must be >= 1, got {args.batch_steps}")
  layers = 3 if len(channels) == 2 else 5
  settings = Settings(
    channels=channels,
    layers=layers,
    repeats=repeats,
    batch_steps=args.batch_steps,
    early_stop_steps=5 if args.quick else None,
    check_size_2d=16 if args.quick else 64,
    check_size_3d=8 if args.quick else 16,
    check_steps=2 if args.quick else 3,
    memory=bool(getattr(args, "memory", False)),
  )
  return cases, batches, variants, settings


def _skip(variant: str, batch: int, has_torch: bool) -> bool:
  """Whether ``variant`` sits out at ``batch``: a batch runs scribblejax's batched variants and the
  fixed-step float32 PyTorch variants (one image at a time); batch 1 runs every variant but the batch
  schemes (with one image they are plain ``refine``)."""
  if variant.startswith("torch"):
    return not has_torch or (batch > 1 and (variant.endswith("early_stop") or "_bf16" in variant))
  if batch > 1:
    return variant not in BATCHED_VARIANTS
  return variant in BATCHED_VARIANTS[1:]


def _failure(variant: str, case: Case, batch: int, settings: Settings, err: Exception) -> dict:
  """The record of a variant that could not be measured: ``unavailable`` (cannot run here) or ``error``."""
  field = "unavailable" if isinstance(err, Unavailable) else "error"
  text = str(err) if isinstance(err, Unavailable) else f"{type(err).__name__}: {str(err)[:500]}"
  return {
    "device": device_name(),
    "variant": variant,
    "dims": case.dims,
    "size": case.size,
    "batch": batch,
    field: text,
    "versions": versions(),
    "settings": {**dataclasses.asdict(settings), **host_info()},
  }


def _prepare(variant, case, batch, settings, model, split) -> Contestant:
  if variant.startswith("torch"):
    return prepare_torch(variant, case, batch, settings, model, split)
  return prepare_jax(variant, case, batch, settings, split)


def measure(
  variants: Sequence[str], case: Case, batch: int, settings: Settings, model, split, order: str = "interleaved"
) -> list[dict]:
  """Measures ``variants`` on one case and batch; one record each, in the order given.

  ``order="interleaved"``: every variant's warm-up call, then ``settings.repeats`` rounds of one call
  each (:func:`time_interleaved`); ``retraced`` then says whether any of scribblejax's compiled
  functions was traced again after all the warm-ups. ``"sequential"``: each variant timed alone.
  """
  records: list[dict | None] = [None] * len(variants)
  ready = []
  for k, variant in enumerate(variants):
    try:
      ready.append((k, _prepare(variant, case, batch, settings, model, split)))
    except Exception as err:  # noqa: BLE001 (one failed measurement must not lose the others)
      records[k] = _failure(variant, case, batch, settings, err)
  cut = []

  def timed(calls):
    sizes = {}
    try:
      timings = time_interleaved(
        calls, settings.repeats, after_warmup=lambda: sizes.update(before=_compiled_cache_sizes())
      )
    except Interrupted as stop:
      timings = stop.partial
      cut.append(True)
    return [(t, "before" in sizes and _compiled_cache_sizes() != sizes["before"]) for t in timings]

  if order == "sequential":
    results = []
    for _, c in ready:
      results += timed([c.call]) if not cut else [(RuntimeError("interrupted before it ran"), False)]
  else:
    results = timed([c.call for _, c in ready])
  for (k, contestant), (timing, retraced) in zip(ready, results):
    try:
      if isinstance(timing, Exception):
        raise timing
      records[k] = contestant.finish(timing, retraced)
      records[k]["order"] = order
    except Exception as err:  # noqa: BLE001
      records[k] = _failure(contestant.variant, case, batch, settings, err)
    records[k]["interrupted"] = bool(cut)
  if cut:
    raise Interrupted(records)
  return records


def _log_record(rec: dict, case: Case, log: Callable[[str], None]) -> None:
  head = f"{case.name} {rec['variant']} batch={rec['batch']}"
  if "error" in rec:
    log(f"{head}: FAILED {rec['error'][:200]}")
  elif "unavailable" in rec:
    log(f"{head}: unavailable ({rec['unavailable'][:200]})")
  elif rec["variant"].startswith("check_"):
    log(f"{head}: max logit diff {rec['max_abs_logit_diff']}, passed={rec['passed']}")
  else:
    log(
      f"{head}: {rec['ms_per_interaction']:.1f} ms/interaction, {rec['ms_per_step']:.2f} ms/step, "
      f"{rec['images_per_s']:.3f} images/s, compile {rec['compile_s']:.1f} s, {rec['steps']} steps"
      + (f", retraced={rec['retraced']}" if "retraced" in rec else "")
      + (
        f", {rec['speedup_vs_strongest_torch']:.2f}x vs {rec['strongest_torch']}"
        if "speedup_vs_strongest_torch" in rec
        else ""
      )
    )


def run_metadata(args: argparse.Namespace) -> dict:
  """What every record of a run states about the run: UTC date and time, the command, the notes."""
  command = getattr(args, "command", None) or shlex.join([Path(sys.executable).name, *sys.argv])
  return {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": command,
    "notes": getattr(args, "notes", "") or "",
  }


def run(
  args: argparse.Namespace, log: Callable[[str], None] = print, on_record: Callable[[list], None] | None = None
) -> list[dict]:
  """Runs the measurements that ``args`` selects; returns the records.

  Per case: the logit checks (once per dimensionality, small size: the researcher's reference and each
  selected PyTorch peer against scribblejax), then per batch the selected variants, timed together
  (``--order``), each timed record carrying its ratio to the strongest PyTorch variant of the same
  case, batch, precision and stopping rule (:func:`add_ratios`). A measurement that fails (say, out
  of device memory) gives a record with an ``error`` field, one that cannot run here (CUDA graphs on a
  CPU) one with ``unavailable``, and the run goes on. ``on_record(records)`` is called after each
  batch of records (to save partial results).
  """
  import scribblejax as sj

  cases, batches, variants, settings = _validate(args)
  has_torch = importlib.util.find_spec("torch") is not None
  if not has_torch:
    log("torch is not installed: skipping the PyTorch reference")
  meta = run_metadata(args)
  records = []

  def add(new: Sequence[dict], case: Case) -> None:
    for rec in new:
      rec.update(meta)
      _log_record(rec, case, log)
    records.extend(new)
    add_ratios(records)
    if on_record:
      on_record(records)

  checked = set()
  for case in cases:
    model = make_model(case.dims, settings)
    split = sj.split_params(model, sj.last_layers(settings.layers))
    if has_torch and not args.no_check and case.dims not in checked:  # once per dimensionality (small size)
      checked.add(case.dims)
      add([check_torch_matches(case, settings)], case)
      add([check_peer_matches(v, case, settings) for v in peer_checks(variants)], case)
    for batch in batches:
      chosen = [v for v in variants if not _skip(v, batch, has_torch)]
      if chosen:
        try:
          add(measure(chosen, case, batch, settings, model, split, getattr(args, "order", "interleaved")), case)
        except Interrupted as stop:  # keep what the series measured (a time limit's SIGINT)
          add(stop.partial, case)
          raise KeyboardInterrupt from None
  return records


def execute(args: argparse.Namespace) -> int:
  """Runs the benchmark and writes its results (``python -m benchmarks.speed``).

  Raises:
    ValueError: bad arguments.
  """
  _validate(args)  # bad arguments fail before any work
  # a --quick smoke run never replaces the full results committed under benchmarks/results/
  name = f"speed_{device_name().replace(' ', '_').lower()}{'_quick' if args.quick else ''}.json"
  out = Path(args.out) if args.out else RESULTS_DIR / name
  records = run(args, on_record=lambda recs: write_results(recs, out))
  json_path, md_path = write_results(records, out)
  print(f"wrote {json_path} and {md_path}")
  failed = [r for r in records if "error" in r]
  if failed:
    print(
      f"{len(failed)} of {len(records)} measurements failed (their records hold the error), e.g. "
      f"{failed[0]['error'][:200]}",
      file=sys.stderr,
    )
    return 1
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  args.command = "python -m benchmarks.speed " + shlex.join(sys.argv[1:] if argv is None else argv)
  try:
    return execute(args)
  except ValueError as err:  # bad input: 1, like the scribblejax command (2: argparse's usage errors)
    print(f"benchmarks.speed: error: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
