"""Where a refinement step's time goes on a GPU: timings of one configuration, and a kernel profile.

One process measures one configuration (its XLA flags and ``SCRIBBLEJAX_*`` switches come from the
environment); ``benchmarks/gpu_probe.sh`` runs several, one process each. For each case it times one
interaction with a fixed number of steps (median of ``--repeats`` calls after a warm-up call), and
with ``--trace`` it profiles two more calls with ``jax.profiler`` and sums the GPU's kernels by name
(how many per step, how long in all, and the share of the interaction's wall time the GPU was busy).
``--batch N`` adds batches of N images (``--batch-case``, ``--batch-steps`` steps) for each ``--schemes``,
and one image at those steps.

Appends one JSON line per measurement to ``OUT/probe.jsonl``. ``--summarise FILE`` reads such a
file instead and prints, for each profiled record, its kernels' time per step by class
(:func:`kernel_classes`): what a step would still cost if everything but the matrix products were free.

Usage::

    python -m benchmarks.gpu_probe --out /tmp/probe --label base --cases 2d256,3d96 --trace
    python -m benchmarks.gpu_probe --summarise benchmarks/results/gpu_h100_2026-11-27/probe.jsonl
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import tempfile
from pathlib import Path

from benchmarks import speed


def _kernel_profile(trace_dir: Path, calls: int, steps: int) -> dict:
  """Sums the device events of a ``jax.profiler`` perfetto trace by name."""
  files = sorted(trace_dir.rglob("*.trace.json.gz")) or sorted(trace_dir.rglob("*.json.gz"))
  if not files:
    return {"error": f"no trace file under {trace_dir}"}
  with gzip.open(files[-1], "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  names = {
    e["pid"]: e.get("args", {}).get("name", "")
    for e in events
    if e.get("ph") == "M" and e.get("name") == "process_name"
  }
  wanted = os.environ.get("PROBE_DEVICE_PROCESS", "GPU")
  device = {pid for pid, name in names.items() if wanted in name}
  spans = [e for e in events if e.get("ph") == "X" and e.get("pid") in device and "dur" in e]
  if not spans:
    return {"error": "no device events", "processes": sorted(set(names.values()))[:20]}
  by_name = collections.defaultdict(lambda: [0, 0.0])
  for e in spans:
    entry = by_name[e["name"][:100]]
    entry[0] += 1
    entry[1] += e["dur"]
  busy = sum(e["dur"] for e in spans)
  first = min(e["ts"] for e in spans)
  last = max(e["ts"] + e["dur"] for e in spans)
  top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:30]
  per = calls * steps
  return {
    "events_per_step": round(len(spans) / per, 1),
    "busy_ms_per_step": round(busy / 1000 / per, 4),
    "span_ms": round((last - first) / 1000, 3),
    "busy_ms": round(busy / 1000, 3),
    "device_processes": sorted(names[p] for p in device),
    "top": [{"name": n, "count_per_step": round(c / per, 2), "us_per_step": round(d / per, 2)} for n, (c, d) in top],
  }


# Kernel classes by name, first match wins. cuDNN's convolution kernels name their pass; cuBLAS,
# CUTLASS and XLA's Triton GEMMs ("gemm_fusion") are the matrix products XLA does not hand to cuDNN.
_KERNEL_CLASSES = (
  ("conv_weight_grad", ("wgrad",)),
  ("conv_input_grad", ("dgrad",)),
  ("conv_forward", ("fprop",)),
  ("gemm", ("cutlass", "gemm_fusion", "cublas", "gemm")),
  ("cudnn_layout", ("convertTensor", "nchwToNhwc", "nhwcToNchw")),
  ("cudnn_other", ("cudnn",)),
)
MATMUL_CLASSES = ("conv_weight_grad", "conv_input_grad", "conv_forward", "gemm", "cudnn_other")


def kernel_classes(profile: dict) -> dict[str, float]:
  """Sums a kernel profile's microseconds per step by class (``other``: XLA's own fusions, copies).

  Only the profile's ``top`` kernels are counted, so every sum is a lower bound. ``cudnn_layout``
  (cuDNN's layout conversions) is kept apart because channels-last convolutions remove it.
  """
  sums = {name: 0.0 for name, _ in _KERNEL_CLASSES} | {"other": 0.0}
  for kernel in profile.get("top", []):
    cls = next((name for name, keys in _KERNEL_CLASSES if any(k in kernel["name"] for k in keys)), "other")
    sums[cls] += kernel["us_per_step"]
  return {k: round(v, 2) for k, v in sums.items()}


def summarise(path: Path) -> list[dict]:
  """One row per profiled record of a ``probe.jsonl``: its kernel classes and the matmul floor.

  ``matmul_floor_ms`` is what the record's interaction would take if every kernel but the matrix
  products (convolutions, GEMMs) cost nothing: steps x their microseconds per step.
  """
  rows = []
  for line in Path(path).read_text().splitlines():
    rec = json.loads(line)
    prof = rec.get("profile") or {}
    if "top" not in prof:
      continue
    classes = kernel_classes(prof)
    per_step = sum(classes[c] for c in MATMUL_CLASSES)
    rows.append(
      {k: rec.get(k) for k in ("label", "case", "batch", "scheme", "dtype", "steps", "median_ms")}
      | {
        "busy_us_per_step": round(1000 * prof["busy_ms_per_step"], 1),
        "classes_us_per_step": classes,
        "matmul_floor_ms": round(per_step * rec["steps"] * rec["batch"] / 1000, 1),
      }
    )
  return rows


def measure(
  case: speed.Case, steps: int, batch: int, scheme: str | None, dtype: str, repeats: int, trace: bool
) -> dict:
  import jax

  import scribblejax as sj

  settings = speed.Settings()
  model = speed.make_model(case.dims, settings)
  split = sj.split_params(model, sj.last_layers(settings.layers))
  config = sj.RefineConfig.paper(
    max_steps=steps,
    early_stop=False,
    learning_rate=settings.learning_rate,
    momentum=settings.momentum,
    prox_weight=settings.prox_weight,
    compute_dtype=dtype,
    batch_scheme=scheme or "auto",
  )
  inputs = [speed.make_inputs(case.dims, case.size, batch, seed=1000 * case.size + i) for i in range(repeats + 3)]
  inputs = [(jax.device_put(a), jax.device_put(b)) for a, b in inputs]

  def call(i):
    im, mk = inputs[i]
    if batch == 1:
      return jax.block_until_ready(sj.refine(split, im[0], mk[0], config))
    return jax.block_until_ready(sj.refine_batch(split, im, mk, config))

  timing = speed.time_calls(call, repeats)
  rec = {
    "case": case.name,
    "steps": steps,
    "batch": batch,
    "scheme": scheme,
    "dtype": dtype,
    "first_s": round(timing.first_s, 3),
    "median_ms": round(1000 * timing.median_s, 3),
    "times_ms": [round(1000 * t, 2) for t in timing.times_s],
  }
  rec["ms_per_step"] = round(rec["median_ms"] / steps, 4)
  rec["images_per_s"] = round(batch / (rec["median_ms"] / 1000), 2)
  if trace:
    with tempfile.TemporaryDirectory() as d:
      try:
        with jax.profiler.trace(d, create_perfetto_trace=True):
          call(repeats + 1)
          call(repeats + 2)
        rec["profile"] = _kernel_profile(Path(d), 2, steps * batch)
      except Exception as err:  # noqa: BLE001 (a profiler that fails leaves the timings)
        rec["profile"] = {"error": f"{type(err).__name__}: {err}"[:300]}
  return rec


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out")
  parser.add_argument("--label")
  parser.add_argument("--summarise", metavar="PROBE_JSONL", help="summarise a probe.jsonl and exit")
  parser.add_argument("--cases", default="2d256,3d96")
  parser.add_argument("--dtypes", default="float32")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--trace", action="store_true")
  parser.add_argument("--batch", type=int, default=0)
  parser.add_argument("--batch-steps", type=int, default=20)
  parser.add_argument("--batch-case", default="2d256")
  parser.add_argument("--schemes", default="matmul,shifted")
  args = parser.parse_args(argv)
  if args.summarise:
    for row in summarise(Path(args.summarise)):
      print(json.dumps(row))
    return
  if not (args.out and args.label):
    parser.error("--out and --label are required unless --summarise is given")
  import jax

  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  env = {k: v for k, v in os.environ.items() if k.startswith(("SCRIBBLEJAX_", "XLA_FLAGS"))}
  cases = {**speed.CASES, **speed.QUICK_CASES}
  jobs = [
    (cases[c], cases[c].steps, 1, None, d, args.trace)
    for c in args.cases.split(",")
    if c
    for d in args.dtypes.split(",")
  ]
  if args.batch:
    case = cases[args.batch_case]
    jobs.append((case, args.batch_steps, 1, None, "float32", False))
    jobs += [(case, args.batch_steps, args.batch, s, "float32", args.trace) for s in args.schemes.split(",") if s]
  for case, steps, batch, scheme, dtype, trace in jobs:
    try:
      rec = measure(case, steps, batch, scheme, dtype, args.repeats, trace)
    except Exception as err:  # noqa: BLE001 (one failed measurement must not end the probe)
      rec = {
        "case": case.name,
        "batch": batch,
        "scheme": scheme,
        "dtype": dtype,
        "error": f"{type(err).__name__}: {err}"[:500],
      }
    rec.update(label=args.label, env=env, device=jax.devices()[0].device_kind, jax=jax.__version__)
    with open(out / "probe.jsonl", "a") as f:
      f.write(json.dumps(rec) + "\n")
    brief = {
      k: rec.get(k)
      for k in (
        "label",
        "case",
        "batch",
        "scheme",
        "dtype",
        "median_ms",
        "ms_per_step",
        "images_per_s",
        "first_s",
        "error",
      )
    }
    prof = rec.get("profile", {})
    brief.update({k: prof.get(k) for k in ("events_per_step", "busy_ms_per_step") if k in prof})
    print(json.dumps(brief), flush=True)


if __name__ == "__main__":
  main()
