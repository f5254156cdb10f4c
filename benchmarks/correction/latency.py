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
from benchmarks.correction.__main__ import environment
from scribblejax.research import data
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


def measure(name: str, interactions: int) -> dict:
  """Times ``interactions`` rounds of the scribble robot user on one case."""
  model, image, truth, classes = CASES[name]()
  split = sj.split_params(model, sj.last_layers(5))
  config = sj.RefineConfig()
  start = time.perf_counter()
  session = sj.start_session(split, image, config)
  warm = sj.add_marks(session, simulate_marks(np.asarray(sj.current_labels(session)), truth, classes))
  np.asarray(sj.current_labels(warm))
  compile_seconds = time.perf_counter() - start
  seconds, steps, satisfied = [], [], []
  for _ in range(interactions):
    marked = sj.session.current_marks(session) >= 0
    new = simulate_marks(np.asarray(sj.current_labels(session)), truth, classes, marked=marked)
    new = np.where(marked, -1, new).astype(np.int32)
    if not (new >= 0).any():
      break
    t0 = time.perf_counter()
    session = sj.add_marks(session, new)
    np.asarray(sj.current_labels(session))
    seconds.append(time.perf_counter() - t0)
    steps.append(int(session.rounds[-1].result.num_steps))
    satisfied.append(bool(session.rounds[-1].result.satisfied))
  return {
    "case": name,
    "shape": list(truth.shape),
    "seconds": seconds,
    "median_seconds": float(np.median(seconds)),
    "steps": steps,
    "satisfied": satisfied,
    "first_round_with_compilation_seconds": compile_seconds,
    "kernels": str(sj.kernels.kernel_status()),
  }


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog="python -m benchmarks.correction.latency", description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results/correction_cpu"))
  parser.add_argument("--interactions", type=int, default=5)
  parser.add_argument("--cases", default=",".join(CASES))
  args = parser.parse_args(argv)
  env = environment(argv)
  env["command"] = "python -m benchmarks.correction.latency " + " ".join(argv)
  results = [measure(name, args.interactions) for name in args.cases.split(",")]
  payload = {"environment": env, "results": results}
  ev.write_json(args.out / "latency.json", payload)
  lines = [
    "# Seconds per interaction (defaults, scribble robot user)",
    "",
    f"Command: `{env['command']}`; {env['device']} ({env['cpu_count']} cores), {env['date']}; {results[0]['kernels']}.",
    "",
    "| case | shape | median s per interaction | each | steps | satisfied | first round, with compiling (s) |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in results:
    lines.append(
      f"| {r['case']} | {'x'.join(map(str, r['shape']))} | {r['median_seconds']:.2f} | "
      f"{', '.join(f'{s:.2f}' for s in r['seconds'])} | {r['steps']} | {r['satisfied']} | "
      f"{r['first_round_with_compilation_seconds']:.1f} |"
    )
  ev.write_text(args.out / "latency.md", "\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
