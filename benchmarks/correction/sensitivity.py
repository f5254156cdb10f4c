"""The defaults beside their neighbours: each of the refinement's main settings moved one step either way,
everything else as the defaults, on every (case, robot user) run of the correction record.

The defaults' learning rate, keep weight, number of tunable layers and far threshold (``merge_far``) were
chosen before the round's merge read the image (``merge_contrast``, ``contrast.md``); this checks them again
with it (``merge_far=1``: no far rule, the contrast step alone takes changes away from the marks). Each variant runs
five interactions of every run of ``results.json`` but the slice stored as 3-D (tissue2d_s140 again); the
peers' curves come from that record (the runs are deterministic: the defaults' row here must reproduce
the record's curves, and the command stops if it does not). Per variant: the mean Dice-AUC over all runs
and per split, the verdicts of the correction record (``benchmarks.correction.verdicts``: never below the
network, first drop at most 0.01, within 0.01 of the best peer at every interaction, Dice@5 >= 0.85 on
the in-domain and shift cases), and the runs whose Dice-AUC is higher and lower than the defaults'.

Run:  python -m benchmarks.correction.sensitivity --out benchmarks/results/correction_cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from benchmarks.correction.__main__ import (
  CLAIMS,
  OURS,
  PEERS,
  claims_met,
  environment,
  make_method,
  squeezed,
  verdicts,
  write_record,
)
from benchmarks.correction.cases import CASES
from benchmarks.correction.explore import pairs_of
from scribblejax import RefineConfig
from scribblejax.research import evaluate as ev

DEFAULT_LAYERS = 5  # the harness's refine_method and make_method default, as the correction record runs


class Variant(NamedTuple):
  """The defaults with one setting moved: ``layers`` tunable last layers and ``overrides`` of RefineConfig."""

  name: str
  layers: int = DEFAULT_LAYERS
  overrides: dict[str, Any] = {}


VARIANTS = (
  Variant("defaults"),
  Variant("learning_rate=0.0025", overrides={"learning_rate": 0.0025}),
  Variant("learning_rate=0.01", overrides={"learning_rate": 0.01}),
  Variant("keep_weight=0.5", overrides={"keep_weight": 0.5}),
  Variant("keep_weight=2", overrides={"keep_weight": 2.0}),
  Variant("layers=3", layers=3),
  Variant("layers=7", layers=7),
  Variant("merge_far=0.999", overrides={"merge_far": 0.999}),
  Variant("merge_far=1", overrides={"merge_far": 1.0}),  # no far rule: the contrast step alone away from the marks
)


def run(variant: Variant, case: str, bench, user: str) -> dict:
  """One variant on one (case, robot user) run, five interactions, as the correction record runs it."""
  config = dataclasses.replace(RefineConfig(), **variant.overrides)
  made = make_method(OURS, bench.model, layers=variant.layers, config=config, new_classes=bench.new_classes)
  eval_config = ev.EvalConfig(interactions=5, mark_kind=user, ignore_border=bench.ignore_border)
  result = ev.run_case(bench.case, squeezed(made, bench.squeeze), eval_config)
  return {
    "case": case,
    "user": user,
    "split": bench.split,
    "situation": bench.situation,
    "variant": variant.name,
    "dice_per_interaction": result["dice_per_interaction"],
    "dice_auc": result["dice_auc"],
    "rounds_unsatisfied": result["rounds_unsatisfied"],
    "stop_reason": result["stop_reason"],
  }


def summarise(runs: list[dict], record: list[dict]) -> dict:
  """Per variant: mean Dice-AUC (all, per split), the record's verdicts met, and runs above and below the
  defaults' Dice-AUC. ``record``: the correction record's results, whose peers each variant is judged against."""
  peers = [r for r in record if r["method"] in PEERS]
  defaults = {(r["case"], r["user"]): r["dice_auc"] for r in runs if r["variant"] == "defaults"}
  out = {}
  for name in dict.fromkeys(r["variant"] for r in runs):
    mine = [r for r in runs if r["variant"] == name]
    as_ours = [{**r, "method": OURS} for r in mine]
    splits = dict.fromkeys(r["split"] for r in mine)
    out[name] = {
      "runs": len(mine),
      "mean_auc": float(np.mean([r["dice_auc"] for r in mine])),
      "mean_auc_per_split": {s: float(np.mean([r["dice_auc"] for r in mine if r["split"] == s])) for s in splits},
      "claims_met": claims_met(verdicts(peers + as_ours)),
      "higher_auc_than_defaults": sum(r["dice_auc"] > defaults[(r["case"], r["user"])] + 1e-9 for r in mine),
      "lower_auc_than_defaults": sum(r["dice_auc"] < defaults[(r["case"], r["user"])] - 1e-9 for r in mine),
    }
  return out


def reproduces(runs: list[dict], record: list[dict]) -> list[str]:
  """The (case, user) runs where the defaults' curve here differs from the record's (empty: none)."""
  ours = {(r["case"], r["user"]): r["dice_per_interaction"] for r in record if r["method"] == OURS}
  return [
    f"{r['case']}/{r['user']}"
    for r in runs
    if r["variant"] == "defaults" and r["dice_per_interaction"] != ours[(r["case"], r["user"])]
  ]


def markdown(payload: dict) -> str:
  env, rows = payload["environment"], payload["variants"]
  count, record = rows["defaults"]["runs"], payload.get("record", "results.json")
  claims = list(CLAIMS)
  lines = [
    "# The defaults beside their neighbours",
    "",
    f"Command: `{env['command']}`; {env['device']}, {env['date']}. Each row is the defaults with one setting "
    "moved (layers: the tunable last layers), five interactions on every (case, robot user) run of "
    f"`{record}` but the slice stored as 3-D (tissue2d_s140 again), {count} runs; the peers' curves are that "
    "record's, and the defaults' row here reproduces its curves exactly. Verdicts by `results.md`'s rules "
    f"(met / runs), over these {count} runs (`results.md` counts the slice stored as 3-D too).",
    "",
    "| variant | mean AUC | tuning | held-out | fresh | "
    + " | ".join(CLAIMS[c] for c in claims)
    + " | AUC above / below the defaults |",
    "|---|---|---|---|---|" + "---|" * len(claims) + "---|",
  ]
  for name, row in rows.items():
    split = row["mean_auc_per_split"]
    lines.append(
      f"| {name} | {row['mean_auc']:.3f} | "
      + " | ".join(f"{split[s]:.3f}" if s in split else "-" for s in ("tuning", "held-out", "fresh"))
      + " | "
      + " | ".join("{}/{}".format(*row["claims_met"][c]) for c in claims)
      + f" | {row['higher_auc_than_defaults']} / {row['lower_auc_than_defaults']} |"
    )
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.correction.sensitivity", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results/correction_cpu"))
  parser.add_argument(
    "--record",
    type=Path,
    default=Path("benchmarks/results/correction_cpu/results.json"),
    help="the correction record whose (case, robot user) runs are run again, and whose peers judge them",
  )
  args = parser.parse_args(argv)
  record = json.loads(args.record.read_text())["results"]
  pairs = pairs_of({"results": record})
  benches = {name: CASES[name]() for name in dict.fromkeys(case for case, _ in pairs)}
  runs = []
  for variant in VARIANTS:  # the defaults first: they must reproduce the record before the rest is run
    for case, user in pairs:
      runs.append(run(variant, case, benches[case], user))
      dice = " ".join(f"{d:.3f}" for d in runs[-1]["dice_per_interaction"])
      print(f"{variant.name:22s} {case:20s} {user:8s} {dice}", flush=True)
    differ = reproduces(runs, record)
    if differ:
      raise SystemExit(
        f"the defaults here do not reproduce {args.record} on {', '.join(differ)}; on another CPU that can be "
        "rounding (python -m benchmarks.correction.reproduce compares every run, with both machines' CPUs): "
        "rerun the record on this machine first"
      )
  payload = {
    "record": str(args.record),
    "environment": environment(argv, "benchmarks.correction.sensitivity"),
    "variants": summarise(runs, record),
    "runs": runs,
  }
  text = markdown(payload)
  write_record(args.out, "sensitivity", payload, text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
