"""Speed of scribble-conditioned refinement, side by side with a PyTorch eager reference.

Times, on whatever device JAX finds (and torch, when installed, on the matching device):

* one interaction with a fixed number of steps (early stop off) and with early stop;
* milliseconds per step, with the compile time reported apart (first call minus the median call);
* images per second for batches of 1, 8 and 32 (``refine_batch``; torch refines one image at a time);
* 2D 256^2 and 512^2, 3D 64^3, 96^3 and 128^3, on a U-Net with channels (32, 64, 128, 256),
  instance norm, the last 5 layers tunable (the setting of the issue's table).

Every interaction of a timed series gets new marks of the same shape, and the benchmark records
whether any of scribblejax's compiled functions was traced again after the warm-up call
(``retraced``: it never should be). Times are medians of ``--repeats`` calls after one warm-up call.

Usage::

    python -m benchmarks.speed                      # the full suite on the default device
    python -m benchmarks.speed --quick              # CI-sized smoke run (tiny sizes, 2 steps)
    python -m benchmarks.speed --cases 2d256 --batches 1 --variants scribblejax,torch_eager
    scribblejax bench --quick                       # the same, as a subcommand

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
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CHECK_TOLERANCE = 1e-3    # largest |logit difference| at which check_torch_vs_scribblejax passes


class Case(NamedTuple):
  """One problem size."""
  name: str
  dims: int
  size: int
  steps: int            # fixed steps per interaction (early stop off)


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
VARIANTS = ("scribblejax", "scribblejax_early_stop", "scribblejax_full_forward", "scribblejax_loop_driver",
            "scribblejax_host_driver", "scribblejax_vmap", "scribblejax_matmul", "scribblejax_shifted",
            "scribblejax_sequential", "scribblejax_sharded", "scribblejax_bf16", "scribblejax_remat", "scribblejax_xla",
            "scribblejax_trunk_reused", "scribblejax_trunk_reused_early_stop", "torch_eager", "torch_eager_early_stop")
DEFAULT_VARIANTS = ("scribblejax", "scribblejax_early_stop", "scribblejax_full_forward", "torch_eager",
                    "torch_eager_early_stop")
# variants that take a batch; the others run at batch 1 only
BATCHED_VARIANTS = ("scribblejax", "scribblejax_vmap", "scribblejax_matmul", "scribblejax_shifted",
                    "scribblejax_sequential", "scribblejax_sharded")


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
  batch_steps: int | None = None    # fixed steps for batch > 1 (None: the case's steps)
  check_size_2d: int = 64           # size of the torch-vs-scribblejax consistency check
  check_size_3d: int = 16
  check_steps: int = 3
  memory: bool = False              # add XLA's compiled-memory analysis to batch-1 scribblejax records


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def random_unet(dims: int, channels: Sequence[int], classes: int = 2, seed: int = 0):
  """A :class:`scribblejax.UNet` with random weights drawn by numpy (fixed seed).

  Kernels are normal with variance ``1 / fan_in``, norm scales 1 and biases 0: the weights every
  recorded benchmark used, the same for the PyTorch reference (built from them).
  """
  import jax.numpy as jnp
  from flax import nnx
  import scribblejax as sj
  abstract = nnx.eval_shape(lambda: sj.UNet(spatial_dims=dims, in_channels=1, num_classes=classes,
                                            channels=tuple(channels), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(state):
    shape = tuple(var.shape)
    if path[-1] == "scale":
      value = np.ones(shape, np.float32)
    elif path[-1] == "bias":
      value = np.zeros(shape, np.float32)
    else:
      value = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
    flat.append((path, var.replace(jnp.asarray(value))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def make_model(dims: int, settings: Settings, seed: int = 0):
  """The benchmark U-Net (random weights, fixed seed)."""
  return random_unet(dims, settings.channels, settings.classes, seed)


def _ball(shape: tuple, centre: np.ndarray, radius: float) -> tuple[tuple, np.ndarray]:
  """The bounding box of a Euclidean ball (slices) and the ball's mask inside it."""
  lo = [max(int(np.floor(c - radius)), 0) for c in centre]
  hi = [min(int(np.ceil(c + radius)) + 1, n) for c, n in zip(centre, shape)]
  axes = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
  d2 = sum((ax - c) ** 2 for ax, c in zip(axes, centre))
  return tuple(slice(a, b) for a, b in zip(lo, hi)), d2 <= radius ** 2


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
  first_s: float              # the warm-up call (compilation + one run)
  median_s: float
  times_s: tuple
  last: Any                   # what the last call returned


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


