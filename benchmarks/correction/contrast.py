"""How ``RefineConfig.merge_contrast`` was chosen: the contrast score of each region where a round's merge
and the refined network's own labels differ, against the truth.

Every (case, robot user) run of the correction record is replayed with the defaults as they were before
the contrast step (``merge_contrast=1``), five interactions. After every round, each connected region
where the merge and the refined network's own labels differ gets its contrast score
(:func:`scribblejax.refinement.merge.contrast_scores`) and its gain: the pixels the refined labels have
right less the pixels the merge has right, over the region's pixels the contrast step may change (not
marked, not protected by the network's sureness). For each threshold, the regions scoring above it are
summed per case. The default is the threshold with the highest total gain over the tuning cases among
those that lose pixels on none of them. The held-out cases took no part in that rule; they check it,
but less strictly than the split suggests: the scratch analysis that led to the step had looked at every
case (``docs/correction.md``, "How it was found and chosen").

Run:  python -m benchmarks.correction.contrast --out benchmarks/results/correction_cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from benchmarks.correction.__main__ import OURS, environment, make_method, squeezed, write_record
from benchmarks.correction.cases import CASES, BenchCase
from benchmarks.correction.explore import BASE, _wrap, pairs_of
from scribblejax import RefineConfig
from scribblejax.refinement.merge import contrast_scores, kept_by_protection, merge_masks
from scribblejax.research import evaluate as ev

BEFORE = dataclasses.replace(RefineConfig(), **BASE)  # the defaults before the contrast step
THRESHOLDS = (-1.0, -0.2, 0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)  # -1: every judged region


def region_gains(
  image: np.ndarray, merged: np.ndarray, own: np.ndarray, kept: np.ndarray, truth: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """``(scores, gains)`` per region where ``merged`` and ``own`` differ: the contrast score (NaN: not judged)
  and the right pixels taking ``own`` there would gain, on the pixels not ``kept``."""
  regions, scores = contrast_scores(image, merged, own)
  free = ~kept
  gain = (own == truth).astype(np.int64) - (merged == truth).astype(np.int64)
  index = np.arange(1, len(scores))
  gains = ndimage.sum(gain * free, regions, index) if len(index) else np.zeros(0)
  return scores[1:], np.asarray(gains, np.int64)


def net_gains(scores: np.ndarray, gains: np.ndarray, thresholds=THRESHOLDS) -> dict[str, int]:
  """Per threshold, the summed gain of the regions scoring above it (as ``resembling`` takes them)."""
  with np.errstate(invalid="ignore"):
    return {f"{t:g}": int(gains[scores > t].sum()) for t in thresholds}


def recording(method, bench: BenchCase, truth: np.ndarray, rounds: list):
  """``method`` (the defaults before the contrast step) that appends each round's :func:`net_gains`; the
  pixels left out are those the merge's contrast step may not change (marked, or kept by the protection
  as :func:`scribblejax.refinement.merge.kept_by_protection` keeps them)."""

  def update(inner, marks):
    inner = method.update(inner, marks)
    if inner.sureness is None:
      return inner, ()
    merged, own = np.asarray(inner.labels), np.asarray(inner.proposed)
    _, _, protected = merge_masks(None, np.asarray(inner.initial, np.float32), BEFORE)
    kept = kept_by_protection(protected, merged, own, bench.new_classes) | (np.asarray(marks) >= 0)
    scores, gains = region_gains(np.asarray(inner.image), merged, own, kept, truth)
    rounds.append({"regions": int(len(scores)), "judged": int(np.isfinite(scores).sum()), **net_gains(scores, gains)})
    return inner, ()

  return _wrap(method, update)


def run(bench: BenchCase, case: str, user: str) -> dict:
  """One run of five interactions; each round's regions of difference scored and counted."""
  truth = np.squeeze(bench.case.truth, axis=bench.squeeze) if bench.squeeze else bench.case.truth
  rounds: list[dict] = []
  method = recording(make_method(OURS, bench.model, config=BEFORE, new_classes=bench.new_classes), bench, truth, rounds)
  config = ev.EvalConfig(interactions=5, mark_kind=user, ignore_border=bench.ignore_border)
  ev.run_case(bench.case, squeezed(method, bench.squeeze), config)
  totals = {f"{t:g}": sum(r[f"{t:g}"] for r in rounds) for t in THRESHOLDS}
  return {"case": case, "user": user, "split": bench.split, "rounds": rounds, "gains": totals}


