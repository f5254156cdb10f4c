"""Signals and settings for the round's merge, measured on the correction benchmark's runs and not adopted
(``docs/correction.md``, "Tried for the merge and not adopted").

* ``lagged``: a rule standing in for the person's choice (``scribblejax refine --take``). A round merges
  into the previous round's refined network's own labels, not into the segmentation shown, when those
  labels already gave at least half of the person's new marked pixels their marked class, and more of
  them than the shown segmentation did.
* ``far``: the defaults, counting per round the pixels whose label changed away from the marks (in
  regions of change that touch no mark) and how many right pixels that gained, for the round's merge
  and for the refined network's own labels.

* ``sureness``: the defaults, recording per round how sure the network W was on the new marks it had wrong.
* ``take_regions``, ``take_3_regions`` and ``take_of_3_largest``: the choice region by region
  (``refine --take network --where``/``--regions``), made by a judge that knows the truth: every region
  where the refined network's own labels are righter, the three largest of those, or those of the three
  largest regions of difference (the ones a report and the napari widget point at).
* ``region_sure_0.9``/``0.95``: a rule taking whole regions the refined network is sure of on average.
* ``merge_far_0.998``/``0.999``, ``region_growing_0.05``: the defaults with one setting changed.
* ``defaults``: the defaults themselves, the row every table sets the others beside.

"The defaults" here are those these studies explored: the library's defaults as of commit ``b5abb80``,
before the round's merge read the image (:data:`BASE`: ``merge_contrast=1``). Each runs every (case,
robot user) of the correction record given (``--pairs-from``; the slice stored as 3-D, tissue2d_s140
again, left out) with five interactions.

Run:  python -m benchmarks.correction.explore --out benchmarks/results/archive/correction_cpu_2026-12-07_explore
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from scipy import ndimage

from benchmarks.correction.__main__ import OURS, aggregate, environment, judge_of, make_method, squeezed, write_record
from benchmarks.correction.cases import CASES, BenchCase
from scribblejax import RefineConfig
from scribblejax.refinement.merge import differences, new_marks_of, take_where
from scribblejax.research import baselines as bl
from scribblejax.research import evaluate as ev

BASE = {"merge_contrast": 1.0}  # the defaults these studies explored: before the merge's contrast step
AT_LEAST = 0.5  # the lagged rule: the share of the new marked pixels the network's own labels must have right
VARIANTS = {  # the defaults with one setting changed: (RefineConfig overrides, EvalConfig overrides)
  "merge_far_0.998": ({"merge_far": 0.998}, {}),
  "merge_far_0.999": ({"merge_far": 0.999}, {}),
  "region_growing_0.05": ({}, {"region_growing": 0.05}),
}
TAKE_REGIONS = {"take_regions": None, "take_3_regions": 3}  # the most regions a round may take
LOOKED_AT = {"take_of_3_largest": 3}  # the largest regions of difference a person looks at, each round
SURE_REGIONS = {"region_sure_0.9": 0.9, "region_sure_0.95": 0.95}  # the least mean sureness of a region taken
STUDIES = ("defaults", "lagged", "far", "sureness", *TAKE_REGIONS, *LOOKED_AT, *SURE_REGIONS, *VARIANTS)
CLEAR = 0.01  # a round where one of the two segmentations is better by more than this
AGGREGATE_HEADER = [
  "| method | runs | mean AUC | mean gain @1 | mean gain @N | first drops | below network |",
  "|---|---|---|---|---|---|---|",
]


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


def sureness_at_marks(initial_logits: Any, new_marks: np.ndarray) -> float | None:
  """The mean top probability the network W gave on the new marked pixels (``new_marks >= 0``) whose
  mark is not W's label: how sure W was where it was wrong (``None``: W had every new mark right)."""
  probabilities = np.asarray(jax.nn.softmax(np.asarray(initial_logits, np.float32), axis=-1))
  marked = new_marks >= 0
  wrong = marked & (probabilities.argmax(axis=-1) != new_marks)
  return float(probabilities.max(axis=-1)[wrong].mean()) if wrong.any() else None


def recording_sureness(method: bl.Method, judge) -> bl.Method:
  """``method`` (the defaults) whose info records each round's :func:`sureness_at_marks` (``w_sure``) and
  the Dice (``judge``) of its merge (``merge_dice``) and of the refined network's own labels (``own_dice``)."""

  def update(inner: bl.RefineMethodState, marks):
    new = new_marks_of(np.asarray(marks), inner.marks)
    sure = None if inner.initial is None else sureness_at_marks(inner.initial, new)
    inner = method.update(inner, marks)
    return inner, (("w_sure", sure), ("merge_dice", judge(inner.labels)), ("own_dice", judge(inner.proposed)))

  return _wrap(method, update)