def _compiled_cache_sizes() -> dict:
  """Cache sizes of scribblejax's compiled entry points (to detect retracing)."""
  sizes = {}
  for module in ("scribblejax.refine", "scribblejax.batch"):
    try:
      mod = importlib.import_module(module)
    except ImportError:
      continue
    for name in dir(mod):
      fn = getattr(mod, name)
      if name.startswith("_run") and hasattr(fn, "_cache_size"):
        sizes[f"{module}.{name}"] = fn._cache_size()
  return sizes


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
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
  except OSError:
    pass
  return {"platform": jax.default_backend(), "devices": jax.device_count(), "host_cpu": cpu,
          "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "scribblejax_env": {k: v for k, v in os.environ.items() if k.startswith("SCRIBBLEJAX_")}}


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------

def _record(variant, case, batch, steps, timing, settings, extra=None) -> dict:
  ms = 1000 * timing.median_s
  rec = {
      "device": device_name(), "variant": variant, "dims": case.dims, "size": case.size, "batch": batch,
      "steps": int(steps), "ms_per_interaction": round(ms / batch, 3) if batch > 1 else round(ms, 3),
      "ms_per_batch": round(ms, 3), "ms_per_step": round(ms / max(int(steps), 1), 3),
      "images_per_s": round(batch / timing.median_s, 4), "compile_s": round(max(timing.first_s - timing.median_s, 0.0), 3),
      "first_call_s": round(timing.first_s, 3), "times_s": [round(t, 4) for t in timing.times_s],
      "versions": versions(), "settings": {**dataclasses.asdict(settings), **host_info()},
  }
  rec.update(extra or {})
  return rec


def _jax_config(variant: str, steps: int, settings: Settings):
  import scribblejax as sj
  early = variant.endswith("early_stop")
  kwargs = dict(max_steps=(settings.early_stop_steps or steps) if early else steps, early_stop=early,
                learning_rate=settings.learning_rate, momentum=settings.momentum, prox_weight=settings.prox_weight)
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
  return sj.RefineConfig(**kwargs)


def bench_jax(variant: str, case: Case, batch: int, settings: Settings, split) -> dict:
  """One scribblejax measurement."""
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
    from scribblejax import sharding

    def call(i):
      return jax.block_until_ready(sharding.refine_sharded(split, inputs[i][0], inputs[i][1], config))
  else:
    def call(i):
      return jax.block_until_ready(sj.refine_batch(split, inputs[i][0], inputs[i][1], config))

  sizes_before = None

  def tracked(i):
    nonlocal sizes_before
    out = call(i)
    if i == 0:
      sizes_before = _compiled_cache_sizes()
    return out

  timing = time_calls(tracked, settings.repeats)
  retraced = _compiled_cache_sizes() != sizes_before
  last = timing.last
  if isinstance(last, list):
    taken = max(int(r.num_steps) for r in last)
    satisfied = all(bool(r.satisfied) for r in last)
  else:
    taken = int(np.max(np.asarray(last.num_steps)))
    satisfied = bool(np.all(np.asarray(last.satisfied)))
  extra = {"retraced": retraced, "satisfied": satisfied, "max_steps": config.max_steps,
           "driver": sj.resolve_driver(config.driver, config.conv_backend, config.compute_dtype,
                                     config.cache_trunk),
           "cache_trunk": config.cache_trunk,
           "batch_scheme": refine_scheme(config) if batch > 1 else None,
           "compute_dtype": config.compute_dtype, "remat": config.remat,
           "conv_backend": sj.resolve_conv_backend(config.conv_backend)}
  if settings.memory and batch == 1 and variant not in BATCHED_VARIANTS[1:]:
    memory = sj.memory_analysis(split, inputs[0][0][0], inputs[0][1][0], config)
    extra.update(memory=memory, peak_bytes=memory["peak_bytes"])
  return _record(variant, case, batch, taken, timing, settings, extra)


def refine_scheme(config) -> str:
  import importlib as _importlib
  return _importlib.import_module("scribblejax.refine").resolve_batch_scheme(config.batch_scheme)


def torch_device() -> str:
  import jax
  import torch
  if jax.default_backend() == "gpu" and torch.cuda.is_available():
    return "cuda"
  return "cpu"


def bench_torch(variant: str, case: Case, batch: int, settings: Settings, model, split) -> dict:
  """One measurement of the PyTorch eager reference (images one at a time)."""
  import torch
  from benchmarks import torch_reference as ref
  device = torch_device()
  if device == "cuda":
    torch.backends.cudnn.benchmark = True
  net = ref.build_torch_unet(model).to(device)
  names = ref.tunable_names(split)
  early = variant.endswith("early_stop")
  steps = case.steps if batch == 1 or settings.batch_steps is None else settings.batch_steps
  inputs = [make_inputs(case.dims, case.size, batch, seed=1000 * case.size + i) for i in range(settings.repeats + 1)]

  def call(i):
    return [ref.refine_torch(net, names, im, mk, max_steps=(settings.early_stop_steps or steps) if early else steps,
                             learning_rate=settings.learning_rate, momentum=settings.momentum,
                             prox_weight=settings.prox_weight, early_stop=early, device=device)
            for im, mk in zip(*inputs[i])]

  timing = time_calls(call, settings.repeats)
  taken = max(n for _, n in timing.last)
  extra = {"torch_device": device, "cudnn_benchmark": device == "cuda", "torch_threads": torch.get_num_threads()}
  return _record(variant, case, batch, taken, timing, settings, extra)


def check_torch_matches(case: Case, settings: Settings) -> dict:
  """Runs both implementations for ``check_steps`` fixed steps at a small size; records the logit error."""
  import scribblejax as sj
  from benchmarks import torch_reference as ref
  size = settings.check_size_2d if case.dims == 2 else settings.check_size_3d
  model = make_model(case.dims, settings)
  split = sj.split_params(model, sj.last_layers(settings.layers))
  images, marks = make_inputs(case.dims, size, 1, seed=7)
  start = time.perf_counter()
  err = ref.check_same(split, model, images[0], marks[0], steps=settings.check_steps, device=torch_device(),
                       learning_rate=settings.learning_rate, momentum=settings.momentum,
                       prox_weight=settings.prox_weight)
  timing = Timing(time.perf_counter() - start, time.perf_counter() - start, (), None)
  small = case._replace(size=size, steps=settings.check_steps)
  return _record("check_torch_vs_scribblejax", small, 1, settings.check_steps, timing, settings,
                 check_outcome(err))


def check_outcome(err: float, tolerance: float = CHECK_TOLERANCE) -> dict:
  """The fields of a consistency-check record: ``passed`` is ``err <= tolerance`` (NaN fails).

  A failed check also gets an ``error`` field, so the table shows it and the run exits 1.
  """
  passed = bool(err <= tolerance)
  out = {"max_abs_logit_diff": err, "logit_tolerance": tolerance, "passed": passed}
  if not passed:
    out["error"] = f"torch and scribblejax logits differ by {err:.3g} > {tolerance:g}"
  return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def markdown_table(records: Sequence[dict]) -> str:
  """A markdown table with one row per record."""
  head = ("| device | variant | case | batch | steps | ms / interaction | ms / step | images / s | compile s | peak MiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|\n")
  rows = []
  for r in records:
    case = f"{r['dims']}D {r['size']}^{r['dims']}"
    if "error" in r:
      rows.append(f"| {r['device']} | {r['variant']} | {case} | {r['batch']} | | failed: {r['error'][:80]} | | | | |")
      continue
    if r["variant"] == "check_torch_vs_scribblejax":
      rows.append(f"| {r['device']} | {r['variant']} | {case} | 1 | {r['steps']} | max logit diff "
                  f"{r['max_abs_logit_diff']:.2e} | | | | |")
      continue
    peak = f"{r['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in r else ""
    rows.append(f"| {r['device']} | {r['variant']} | {case} | {r['batch']} | {r['steps']} | "
                f"{r['ms_per_interaction']:.1f} | {r['ms_per_step']:.2f} | {r['images_per_s']:.3f} | "
                f"{r['compile_s']:.1f} | {peak} |")
  return head + "\n".join(rows) + "\n"


def write_results(records: Sequence[dict], out: Path) -> tuple[Path, Path]:
  """Writes ``out`` (JSON list of records) and ``out`` with suffix ``.md`` (the table), atomically."""
  from scribblejax import fileio  # lazy, like every scribblejax import here
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
  parser = parser or argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                             formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="CI-sized smoke run: tiny sizes, 2 steps, 1 repeat")
  parser.add_argument("--cases", default=None,
                      help=f"comma-separated cases from {sorted(CASES)} (default: all; --quick: {sorted(QUICK_CASES)})")
  parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32; --quick 1,2)")
  parser.add_argument("--variants", default=None,
                      help=f"comma-separated from {VARIANTS} (default: {','.join(DEFAULT_VARIANTS)})")
  parser.add_argument("--repeats", type=int, default=None, help="timed calls after the warm-up (default 3; --quick 1)")
  parser.add_argument("--steps", type=int, default=None, help="override every case's fixed step count")
  parser.add_argument("--batch-steps", type=int, default=None, help="fixed steps for batches > 1 (default: the case's)")
  parser.add_argument("--channels", default=None, help="U-Net channels (default 32,64,128,256; --quick 4,8)")
  parser.add_argument("--no-check", action="store_true", help="skip the torch-vs-scribblejax logit check")
  parser.add_argument("--memory", action="store_true",
                      help="add XLA's compiled-memory analysis (scribblejax.memory_analysis) to batch-1 records")
  parser.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/speed_<device>.json; --quick: speed_<device>_quick.json)")
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
    channels = tuple(int(c) for c in _csv(args.channels)) if args.channels else \
        ((4, 8) if args.quick else (32, 64, 128, 256))
  except ValueError:
    raise ValueError(f"--channels must be comma-separated integers, got {args.channels!r}") from None
  if len(channels) < 2 or min(channels) < 1:
    raise ValueError(f"--channels must be at least two positive integers (U-Net levels), got {args.channels!r}")
  if args.batch_steps is not None and args.batch_steps < 1:
    raise ValueError(f"--batch-steps must be >= 1, got {args.batch_steps}")
  layers = 3 if len(channels) == 2 else 5
  settings = Settings(channels=channels, layers=layers, repeats=repeats, batch_steps=args.batch_steps,
                      early_stop_steps=5 if args.quick else None, check_size_2d=16 if args.quick else 64,
                      check_size_3d=8 if args.quick else 16, check_steps=2 if args.quick else 3,
                      memory=bool(getattr(args, "memory", False)))
  return cases, batches, variants, settings


