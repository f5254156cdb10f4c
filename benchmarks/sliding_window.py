"""Segmenting a volume before and after a refinement: two sliding-window passes against one pass that
computes each patch's frozen trunk once (:func:`scribblejax.pipeline.sliding_window_logits_of`).

``refine`` without a session writes the refined segmentation and reports how many voxels changed
from the network's own, so it segments the whole volume with W and with the refined W_lam. The two
differ only in the tunable last layers: the joint pass runs the frozen trunk once per patch and the
tail twice. Both variants are timed on the same weights and volume, and checked to give the same
logits.

The network is nnU-Net's ``PlainConvUNet`` of a ``3d_fullres`` plan (:mod:`benchmarks.patch_memory`),
random weights, the last ``--layers`` layers tunable; W_lam is W with its tunable leaves scaled.
Usage::

  python -m benchmarks.sliding_window                                # 96^3 volume, 64^3 patches
  python -m benchmarks.sliding_window --volume 160 --patch 128 --stages 6 --out r.json

Each record holds ``device``, ``variant`` ("two_passes" or "joint_pass"), ``volume``, ``patch``,
``patches``, ``layers``, ``stages``, ``seconds`` (the median of ``--repeats`` runs after a first one
that compiles), ``compile_s`` (the first run less the median), ``max_abs_diff`` (the joint pass
against the two passes) and versions.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _timed(fn, repeats: int) -> tuple[float, float, object]:
  """(median seconds of ``repeats`` runs after the first, first less median, the last result)."""
  times, out = [], None
  for _ in range(repeats + 1):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  median = float(np.median(times[1:]))
  return median, times[0] - median, out


def measure(volume: int, patch: int, stages: int, layers: int, repeats: int) -> list[dict]:
  """The two records: two sliding-window passes, and one joint pass."""
  import jax

  import scribblejax as sj
  from benchmarks.patch_memory import nnunet_fullres
  from scribblejax.pipeline.sliding_window import window_grid

  split = sj.split_params(nnunet_fullres(stages), sj.last_layers(layers))
  refined = jax.tree.map(lambda w: w * 1.1, split.tunable)
  image = np.random.default_rng(0).normal(size=(volume,) * 3 + (1,)).astype(np.float32)
  shape = (patch,) * 3

  def two():
    return [
      sj.pipeline.sliding_window_logits(split, image, shape),
      sj.pipeline.sliding_window_logits(split, image, shape, refined),
    ]

  def joint():
    return sj.pipeline.sliding_window_logits_of(split, image, shape, [None, refined])

  base = {
    "volume": volume,
    "patch": patch,
    "patches": len(window_grid((max(volume, patch),) * 3, shape, 0.5)),
    "layers": layers,
    "stages": stages,
    "repeats": repeats,
  }
  records, outputs = [], []
  for name, fn in (("two_passes", two), ("joint_pass", joint)):
    seconds, compile_s, out = _timed(fn, repeats)
    outputs.append(out)
    records.append({**base, "variant": name, "seconds": seconds, "compile_s": compile_s})
  diff = max(float(np.abs(a - b).max()) for a, b in zip(*outputs))
  for record in records:
    record["max_abs_diff"] = diff
  return records


def markdown(records: list[dict]) -> str:
  rows = [
    "| device | volume | patch | patches | layers | variant | s (median) | compile s | max abs diff |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in records:
    rows.append(
      f"| {r['device']} | {r['volume']}^3 | {r['patch']}^3 | {r['patches']} | {r['layers']} | "
      f"{r['variant']} | {r['seconds']:.2f} | {r['compile_s']:.2f} | {r['max_abs_diff']:.1e} |"
    )
  return "\n".join(rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--volume", type=int, default=96, help="volume edge (default 96)")
  parser.add_argument("--patch", type=int, default=64, help="patch edge (default 64)")
  parser.add_argument("--stages", type=int, default=5, help="U-Net stages (default 5)")
  parser.add_argument("--layers", type=int, default=3, help="tunable last layers (default 3)")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs after the first (default 3)")
  parser.add_argument("--out", help="JSON file of the records (written atomically), with a .md table beside it")
  args = parser.parse_args(argv)
  from benchmarks.patch_memory import stamp, write_records

  records = [stamp(r) for r in measure(args.volume, args.patch, args.stages, args.layers, args.repeats)]
  for record in records:
    print(json.dumps(record), flush=True)
  write_records(records, markdown(records), args.out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
