"""A/B timing of the last step of an early-stopping interaction, in one process.

The step that finds every mark honoured needs no gradient: with ``lazy_backward`` (on the CPU with
oneDNN convolutions) its backward pass is skipped under ``lax.cond``, and the loop hands its logits
to the result instead of evaluating the tail once more. Timing one code version against another in
separate processes on a shared 2-core machine drowns a 10% change in noise, so this alternates the
backward flag call by call in one process, and times the tail's forward pass (what the reused logits
save) on its own. Each arm runs what :func:`scribblejax.refine` runs (validation, then the driver),
with the backend's ``lazy_backward`` set for that arm.

Usage::

    python -m benchmarks.final_step_ab --out benchmarks/results/cpu_epyc_2core_2026-11-27/final_step/ab.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from benchmarks import speed


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=6)
  parser.add_argument("--out", type=Path, required=True)
  args = parser.parse_args(argv)

  import jax

  import scribblejax as sj
  from scribblejax.refinement import drivers, network
  from scribblejax.refinement.algorithm import Hyper, Settings
  from scribblejax.refinement.backend import Backend

  split = sj.split_params(speed.random_unet(2, (32, 64, 128, 256)), sj.last_layers(5))
  inputs = [speed.make_inputs(2, args.size, 1, seed=100 + i) for i in range(3)]
  config = sj.RefineConfig.paper(max_steps=30, early_stop=True)
  backend = Backend.of(config)
  backends = {lazy: dataclasses.replace(backend, lazy_backward=lazy) for lazy in (True, False)}

  def run(lazy, x):
    # sj.refine(split, image, marks, config) with the backward flag of this arm
    image, marks = sj.refinement.prepare_inputs(split, x[0][0], x[1][0])
    return jax.block_until_ready(drivers.drive(split, image, marks, config, backend=backends[lazy]))

  for lazy in (True, False):
    for x in inputs:
      run(lazy, x)
  times = {True: [], False: []}
  for _ in range(args.repeats):
    for x in inputs:
      for lazy in (True, False):
        start = time.perf_counter()
        run(lazy, x)
        times[lazy].append(1000 * (time.perf_counter() - start))

  image, marks = sj.refinement.prepare_inputs(split, inputs[0][0][0], inputs[0][1][0])
  settings, graphdef = Settings.of(config), network.graph_key(split.graphdef)
  residuals = drivers.trunk_program(
    graphdef, None, backend.conv_backend, drivers.SINGLE, split.tunable, split.frozen, image
  )
  state = drivers.init_program(settings, drivers.SINGLE, split.tunable, Hyper.of(config), 1)
  tail = []
  for i in range(11):
    start = time.perf_counter()
    jax.block_until_ready(
      drivers.finalize_program(
        graphdef, settings, backend, drivers.SINGLE, split.frozen, image, marks, state, residuals
      )
    )
    if i:
      tail.append(1000 * (time.perf_counter() - start))
  record = {
    "device": str(jax.devices()[0].device_kind),
    "case": f"2d{args.size}",
    "max_steps": 30,
    "steps_taken": [int(run(True, x).num_steps) for x in inputs],
    "conv_backend": backend.conv_backend,
    "ms_per_interaction_lazy_backward": {
      "median": float(np.median(times[True])),
      "min": float(np.min(times[True])),
      "times": [round(t, 1) for t in times[True]],
    },
    "ms_per_interaction_eager_backward": {
      "median": float(np.median(times[False])),
      "min": float(np.min(times[False])),
      "times": [round(t, 1) for t in times[False]],
    },
    "ms_tail_forward": float(np.median(tail)),
    "versions": {"jax": jax.__version__},
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  tmp = args.out.with_suffix(".tmp")
  tmp.write_text(json.dumps(record, indent=1))
  tmp.replace(args.out)
  print(
    json.dumps(
      {k: v for k, v in record.items() if not isinstance(v, dict)}
      | {k: round(v["median"], 1) for k, v in record.items() if isinstance(v, dict) and "median" in v}
    )
  )
  return record


if __name__ == "__main__":
  main()