def better_by_region(
  merged: np.ndarray, own: np.ndarray, truth: np.ndarray, most: int | None = None
) -> tuple[np.ndarray, int, int]:
  """``(labels, regions taken, regions)``: ``merged`` except in each connected region where ``merged`` and
  ``own`` differ and ``own`` has more of the region's pixels right (``truth``), or only in the ``most``
  largest such regions; as :func:`scribblejax.refinement.merge.take_where` takes them (a marked pixel in
  a region taken shows ``own``'s label, as with the whole network's labels taken)."""
  regions, count = ndimage.label(merged != own)
  flat = regions.ravel()
  own_right = np.bincount(flat, weights=(own == truth).ravel(), minlength=count + 1)
  merged_right = np.bincount(flat, weights=(merged == truth).ravel(), minlength=count + 1)
  take = own_right > merged_right
  take[0] = False  # the pixels where the two agree
  if most is not None and take.sum() > most:
    sizes = np.where(take, np.bincount(flat, minlength=count + 1), -1)
    take[np.argsort(-sizes, kind="stable")[most:]] = False
  return np.where(take[regions], own, merged).astype(np.int32), int(take.sum()), count


def taking_regions(method: bl.Method, truth: np.ndarray, most: int | None = None) -> bl.Method:
  """``method`` (the defaults, with the round's merge) where each round's segmentation becomes
  :func:`better_by_region`'s (``most``: at most that many regions) and the next round merges into it; the
  info counts the regions taken (``regions_taken`` of ``regions``)."""

  def update(inner: bl.RefineMethodState, marks):
    inner = method.update(inner, marks)
    merged, own = np.asarray(inner.labels), np.asarray(inner.proposed)
    labels, taken, count = better_by_region(merged, own, truth, most)
    return inner._replace(labels=labels), (("regions_taken", taken), ("regions", count))

  return _wrap(method, update)


def better_of_largest(merged: np.ndarray, own: np.ndarray, truth: np.ndarray, looked: int) -> tuple[np.ndarray, int]:
  """``(labels, regions taken)``: ``merged`` except in those of the ``looked`` largest regions where ``merged``
  and ``own`` differ (as :func:`scribblejax.refinement.merge.differences` lists them, and so a report's
  ``differences`` and the napari widget's "Point at largest differences") where ``own`` has more of the
  region's pixels right (``truth``), taken at the region's point with
  :func:`scribblejax.refinement.merge.take_where`: what a person who goes through the listed regions and
  judges each by eye can get at best."""
  regions, _ = ndimage.label(merged != own)
  where = np.zeros(merged.shape, bool)
  for found in differences(merged, own, looked):
    region = regions == regions[found.point]
    if np.count_nonzero((own == truth) & region) > np.count_nonzero((merged == truth) & region):
      where[found.point] = True
  taken = int(where.sum())
  return (take_where(merged, own, where) if taken else merged.astype(np.int32)), taken


def taking_largest(method: bl.Method, truth: np.ndarray, looked: int) -> bl.Method:
  """``method`` (the defaults, with the round's merge) where each round's segmentation becomes
  :func:`better_of_largest`'s and the next round merges into it; the info counts the regions taken
  (``regions_taken`` of the ``regions`` that differ)."""

  def update(inner: bl.RefineMethodState, marks):
    inner = method.update(inner, marks)
    merged, own = np.asarray(inner.labels), np.asarray(inner.proposed)
    labels, taken = better_of_largest(merged, own, truth, looked)
    count = ndimage.label(merged != own)[1]
    return inner._replace(labels=labels), (("regions_taken", taken), ("regions", count))

  return _wrap(method, update)


def sure_regions(
  merged: np.ndarray, own: np.ndarray, sureness: np.ndarray, kept: np.ndarray, at_least: float
) -> np.ndarray:
  """``merged`` with ``own``'s labels in each connected region where the two differ whose mean ``sureness``
  (the refined network's top class probability) is at least ``at_least``, but on the ``kept`` pixels."""
  regions, count = ndimage.label(merged != own)
  if not count:
    return merged
  take = np.zeros(count + 1, bool)
  take[1:] = ndimage.mean(sureness, regions, np.arange(1, count + 1)) >= at_least
  return np.where(take[regions] & ~kept, own, merged).astype(np.int32)


def taking_sure_regions(method: bl.Method, at_least: float, protect: float) -> bl.Method:
  """``method`` (the defaults, with the round's merge) where each round's segmentation becomes
  :func:`sure_regions`' with the pixels the network W gave at least ``protect``, and the marked ones, kept."""

  def update(inner: bl.RefineMethodState, marks):
    inner = method.update(inner, marks)
    if inner.sureness is None:  # a region-based network: no distribution to be sure in
      return inner, ()
    w_sure = np.asarray(jax.nn.softmax(np.asarray(inner.initial, np.float32), axis=-1)).max(axis=-1) >= protect
    kept = w_sure | (np.asarray(marks) >= 0)
    labels = sure_regions(np.asarray(inner.labels), np.asarray(inner.proposed), inner.sureness, kept, at_least)
    return inner._replace(labels=labels), ()

  return _wrap(method, update)


