"""Two per-image signals for choosing between a round's merge and the refined network's own labels,
measured on the correction benchmark's runs and not adopted (``docs/correction.md``, "Tried for the
merge and not adopted").

* ``lagged``: a rule standing in for the person's choice (``scribblejax refine --take``). A round merges
  into the previous round's refined network's own labels, not into the segmentation shown, when those
  labels already gave at least half of the person's new marked pixels their marked class, and more of
  them than the shown segmentation did.
* ``far``: the defaults, counting per round the pixels whose label changed away from the marks (in
  regions of change that touch no mark) and how many right pixels that gained, for the round's merge
  and for the refined network's own labels.

Both run every (case, robot user) of the correction record given (``--pairs-from``; the slice stored as
3-D, tissue2d_s140 again, left out) with five interactions.

Run:  python -m benchmarks.correction.explore --out benchmarks/results/archive/correction_cpu_2026-12-07_explore
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from benchmarks.correction.__main__ import OURS, aggregate, environment, make_method, squeezed
from benchmarks.correction.cases import CASES, BenchCase
from scribblejax.refinement.merge import new_marks_of
from scribblejax.research import baselines as bl
from scribblejax.research import evaluate as ev

AT_LEAST = 0.5  # the lagged rule: the share of the new marked pixels the network's own labels must have right


class Wrapped(NamedTuple):
  """The state of a wrapped refinement: the refinement's, and what its last round adds to the info."""

  inner: Any
  extra: tuple[tuple[str, Any], ...] = ()


def _wrap(method: bl.Method, update) -> bl.Method:
  """``method`` with ``update(inner, marks) -> (inner, extra)``; ``extra`` joins the round's info."""
  return method._replace(
    init=lambda image: Wrapped(method.init(image)),
    labels=lambda state: method.labels(state.inner),
    update=lambda state, marks: Wrapped(*update(state.inner, marks)),
    info=lambda state: {**method.info(state.inner), **dict(state.extra)},
  )


def takes_network(shown: np.ndarray, own: np.ndarray, new_marks: np.ndarray, at_least: float = AT_LEAST) -> bool:
  """Whether the lagged rule switches to the refined network's own labels ``own``: they give at least
  ``at_least`` of the new marked pixels (``new_marks >= 0``) their marked class, and more of them than the
  segmentation ``shown`` does. No new mark: no switch."""
  marked = new_marks >= 0
  if not marked.any():
    return False
  own_right = float(np.mean(own[marked] == new_marks[marked]))
  return own_right >= at_least and own_right > float(np.mean(shown[marked] == new_marks[marked]))


def lagged_take(method: bl.Method, at_least: float = AT_LEAST) -> bl.Method:
  """``method`` (the defaults, with the round's merge) where each round, before refining, the segmentation
  becomes the previous round's refined network's own labels when :func:`takes_network` says so; the info
  says whether it did (``took_network``)."""

  def update(inner: bl.RefineMethodState, marks):
    took = False
    if inner.proposed is not None:
      new = new_marks_of(np.asarray(marks), inner.marks)
      took = takes_network(np.asarray(inner.labels), np.asarray(inner.proposed), new, at_least)
    inner = inner._replace(labels=inner.proposed) if took else inner
    return method.update(inner, marks), (("took_network", took),)

  return _wrap(method, update)