def per_case(results: list[dict]) -> dict[str, dict]:
  """Per case: its split and, per threshold, the gain summed over its runs."""
  cases: dict[str, dict] = {}
  for r in results:
    entry = cases.setdefault(r["case"], {"split": r["split"], "gains": dict.fromkeys(r["gains"], 0)})
    for t, g in r["gains"].items():
      entry["gains"][t] += g
  return cases


def choose(cases: dict[str, dict]) -> str | None:
  """The threshold with the highest total gain over the tuning cases among those that lose on none of
  them (``None``: every threshold loses on one)."""
  tuning = [c["gains"] for c in cases.values() if c["split"] == "tuning"]
  safe = [t for t in (f"{t:g}" for t in THRESHOLDS) if all(g[t] >= 0 for g in tuning)]
  return max(safe, key=lambda t: sum(g[t] for g in tuning)) if safe else None


def markdown(payload: dict) -> str:
  cases, chosen = payload["cases"], payload["chosen"]
  keys = [f"{t:g}" for t in THRESHOLDS]
  lines = [
    "# The contrast step of the round's merge: how its threshold was chosen",
    "",
    f"Command: `{payload['environment']['command']}`; {payload['environment']['device']}, "
    f"{payload['environment']['date']}. The defaults before the contrast step (`merge_contrast=1`), every "
    "(case, robot user) run of the correction record, five interactions. After every round, each region "
    "where the merge and the refined network's own labels differ is scored; the table sums, per case "
    "over its runs and rounds, the right pixels gained by taking the refined labels in the regions scoring "
    "above each threshold (marked and protected pixels left out). Negative: the regions taken lose pixels.",
    "",
    f"Chosen on the tuning cases (the highest total among the thresholds that lose on none of them): "
    f"**{chosen}**. The held-out and fresh cases took no part in this rule; the scratch analysis that led to "
    'the step had looked at every case (`docs/correction.md`, "How it was found and chosen").',
    "",
    "| case | split | " + " | ".join(f"> {k}" for k in keys) + " |",
    "|---|---|" + "---|" * len(keys),
  ]
  for split in ("tuning", "held-out", "fresh"):
    for name, c in cases.items():
      if c["split"] == split:
        lines.append(f"| {name} | {split} | " + " | ".join(str(c["gains"][k]) for k in keys) + " |")
    rows = [c["gains"] for c in cases.values() if c["split"] == split]
    if rows:
      lines.append(f"| **all {split}** | | " + " | ".join(f"**{sum(g[k] for g in rows)}**" for k in keys) + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog="python -m benchmarks.correction.contrast", description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results/correction_cpu"))
  parser.add_argument(
    "--pairs-from",
    type=Path,
    default=Path("benchmarks/results/correction_cpu/results.json"),
    help="the correction record whose (case, robot user) runs are replayed",
  )
  args = parser.parse_args(argv)
  pairs = pairs_of(json.loads(args.pairs_from.read_text()))
  benches = {name: CASES[name]() for name in dict.fromkeys(case for case, _ in pairs)}
  results = []
  for case, user in pairs:
    results.append(run(benches[case], case, user))
    print(case, user, results[-1]["gains"], flush=True)
  cases = per_case(results)
  payload = {
    "environment": environment(argv, "benchmarks.correction.contrast"),
    "thresholds": list(THRESHOLDS),
    "chosen": choose(cases),
    "cases": cases,
    "results": results,
  }
  text = markdown(payload)
  write_record(args.out, "contrast", payload, text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