def run(args: argparse.Namespace, log: Callable[[str], None] = print,
        on_record: Callable[[list], None] | None = None) -> list[dict]:
  """Runs the measurements that ``args`` selects; returns the records.

  A measurement that fails (say, out of device memory) gives a record with an ``error`` field and the
  run goes on. ``on_record(records)`` is called after each record (to save partial results).
  """
  import scribblejax as sj
  cases, batches, variants, settings = _validate(args)
  has_torch = importlib.util.find_spec("torch") is not None
  if not has_torch:
    log("torch is not installed: skipping the PyTorch reference")
  records = []
  checked = set()
  for case in cases:
    model = make_model(case.dims, settings)
    split = sj.split_params(model, sj.last_layers(settings.layers))
    if has_torch and not args.no_check and case.dims not in checked:   # once per dimensionality (small size)
      checked.add(case.dims)
      rec = check_torch_matches(case, settings)
      log(f"{case.name}: torch and scribblejax agree after {settings.check_steps} steps "
          f"(max logit diff {rec['max_abs_logit_diff']:.2e})")
      records.append(rec)
      if on_record:
        on_record(records)
    for variant in variants:
      for batch in batches:
        if batch > 1 and variant not in BATCHED_VARIANTS and not variant.startswith("torch_eager"):
          continue
        if batch > 1 and variant == "torch_eager_early_stop":
          continue
        if batch == 1 and variant in BATCHED_VARIANTS[1:]:
          continue                       # a batch scheme with one image is plain `refine`
        if variant.startswith("torch") and not has_torch:
          continue
        try:
          if variant.startswith("torch"):
            rec = bench_torch(variant, case, batch, settings, model, split)
          else:
            rec = bench_jax(variant, case, batch, settings, split)
        except Exception as err:  # noqa: BLE001 (one failed measurement must not lose the others)
          rec = {"device": device_name(), "variant": variant, "dims": case.dims, "size": case.size, "batch": batch,
                 "error": f"{type(err).__name__}: {str(err)[:500]}", "versions": versions(),
                 "settings": {**dataclasses.asdict(settings), **host_info()}}
          log(f"{case.name} {variant} batch={batch}: FAILED {rec['error'][:200]}")
        else:
          log(f"{case.name} {variant} batch={batch}: {rec['ms_per_interaction']:.1f} ms/interaction, "
              f"{rec['ms_per_step']:.2f} ms/step, {rec['images_per_s']:.3f} images/s, compile {rec['compile_s']:.1f} s"
              + (f", retraced={rec['retraced']}" if "retraced" in rec else ""))
        records.append(rec)
        if on_record:
          on_record(records)
  return records


def execute(args: argparse.Namespace) -> int:
  """Runs the benchmark and writes its results (``python -m benchmarks.speed`` and ``scribblejax bench``).

  Raises:
    ValueError: bad arguments.
  """
  _validate(args)                                             # bad arguments fail before any work
  # a --quick smoke run never replaces the full results committed under benchmarks/results/
  name = f"speed_{device_name().replace(' ', '_').lower()}{'_quick' if args.quick else ''}.json"
  out = Path(args.out) if args.out else RESULTS_DIR / name
  records = run(args, on_record=lambda recs: write_results(recs, out))
  json_path, md_path = write_results(records, out)
  print(f"wrote {json_path} and {md_path}")
  failed = [r for r in records if "error" in r]
  if failed:
    print(f"{len(failed)} of {len(records)} measurements failed (their records hold the error), e.g. "
          f"{failed[0]['error'][:200]}", file=sys.stderr)
    return 1
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return execute(args)
  except ValueError as err:   # bad input: 1, like the scribblejax command (2: argparse's usage errors)
    print(f"benchmarks.speed: error: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