def far_changes(before: np.ndarray, after: np.ndarray, marks: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
  """``(pixels changed away from the marks, right pixels gained there)`` from ``before`` to ``after``:
  unmarked pixels whose label changed, in connected regions of change that touch no marked pixel (nor
  its neighbours)."""
  marked = marks >= 0
  changed = (before != after) & ~marked
  regions, _ = ndimage.label(changed)
  touching = np.unique(regions[ndimage.binary_dilation(marked) & changed])
  far = changed & ~np.isin(regions, touching[touching > 0])
  gained = int(np.sum((after == truth) & far)) - int(np.sum((before == truth) & far))
  return int(far.sum()), gained


def counting_far(method: bl.Method, truth: np.ndarray) -> bl.Method:
  """``method`` (the defaults) whose info counts each round's far changes (:func:`far_changes`) of its
  merge (``far``, ``far_gain``) and of the refined network's own labels (``own_far``, ``own_far_gain``),
  both from the segmentation the round started from."""

  def update(inner: bl.RefineMethodState, marks):
    before = np.asarray(method.labels(inner))
    inner = method.update(inner, marks)
    marks = np.asarray(marks)
    merged = far_changes(before, np.asarray(inner.labels), marks, truth)
    own = far_changes(before, np.asarray(inner.proposed), marks, truth)
    return inner, (("far", merged[0]), ("far_gain", merged[1]), ("own_far", own[0]), ("own_far_gain", own[1]))

  return _wrap(method, update)


def run(bench: BenchCase, user: str, study: str) -> dict:
  """One study (``lagged`` or ``far``) on one case with one robot user, five interactions."""
  method = make_method(OURS, bench.model, new_classes=bench.new_classes)
  if study == "lagged":
    method = lagged_take(method)
  else:
    truth = np.squeeze(bench.case.truth, axis=bench.squeeze) if bench.squeeze else bench.case.truth
    method = counting_far(method, truth)
  config = ev.EvalConfig(interactions=5, mark_kind=user, ignore_border=bench.ignore_border)
  result = ev.run_case(bench.case, squeezed(method, bench.squeeze), config)
  result.update(user=user, method=study)
  return result


def pairs_of(record: dict) -> list[tuple[str, str]]:
  """The (case, robot user) runs of the defaults in a correction record, the slice stored as 3-D left out."""
  runs = [r for r in record["results"] if r["method"] == OURS and r["case"] != "tissue2d_as_3d"]
  return [(r["case"], r["user"]) for r in runs]


def markdown(payload: dict) -> str:
  """The record as tables: the lagged rule per run and over all runs; the far changes per run and round."""
  lagged = [r for r in payload["results"] if r["method"] == "lagged"]
  lines = [
    "# Two signals for the round's merge, tried and not adopted",
    "",
    f"Command: `{payload['environment']['command']}`; device {payload['environment']['device']}, "
    f"{payload['environment']['date']}.",
    "",
    "## The lagged take",
    "",
    "| case | user | Dice per interaction | took the network's own (round 2 on) |",
    "|---|---|---|---|",
  ]
  for r in lagged:
    took = "".join("y" if i["took_network"] else "." for i in r["method_info"][1:])
    dice = " ".join(f"{d:.3f}" for d in r["dice_per_interaction"])
    lines.append(f"| {r['case']} | {r['user']} | {dice} | {took} |")
  lines += [
    "",
    "| runs | mean AUC | mean gain @1 | mean gain @N | first drops | below network |",
    "|---|---|---|---|---|---|",
  ]
  for a in aggregate(lagged):
    lines.append(
      f"| {a['runs']} | {a['mean_auc']:.3f} | {a['mean_gain_first']:+.3f} | {a['mean_gain_last']:+.3f} | "
      f"{a['first_drops']} | {a['below_network']} |"
    )
  lines += [
    "",
    "## Far changes per round (the defaults)",
    "",
    "Per round: pixels the merge changed away from the marks (right pixels gained) / the same for the refined "
    "network's own labels.",
    "",
    "| case | user | pixels in the image | rounds |",
    "|---|---|---|---|",
  ]
  for r in (r for r in payload["results"] if r["method"] == "far"):
    rounds = "; ".join(
      f"{i['far']} ({i['far_gain']:+d}) / {i['own_far']} ({i['own_far_gain']:+d})" for i in r["method_info"]
    )
    lines.append(f"| {r['case']} | {r['user']} | {payload['pixels'][r['case']]} | {rounds} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog="python -m benchmarks.correction.explore", description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, required=True, help="folder for explore.json and explore.md")
  parser.add_argument(
    "--pairs-from",
    type=Path,
    default=Path("benchmarks/results/correction_cpu/results.json"),
    help="the correction record whose (case, robot user) runs are repeated",
  )
  args = parser.parse_args(argv)
  pairs = pairs_of(json.loads(args.pairs_from.read_text()))
  benches = {name: CASES[name]() for name in dict.fromkeys(case for case, _ in pairs)}
  results = []
  for study in ("lagged", "far"):
    for case, user in pairs:
      results.append(run(benches[case], user, study))
      print(study, case, user, " ".join(f"{d:.3f}" for d in results[-1]["dice_per_interaction"]), flush=True)
  payload = {
    "environment": {**environment(argv), "command": "python -m benchmarks.correction.explore " + " ".join(argv)},
    "pixels": {name: int(np.prod(b.case.truth.shape)) for name, b in benches.items()},
    "results": results,
  }
  args.out.mkdir(parents=True, exist_ok=True)
  ev.write_json(args.out / "explore.json", payload)
  ev.write_text(args.out / "explore.md", markdown(payload))
  return 0


if __name__ == "__main__":
  sys.exit(main())
