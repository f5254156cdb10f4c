"""Seconds per interaction with the defaults, at 2-D 256^2 and 3-D 64^3, compile time apart.

A session (``scribblejax.start_session``: the frozen trunk computed once) on a shipped network is
corrected by the scribble robot user for N interactions; each interaction's seconds cover the
refinement and the round's merge, as a user waits for them. The first call on each shape compiles;
it runs on throwaway marks before the timed interactions and is reported apart. Writes
``latency.json`` and ``latency.md`` with the machine, versions, date and command.

Run:  python -m benchmarks.correction.latency --out benchmarks/results/correction_cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import scribblejax as sj
from benchmarks.correction.__main__ import environment, overridden, settings, write_record
from scribblejax.research import data, metrics
from scribblejax.research import evaluate as ev
from scribblejax.research.simulate import simulate_marks


def _nuclei_256() -> tuple:
  backbone = ev.resolve_backbone(None, "nuclei2d")
  ds = data.nuclei2d("binary")
  image = sj.normalize(ds.image, backbone.normalization)[128:384, 256:512]
  return backbone.model, image, ds.labels[128:384, 256:512], 2


def _tissue_64() -> tuple:
  backbone = ev.resolve_backbone(None, "tissue3d")
  ds = data.tissue3d()
  image = sj.normalize(ds.image, backbone.normalization)[1:65, 7:71, :63]
  image = np.pad(image, ((0, 0), (0, 0), (0, 1), (0, 0)))
  truth = np.pad(ds.labels[1:65, 7:71, :63], ((0, 0), (0, 0), (0, 1)))
  return backbone.model, image, truth, 4


CASES = {"2d_256": _nuclei_256, "3d_64": _tissue_64}


def measure(name: str, interactions: int, config: sj.RefineConfig | None = None) -> dict:
  """Times ``interactions`` rounds of the scribble robot user on one case (``config``: the defaults)."""
  model, image, truth, classes = CASES[name]()
  split = sj.split_params(model, sj.last_layers(5))
  config = config or sj.RefineConfig()
  start = time.perf_counter()
  session = sj.start_session(split, image, config)
  warm = sj.add_marks(session, simulate_marks(np.asarray(sj.current_labels(session)), truth, classes))
  np.asarray(sj.current_labels(warm))
  compile_seconds = time.perf_counter() - start
  seconds, steps, satisfied, stopped = [], [], [], None
  dice = [metrics.mean_foreground_dice(np.asarray(sj.current_labels(session)), truth, classes)]
  for _ in range(interactions):
    marked = sj.session.current_marks(session) >= 0
    new = simulate_marks(np.asarray(sj.current_labels(session)), truth, classes, marked=marked)
    new = np.where(marked, -1, new).astype(np.int32)
    if not (new >= 0).any():
      stopped = f"the robot user found no new error to mark after interaction {len(seconds)}"
      break
    t0 = time.perf_counter()
    session = sj.add_marks(session, new)
    np.asarray(sj.current_labels(session))
    seconds.append(time.perf_counter() - t0)
    steps.append(int(session.rounds[-1].result.num_steps))
    satisfied.append(bool(session.rounds[-1].result.satisfied))
    dice.append(metrics.mean_foreground_dice(np.asarray(sj.current_labels(session)), truth, classes))
  return {
    "case": name,
    "shape": list(truth.shape),
    "seconds": seconds,
    "median_seconds": float(np.median(seconds)),
    "steps": steps,
    "satisfied": satisfied,
    "dice": dice,
    "first_round_with_compilation_seconds": compile_seconds,
    "stopped": stopped,
    "kernels": str(sj.kernels.kernel_status()),
  }


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog="python -m benchmarks.correction.latency", description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results/correction_cpu"))
  parser.add_argument("--interactions", type=int, default=5)
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument(
    "--set", action="append", default=[], metavar="KEY=VALUE", help="a RefineConfig setting instead of the default"
  )
  args = parser.parse_args(argv)
  try:
    overrides = settings(args.set)
  except ValueError as err:
    parser.error(str(err))
  env = {**environment(argv, "benchmarks.correction.latency"), "overrides": overrides}
  config = sj.RefineConfig(**overrides)
  results = [measure(name, args.interactions, config) for name in args.cases.split(",")]
  payload = {"environment": env, "results": results}
  lines = [
    f"# Seconds per interaction ({'other settings' if overrides else 'defaults'}, scribble robot user)",
    "",
    *overridden(env),
    f"Command: `{env['command']}`; {env['device']} ({env['cpu_count']} cores), {env['date']}; {results[0]['kernels']}.",
    "",
    "| case | shape | median s per interaction | each | steps | satisfied | first round, with compiling (s) "
    "| Dice@0..N |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    lines.append(
      f"| {r['case']} | {'x'.join(map(str, r['shape']))} | {r['median_seconds']:.2f} | "
      f"{', '.join(f'{s:.2f}' for s in r['seconds'])} | {r['steps']} | {r['satisfied']} | "
      f"{r['first_round_with_compilation_seconds']:.1f} | {' '.join(f'{d:.3f}' for d in r['dice'])} |"
    )
  lines += [f"\n{r['case']}: {r['stopped']}." for r in results if r["stopped"]]
  write_record(args.out, "latency", payload, "\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
