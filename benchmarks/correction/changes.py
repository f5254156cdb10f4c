"""Where a round's refinement changes the segmentation, and whether the change is right.

For each case, the robot user's first marks (scribbles) are given to a refinement with the
defaults but without the progressive merge, and every pixel whose label changed is sorted by (a)
whether its connected region of change touches a mark, and (b) how sure the network (W) was of its
old label, or (b') how sure the refined network is of its new label. Each group's gain is (pixels
right after) - (pixels right before). This is the measurement behind ``RefineConfig.progressive_merge``,
``merge_near`` and ``merge_far`` (the refined network's confidence separates right changes from wrong
ones; W's does not).

Run:  python -m benchmarks.correction.changes --out benchmarks/results/correction_cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np
from scipy import ndimage

from benchmarks.correction.__main__ import environment, write_record
from benchmarks.correction.cases import CASES
from scribblejax.config import RefineConfig
from scribblejax.params import last_layers, split_params
from scribblejax.refinement import predict, refine
from scribblejax.research import evaluate as ev
from scribblejax.research.simulate import simulate_marks

BINS = (0.0, 0.8, 0.9, 0.95, 0.99, 0.999, 1.01)
REFINED_BINS = (0.0, 0.9, 0.99, 0.995, 1.01)


def analyse(name: str) -> dict:
  """The changes of one case's first round, grouped."""
  bench = CASES[name]()
  case = bench.case
  split = split_params(bench.model, last_layers(5))
  logits = predict(split, case.image)
  before = np.asarray(np.argmax(logits, -1))
  sure = np.asarray(jax.nn.softmax(logits, -1)).max(-1)
  marks = simulate_marks(before, case.truth, case.num_classes)
  config = dataclasses.replace(RefineConfig(), progressive_merge=False)
  result = refine(split, case.image, marks, config)
  after = np.asarray(result.labels)
  refined_sure = np.asarray(jax.nn.softmax(result.logits, -1)).max(-1)
  changed = after != before
  regions, count = ndimage.label(changed)
  touching = np.isin(regions, np.unique(regions[(marks >= 0) & changed])) & changed
  gain = lambda mask: int((after[mask] == case.truth[mask]).sum() - (before[mask] == case.truth[mask]).sum())
  groups = {"touching a mark": {"pixels": int(touching.sum()), "gain": gain(touching)}}
  away = changed & ~touching
  for lo, hi in zip(BINS[:-1], BINS[1:]):
    mask = away & (sure >= lo) & (sure < hi)
    groups[f"away, network sure in [{lo}, {min(hi, 1.0)}]"] = {"pixels": int(mask.sum()), "gain": gain(mask)}
  for where, region in (("touching", touching), ("away", away)):
    for lo, hi in zip(REFINED_BINS[:-1], REFINED_BINS[1:]):
      mask = region & (refined_sure >= lo) & (refined_sure < hi)
      label = f"{where}, refined network sure in [{lo}, {min(hi, 1.0)}]"
      groups[label] = {"pixels": int(mask.sum()), "gain": gain(mask)}
  dice = lambda labels: ev.metrics.mean_foreground_dice(labels, case.truth, case.num_classes)
  return {
    "case": name,
    "marked_pixels": int((marks >= 0).sum()),
    "changed_pixels": int(changed.sum()),
    "regions_of_change": int(count),
    "dice_before": dice(before),
    "dice_after": dice(after),
    "groups": groups,
  }


def markdown(payload: dict) -> str:
  lines = [
    "# Where the first round's refinement changes the segmentation",
    "",
    f"Command: `{payload['environment']['command']}`; {payload['environment']['device']}, "
    f"{payload['environment']['date']}. Defaults without the progressive merge; the robot user's first "
    "scribbles. gain = pixels right after - pixels right before.",
    "",
  ]
  for r in payload["results"]:
    lines += [
      f"## {r['case']}: {r['marked_pixels']} marked pixels changed {r['changed_pixels']} pixels in "
      f"{r['regions_of_change']} regions; Dice {r['dice_before']:.3f} -> {r['dice_after']:.3f}",
      "",
      "| group | pixels | gain |",
      "|---|---|---|",
    ]
    lines += [f"| {g} | {v['pixels']} | {v['gain']} |" for g, v in r["groups"].items()]
    lines.append("")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog="python -m benchmarks.correction.changes", description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results/correction_cpu"))
  parser.add_argument("--cases", default="nuclei2d,tissue2d,tissue2d_shifted,nuclei_synthetic")
  args = parser.parse_args(argv)
  payload = {
    "environment": environment(argv, "benchmarks.correction.changes"),
    "results": [analyse(name) for name in args.cases.split(",")],
  }
  text = markdown(payload)
  write_record(args.out, "changes", payload, text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