def run(bench: BenchCase, user: str, study: str) -> dict:
  """One study (one of :data:`STUDIES`) on one case with one robot user, five interactions."""
  overrides, eval_overrides = VARIANTS.get(study, ({}, {}))
  config = dataclasses.replace(RefineConfig(), **BASE, **overrides)
  method = make_method(OURS, bench.model, config=config, new_classes=bench.new_classes)
  truth = np.squeeze(bench.case.truth, axis=bench.squeeze) if bench.squeeze else bench.case.truth
  if study == "lagged":
    method = lagged_take(method)
  elif study == "far":
    method = counting_far(method, truth)
  elif study == "sureness":
    method = recording_sureness(method, judge_of(bench))
  elif study in TAKE_REGIONS:
    method = taking_regions(method, truth, TAKE_REGIONS[study])
  elif study in LOOKED_AT:
    method = taking_largest(method, truth, LOOKED_AT[study])
  elif study in SURE_REGIONS:
    method = taking_sure_regions(method, SURE_REGIONS[study], config.merge_protect)
  config = ev.EvalConfig(interactions=5, mark_kind=user, ignore_border=bench.ignore_border, **eval_overrides)
  result = ev.run_case(bench.case, squeezed(method, bench.squeeze), config)
  result.update(user=user, method=study)
  return result


def pairs_of(record: dict) -> list[tuple[str, str]]:
  """The (case, robot user) runs of the defaults in a correction record, the slice stored as 3-D left out."""
  runs = [r for r in record["results"] if r["method"] == OURS and r["case"] != "tissue2d_as_3d"]
  return [(r["case"], r["user"]) for r in runs]


def _aggregate_rows(rows: list[dict]) -> list[str]:
  return [
    f"| {a['method']} | {a['runs']} | {a['mean_auc']:.3f} | {a['mean_gain_first']:+.3f} | {a['mean_gain_last']:+.3f} | "
    f"{a['first_drops']} | {a['below_network']} |"
    for a in rows
  ]


def _dice(run: dict) -> str:
  return " ".join(f"{d:.3f}" for d in run["dice_per_interaction"])


def _beside_defaults(payload: dict, runs: list[dict]) -> list[str]:
  """The lines of the table over all runs: the defaults (run beside the studies, or else from the record the
  runs repeat), then ``runs``."""
  return [
    "",
    f"Over all runs (the defaults {payload.get('defaults_from', 'from the record they repeat')}):",
    "",
    *AGGREGATE_HEADER,
    *_aggregate_rows(payload["defaults"] + aggregate(runs)),
  ]


def sureness_summary(results: list[dict], clear: float = CLEAR) -> dict[str, list[float]]:
  """W's sureness on the wrong new marks (``w_sure``) of the rounds where the refined network's own labels
  were the better segmentation by more than ``clear`` (``own``) and of those where the merge was
  (``merge``), from the ``sureness`` runs' info; rounds where W had every new mark right left out."""
  rounds = [i for r in results if r["method"] == "sureness" for i in r["method_info"] if i["w_sure"] is not None]
  return {
    "own": sorted(i["w_sure"] for i in rounds if i["own_dice"] > i["merge_dice"] + clear),
    "merge": sorted(i["w_sure"] for i in rounds if i["merge_dice"] > i["own_dice"] + clear),
  }


def _dice_section(payload: dict, runs: list[dict], title: str, column: str, intro: str | None = None) -> list[str]:
  """A section of ``runs``' Dice per interaction, one row each named in ``column``, then the table over all
  runs beside the defaults; no lines without runs."""
  if not runs:
    return []
  lines = ["", f"## {title}", "", *([intro, ""] if intro else [])]
  lines += [f"| {column} | case | user | Dice per interaction |", "|---|---|---|---|"]
  lines += [f"| {r['method']} | {r['case']} | {r['user']} | {_dice(r)} |" for r in runs]
  return lines + _beside_defaults(payload, runs)


