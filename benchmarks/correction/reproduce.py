"""Does this machine reproduce a correction record? Runs the record's runs again and compares the curves.

A run of the correction benchmark is deterministic on one machine: the same command gives the same Dice
after every interaction, bit for bit. Across machines it need not be: XLA and the oneDNN convolutions pick
their kernels by the CPU's instruction-set extensions (``cpu_features`` in a record's environment), the
rounding of a sum changes with the kernel, and a refinement that runs to its step budget without honouring
every mark can carry that difference into another segmentation, and so into the marks the robot user draws
next. This command reruns every (case, robot user) run of ``--record`` for the chosen methods, with as many
interactions as the record ran, and writes, per run, the largest difference in Dice and the first
interaction that differs, beside both machines' CPUs.

Run:  python -m benchmarks.correction.reproduce --methods all --out benchmarks/results/correction_cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from benchmarks.correction.__main__ import OURS, defaults_record, environment, run_one, write_record
from benchmarks.correction.cases import CASES
from scribblejax.config import RefineConfig


def compare(record_dice: list[float | None], dice: list[float | None]) -> dict:
  """How a rerun's Dice curve differs from the record's.

  Args:
    record_dice: the record's Dice after interactions 0..N (``None`` where it was undefined: no foreground).
    dice: this machine's, for the same run.

  Returns:
    ``{"max_abs_diff": float, "first_differing": int | None}``: the largest absolute difference over the
    interactions where both are defined, and the first interaction whose Dice is not bit-identical
    (defined on one side only counts as differing; ``None``: none differs).

  Raises:
    ValueError: the curves have different lengths (the rerun is not the record's run).
  """
  if len(record_dice) != len(dice):
    raise ValueError(f"the record has {len(record_dice)} Dice values for this run, the rerun {len(dice)}")
  differing = [k for k, (a, b) in enumerate(zip(record_dice, dice)) if a != b]
  both = [(a, b) for a, b in zip(record_dice, dice) if a is not None and b is not None]
  return {
    "max_abs_diff": max((abs(a - b) for a, b in both), default=0.0),
    "first_differing": differing[0] if differing else None,
  }


def _cpu(env: dict) -> str:
  """A record environment's CPU in words (records made before the CPU was recorded say so)."""
  if "cpu_features" not in env:
    return f"{env.get('processor') or 'a CPU'} (model and features not recorded), {env.get('cpu_count')} cores"
  features = ", ".join(env["cpu_features"]) or "none of the recorded ones"
  return f"{env.get('cpu_model') or 'unknown model'} ({features}), {env.get('cpu_count')} cores"


def markdown(payload: dict) -> str:
  runs, env, theirs = payload["runs"], payload["environment"], payload["record_environment"]
  same = sum(r["first_differing"] is None for r in runs)
  lines = [
    "# Reproducing the correction record",
    "",
    f"Command: `{env['command']}`; {env['date']}.",
    "",
    f"* The record: `{payload['record']}`, made {theirs.get('date')} on {_cpu(theirs)}; jax {theirs.get('jax')}.",
    f"* This run: {_cpu(env)}; jax {env['jax']}.",
    "",
    f"**{same} of {len(runs)} runs reproduce the record bit for bit** (every Dice after every interaction).",
  ]
  skipped = payload.get("skipped", [])
  if skipped:
    lines[-1] += (
      f" {len(skipped)} could not run here: "
      + "; ".join(f"{s['case']}/{s['user']}/{s['method']} ({s['why']})" for s in skipped)
      + "."
    )
  differ = [r for r in runs if r["first_differing"] is not None]
  if differ:
    lines[-1] += " The others:"
    lines += [
      "",
      "| case | user | method | from interaction | largest difference | record's Dice@0..N | this machine's |",
      "|---|---|---|---|---|---|---|",
    ]
    curve = lambda dice: " ".join("-" if d is None else f"{d:.3f}" for d in dice)
    for r in differ:
      lines.append(
        f"| {r['case']} | {r['user']} | {r['method']} | {r['first_differing']} | {r['max_abs_diff']:.4f} | "
        f"{curve(r['record_dice'])} | {curve(r['dice'])} |"
      )
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog="python -m benchmarks.correction.reproduce", description=__doc__.split("\n")[0])
  parser.add_argument("--out", type=Path, default=Path("benchmarks/results/correction_cpu"))
  parser.add_argument("--record", type=Path, default=Path("benchmarks/results/correction_cpu/results.json"))
  parser.add_argument(
    "--methods", nargs="+", default=[OURS], help=f"the record's methods to rerun (default: {OURS}; 'all': every one)"
  )
  args = parser.parse_args(argv)
  record = json.loads(args.record.read_text())
  record_env = record["environment"]
  config = dataclasses.replace(RefineConfig(), **record_env.get("overrides", {}))
  if "defaults" in record_env and record_env["defaults"] != defaults_record():
    raise SystemExit(f"{args.record} was made with other defaults than RefineConfig() here: it cannot be rerun as is")
  wanted = set(args.methods)
  rows = [r for r in record["results"] if "all" in wanted or r["method"] in wanted]
  if not rows:
    raise SystemExit(f"{args.record} has no run of {', '.join(sorted(wanted))}")
  benches: dict = {}
  runs, skipped = [], []
  for r in rows:
    bench = benches.setdefault(r["case"], CASES[r["case"]]())
    interactions = len(r["dice_per_interaction"]) - 1
    try:
      result = run_one(bench, r["method"], r["user"], interactions, log=None, config=config)
    except ImportError as err:  # a peer whose library is missing: said, not hidden (as the record's command)
      print(f"{r['case']} / {r['user']} / {r['method']}: skipped: {err}", flush=True)
      skipped.append({"case": r["case"], "user": r["user"], "method": r["method"], "why": str(err)})
      continue
    runs.append(
      {
        "case": r["case"],
        "user": r["user"],
        "method": r["method"],
        "record_dice": r["dice_per_interaction"],
        "dice": result["dice_per_interaction"],
        **compare(r["dice_per_interaction"], result["dice_per_interaction"]),
      }
    )
    print(f"{r['case']:20s} {r['user']:8s} {r['method']:14s} {runs[-1]['max_abs_diff']:.4f}", flush=True)
  payload = {
    "record": str(args.record),
    "record_environment": {k: v for k, v in record_env.items() if k != "defaults"},
    "environment": environment(argv, "benchmarks.correction.reproduce"),
    "runs": runs,
    "skipped": skipped,
  }
  text = markdown(payload)
  write_record(args.out, "reproduce", payload, text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