def markdown(payload: dict) -> str:
  """The record as tables, one section per study run."""
  results = payload["results"]
  of = lambda study: [r for r in results if r["method"] == study]
  env = payload["environment"]
  lines = [
    "# Signals and settings for the round's merge, tried and not adopted",
    "",
    f"Command: `{env['command']}`; device {env['device']}, {env['date']}.",
  ]
  if of("lagged"):
    lines += [
      "",
      "## The lagged take",
      "",
      "| case | user | Dice per interaction | took the network's own (round 2 on) |",
      "|---|---|---|---|",
    ]
    for r in of("lagged"):
      took = "".join("y" if i["took_network"] else "." for i in r["method_info"][1:])
      lines.append(f"| {r['case']} | {r['user']} | {_dice(r)} | {took} |")
    lines += ["", *AGGREGATE_HEADER, *_aggregate_rows(aggregate(of("lagged")))]
  if of("far"):
    lines += [
      "",
      "## Far changes per round (the defaults)",
      "",
      "Per round: pixels the merge changed away from the marks (right pixels gained) / the same for the "
      "refined network's own labels.",
      "",
      "| case | user | pixels in the image | rounds |",
      "|---|---|---|---|",
    ]
    for r in of("far"):
      rounds = "; ".join(
        f"{i['far']} ({i['far_gain']:+d}) / {i['own_far']} ({i['own_far_gain']:+d})" for i in r["method_info"]
      )
      lines.append(f"| {r['case']} | {r['user']} | {payload['pixels'][r['case']]} | {rounds} |")
  if of("sureness"):
    lines += [
      "",
      "## W's sureness on the marks it had wrong (the defaults)",
      "",
      "Per round: the mean top probability the network W gave on the round's new marked pixels whose mark is "
      "not its label (- where it had them all right), and the Dice of the refined network's own labels less "
      "the Dice of the round's merge (positive: the network's own was the better).",
      "",
      "| case | user | rounds: W's sureness (own - merge) |",
      "|---|---|---|",
    ]
    for r in of("sureness"):
      rounds = "; ".join(
        ("-" if i["w_sure"] is None else f"{i['w_sure']:.3f}") + f" ({i['own_dice'] - i['merge_dice']:+.3f})"
        for i in r["method_info"]
      )
      lines.append(f"| {r['case']} | {r['user']} | {rounds} |")
    split = sureness_summary(results)
    lines += [
      "",
      f"| better by more than {CLEAR} | rounds | W's sureness: min | median | max |",
      "|---|---|---|---|---|",
    ]
    for side, name in (("own", "the network's own"), ("merge", "the merge")):
      values = split[side]
      if values:
        lines.append(
          f"| {name} | {len(values)} | {values[0]:.3f} | {float(np.median(values)):.3f} | {values[-1]:.3f} |"
        )
  by_region = [r for r in results if r["method"] in (*TAKE_REGIONS, *LOOKED_AT)]
  if by_region:
    lines += [
      "",
      "## The better of the two taken region by region (a judge with the truth)",
      "",
      "`take_regions`: every region where the refined network's own labels have more pixels right; "
      "`take_3_regions`: at most the three largest of them per round; `take_of_3_largest`: those of the three "
      "largest regions of difference (as a report's `differences` and the napari widget list them) where the "
      "refined network's own labels have more pixels right.",
      "",
      "| study | case | user | Dice per interaction | regions taken per round (of those that differ) |",
      "|---|---|---|---|---|",
    ]
    for r in by_region:
      taken = ", ".join(f"{i['regions_taken']}/{i['regions']}" for i in r["method_info"])
      lines.append(f"| {r['method']} | {r['case']} | {r['user']} | {_dice(r)} | {taken} |")
    lines += _beside_defaults(payload, by_region)
  lines += _dice_section(
    payload,
    [r for r in results if r["method"] in SURE_REGIONS],
    "Regions the refined network is sure of, taken (a rule)",
    "rule",
    "After the round's merge, each region where the merge and the refined network's own labels differ takes "
    "the latter when the refined network's mean top probability over it is at least the threshold (but on "
    "the pixels W was sure of, and the marked ones).",
  )
  lines += _dice_section(
    payload, [r for r in results if r["method"] in VARIANTS], "Settings (the defaults with one changed)", "setting"
  )
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
  parser.add_argument(
    "--studies", nargs="+", choices=STUDIES, default=list(STUDIES), help="the studies to run (defaults always runs)"
  )
  args = parser.parse_args(argv)
  args.studies = ["defaults", *(s for s in args.studies if s != "defaults")]  # the row the others sit beside
  record = json.loads(args.pairs_from.read_text())
  pairs = pairs_of(record)
  benches = {name: CASES[name]() for name in dict.fromkeys(case for case, _ in pairs)}
  results = []
  for study in args.studies:
    for case, user in pairs:
      results.append(run(benches[case], user, study))
      print(study, case, user, _dice(results[-1]), flush=True)
  payload = {
    "environment": environment(argv, "benchmarks.correction.explore"),
    "pixels": {name: int(np.prod(b.case.truth.shape)) for name, b in benches.items()},
    "defaults": aggregate([r for r in results if r["method"] == "defaults"]),
    "defaults_from": "run here beside the studies",
    "results": results,
  }
  write_record(args.out, "explore", payload, markdown(payload))
  return 0


if __name__ == "__main__":
  sys.exit(main())
