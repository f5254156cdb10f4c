"""The correction benchmark: does refinement correct, against the network and the peers?

Every case of :mod:`benchmarks.correction.cases` is corrected by every method, each fed by the same
deterministic robot user (:func:`scribblejax.research.simulate.robot_marks`: scribbles, RITM's clicks, boxes,
the CVPR 2025 interactive 3-D challenge's box-then-clicks), for N interactions. It writes, atomically:

* ``results.json``: every run (Dice per interaction, NoC@85/90, Dice-AUC, marks honoured, satisfied,
  seconds per interaction, compile time apart), with the machine, versions, date and command;
* ``results.md``: one table per case, the defaults against each peer alone (head to head), the claims
  below asked of the defaults and of ``take_best`` side by side, and the verdict of the defaults against
  each claim;
* ``<case>.png``: Dice per interaction, a panel per robot user.

Besides the peers, two runs of the defaults that are not peers (the claims below are not checked against
them): ``no_merge``, the defaults without the round's merge (each round's segmentation is the refined
network's own labels), an ablation that shows what the merge keeps and what it gives up; and
``take_best``, the defaults where after every round a simulated person takes whichever of the round's
merge and the refined network's own labels has the higher Dice (``scribblejax refine --take``, the
napari widget's "Show network's own"), judged with the ground truth as the robot users place their
marks with it: what the choice the library offers is worth to a person who sees which is better.

The claims checked (``verdicts`` in the JSON), for the defaults (``scribblejax``) on every case and
robot user: Dice@k >= Dice@0 for k = 1..N; Dice@k >= the best peer's Dice@k - 0.01; the first
interaction lowers Dice by at most 0.01; Dice@N >= 0.85 on the in-domain and shift cases.

Run:  python -m benchmarks.correction               (every case with scribbles and clicks; boxes and the
                                                    CVPR 2025 protocol on nuclei2d and tissue2d; 3-D cases
                                                    with scribbles and the CVPR 2025 protocol)
      python -m benchmarks.correction --quick          (a few minutes: 3 cases, 2 users, 3 interactions)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from benchmarks.correction.cases import CASES, BenchCase
from scribblejax.config import RefineConfig
from scribblejax.research import baselines as bl
from scribblejax.research import evaluate as ev
from scribblejax.research import metrics
from scribblejax.research.simulate import ROBOT_USERS

OURS = "scribblejax"
NO_MERGE = "no_merge"  # the defaults without the round's merge: what the merge adds, not a peer
TAKE_BEST = "take_best"  # the defaults, the better of the merge and the network's own taken each round: not a peer
ABLATIONS = (NO_MERGE, TAKE_BEST)
METHODS = ("initial", "random_walker", "graph_cut", "head", "fbrs", "paper", NO_MERGE, TAKE_BEST, OURS)
PEERS = ("random_walker", "graph_cut", "head", "fbrs", "paper")
QUICK = {"cases": ("nuclei2d", "tissue2d", "wm_from_nuclei"), "users": ("scribble", "click"), "interactions": 3}
TOLERANCE = 0.01
GOOD = 0.85
CLAIMS = {  # the verdicts' claims, as results.md names them
  "not_below_network": "Dice@k >= Dice@0 at every k",
  "first_drop_at_most_0.01": "first interaction lowers Dice by at most 0.01",
  "within_0.01_of_best_peer": "within 0.01 of the best peer at every k",
  f"final_at_least_{GOOD}": f"Dice@N >= {GOOD} (in-domain, shift)",
}


def make_method(
  name: str,
  model: Any,
  layers: int = 5,
  config: RefineConfig | None = None,
  new_classes: tuple[int, ...] = (),
  judge: Callable[[np.ndarray], float] | None = None,
) -> bl.Method:
  """The method called ``name`` on ``model``; ``config`` replaces the defaults of ``scribblejax`` (and of
  ``no_merge`` and ``take_best``, which are built on them); ``new_classes``: the classes appended to the
  model's head (for the methods with the round's merge); ``judge``: ``labels -> Dice`` against the
  ground truth, by which ``take_best`` chooses (on the grid the network sees).

  Raises:
    ValueError: an unknown name, or ``take_best`` without ``judge``.
  """
  if name == OURS:
    return bl.refine_method(model, layers, config or RefineConfig(), name=OURS, new_classes=new_classes)
  if name == TAKE_BEST:
    if judge is None:
      raise ValueError("take_best judges each round with the ground truth: give judge")
    ours = bl.refine_method(model, layers, config or RefineConfig(), name=TAKE_BEST, new_classes=new_classes)
    return take_best(ours, judge)
  if name == NO_MERGE:
    unmerged = dataclasses.replace(config or RefineConfig(), progressive_merge=False)
    return bl.refine_method(model, layers, unmerged, name=NO_MERGE, new_classes=new_classes)
  if name == "paper":
    return bl.refine_method(model, layers, RefineConfig.paper(), name="paper", new_classes=new_classes)
  if name == "head":
    return bl.refine_method(model, "head", RefineConfig(), name="head", new_classes=new_classes)
  if name == "fbrs":
    return bl.fbrs_method(model, layers, new_classes=new_classes)
  if name == "graph_cut":
    from scribblejax.research.graphcut import graph_cut_method

    return graph_cut_method(model)
  if name == "random_walker":
    return bl.random_walker_method(model)
  if name == "initial":
    return bl.initial_method(model)
  raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")


class TakeBestState(NamedTuple):
  """The state of :func:`take_best`: the refinement's, and whether its last round took the network's."""

  inner: Any
  took_network: bool = False


def take_best(method: bl.Method, judge: Callable[[np.ndarray], float]) -> bl.Method:
  """``method`` (a refinement with the round's merge) where, after every round, the segmentation becomes
  the refined network's own labels when ``judge`` (Dice against the ground truth) scores them higher;
  the next round merges into the one taken. The info says whether it was taken (``took_network``; not
  where the two are equal)."""

  def update(state: TakeBestState, marks) -> TakeBestState:
    inner = method.update(state.inner, marks)
    took = bool(judge(inner.proposed) > judge(inner.labels))
    return TakeBestState(inner._replace(labels=inner.proposed) if took else inner, took)

  return method._replace(
    init=lambda image: TakeBestState(method.init(image)),
    labels=lambda state: method.labels(state.inner),
    update=update,
    info=lambda state: {**method.info(state.inner), "took_network": state.took_network},
  )


def squeezed(method: bl.Method, axes: tuple[int, ...]) -> bl.Method:
  """``method`` on an image whose spatial ``axes`` have length 1 and which the network does not see."""
  if not axes:
    return method
  drop = lambda a: np.squeeze(np.asarray(a), axis=axes)
  image_of = lambda image: np.squeeze(np.asarray(image), axis=axes)  # spatial axes come before channels
  add = lambda labels: np.expand_dims(np.asarray(labels), axis=axes)
  return method._replace(
    init=lambda image: method.init(image_of(image)),
    labels=lambda state: add(method.labels(state)),
    update=lambda state, marks: method.update(state, drop(marks)),
    warmup=lambda image: method.warmup(image_of(image)),
  )


def judge_of(bench: BenchCase) -> Callable[[np.ndarray], float]:
  """``labels -> Dice`` against the case's ground truth, on the grid the network sees (for ``take_best``)."""
  truth = np.squeeze(bench.case.truth, axis=bench.squeeze) if bench.squeeze else bench.case.truth
  return lambda labels: metrics.mean_foreground_dice(np.asarray(labels), truth, bench.case.num_classes)


def run_one(
  bench: BenchCase, method_name: str, user: str, interactions: int, log, config: RefineConfig | None = None
) -> dict:
  """One method on one case with one robot user (``config``: the settings of ``scribblejax``)."""
  judge = judge_of(bench) if method_name == TAKE_BEST else None
  made = make_method(method_name, bench.model, config=config, new_classes=bench.new_classes, judge=judge)
  method = squeezed(made, bench.squeeze)
  config = ev.EvalConfig(interactions=interactions, mark_kind=user, ignore_border=bench.ignore_border)
  result = ev.run_case(bench.case, method, config, log=log)
  result.update(situation=bench.situation, split=bench.split, user=user, method=method_name)
  return result


def _by_run(results: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
  """The results grouped by (case, robot user), then by method."""
  groups: dict[tuple[str, str], dict[str, dict]] = {}
  for r in results:
    groups.setdefault((r["case"], r["user"]), {})[r["method"]] = r
  return groups


def _best(curves: list[list[float]]) -> list[float]:
  """The highest Dice at each interaction over ``curves`` (the maximum taken afresh at every k)."""
  return [max(c[k] for c in curves) for k in range(len(curves[0]))]


def _holds(dice: list[float], other: list[float]) -> bool:
  """``dice`` is at least ``other`` - TOLERANCE after every interaction (k >= 1)."""
  return all(d >= o - TOLERANCE for d, o in zip(dice[1:], other[1:]))


def verdicts(results: list[dict], method: str = OURS) -> list[dict]:
  """The claims about the defaults (or about ``method``), checked on every (case, user) that has them and
  a peer."""
  out = []
  for (case, user), runs in _by_run(results).items():
    ours = runs.get(method)
    if ours is None:
      continue
    dice = ours["dice_per_interaction"]
    peers = [runs[p]["dice_per_interaction"] for p in PEERS if p in runs]
    best = _best(peers) if peers else None
    row = {
      "case": case,
      "user": user,
      "situation": ours["situation"],
      "split": ours["split"],
      "not_below_network": all(d >= dice[0] - 1e-9 for d in dice[1:]),
      "first_drop_at_most_0.01": dice[1] >= dice[0] - TOLERANCE if len(dice) > 1 else True,
      "within_0.01_of_best_peer": None if best is None else _holds(dice, best),
      "worst_gap_to_best_peer": None if best is None else float(min(d - b for d, b in zip(dice[1:], best[1:]))),
      "final_dice": dice[-1],
      "rounds_unsatisfied": ours["rounds_unsatisfied"],
      "stop_reason": ours["stop_reason"],
    }
    if ours["situation"] in ("in-domain", "shift"):
      row[f"final_at_least_{GOOD}"] = dice[-1] >= GOOD
    out.append(row)
  return out


def claims_met(rows: list[dict]) -> dict[str, list[int]]:
  """How many of ``verdicts`` rows meet each claim: ``claim -> [met, runs it applies to]``."""
  applies = lambda claim: [r[claim] for r in rows if r.get(claim) is not None]
  return {claim: [sum(map(bool, applies(claim))), len(applies(claim))] for claim in CLAIMS}


def taken_rounds(results: list[dict]) -> list[int]:
  """``[rounds in which take_best took the refined network's own labels, its rounds]`` over ``results``."""
  infos = [i for r in results if r["method"] == TAKE_BEST for i in r["method_info"]]
  return [sum(bool(i.get("took_network")) for i in infos), len(infos)]


def head_to_head(results: list[dict]) -> list[dict]:
  """The defaults against each peer alone, over every (case, robot user) run both have.

  The verdicts ask the defaults to stay within 0.01 of the *best* peer at every interaction, a maximum
  taken afresh at each k over five methods whose curves cross; this says how each pair compares
  (``ours_holds``: runs where the defaults stay within 0.01 of the peer at every k; ``peer_holds``: the
  reverse; ``ours_higher_auc``: runs where the defaults' Dice-AUC is the higher), and, for every method,
  in how many runs it would meet that verdict itself against all the others (``within_best_of_others``).
  """
  groups = [
    {m: r["dice_per_interaction"] for m, r in runs.items()} for runs in _by_run(results).values() if OURS in runs
  ]
  rows = []
  for method in (*PEERS, *ABLATIONS, OURS):
    shared = [runs for runs in groups if method in runs]
    row = {"method": method, "runs": len(shared)}
    if method != OURS:
      auc = ev.dice_auc
      row.update(
        ours_holds=sum(_holds(runs[OURS], runs[method]) for runs in shared),
        peer_holds=sum(_holds(runs[method], runs[OURS]) for runs in shared),
        ours_higher_auc=sum(auc(runs[OURS]) > auc(runs[method]) for runs in shared),
      )
    within = 0
    for runs in shared:
      others = [runs[m] for m in (*PEERS, OURS) if m != method and m in runs]
      if others:  # a run of the defaults alone (--methods scribblejax) has no one to compare with
        within += _holds(runs[method], _best(others))
    row["within_best_of_others"] = within
    rows.append(row)
  return rows


def judged(payload: dict) -> dict:
  """``payload`` with its ``verdicts`` and ``head_to_head`` computed from its results."""
  compared = [r for r in payload["results"] if r["case"] != "tissue2d_as_3d"]  # tissue2d_s140 again
  rest = {k: v for k, v in payload.items() if k != "take_best"}  # a rewrite without take_best runs drops it
  ours = verdicts(payload["results"])
  judged_ = {**rest, "verdicts": ours, "head_to_head": head_to_head(compared)}
  if any(r["method"] == TAKE_BEST for r in payload["results"]):
    judged_["take_best"] = {
      "claims_met": {OURS: claims_met(ours), TAKE_BEST: claims_met(verdicts(payload["results"], TAKE_BEST))},
      "took_network_rounds": taken_rounds(compared),
    }
  return judged_


def aggregate(results: list[dict]) -> list[dict]:
  """Per method, over every (case, robot user) run: mean Dice-AUC, mean gain after the first and the
  last interaction, how many runs dropped more than 0.01 at the first interaction or below the network
  at any, the worst drop from one interaction to the next, and rounds whose network left a mark."""
  rows = []
  for method in dict.fromkeys(r["method"] for r in results):
    runs = [r for r in results if r["method"] == method and r["dice_auc"] is not None]
    dice = [r["dice_per_interaction"] for r in runs]
    rows.append(
      {
        "method": method,
        "runs": len(runs),
        "mean_auc": float(np.mean([r["dice_auc"] for r in runs])),
        "mean_gain_first": float(np.mean([d[1] - d[0] for d in dice])),
        "mean_gain_last": float(np.mean([d[-1] - d[0] for d in dice])),
        "first_drops": int(sum(d[1] < d[0] - TOLERANCE for d in dice)),
        "below_network": int(sum(min(d[1:]) < d[0] - TOLERANCE for d in dice)),
        "worst_step_drop": float(max(max(d[k - 1] - d[k] for k in range(1, len(d))) for d in dice)),
        "network_unsatisfied_rounds": (
          int(sum(not i["satisfied"] for r in runs for i in r["method_info"] if "satisfied" in i))
          if any("satisfied" in i for r in runs for i in r["method_info"])
          else None
        ),
      }
    )
  return rows


def settings(items: list[str]) -> dict[str, Any]:
  """``KEY=VALUE`` items as :class:`RefineConfig` overrides (values read as JSON, else as strings).

  Raises:
    ValueError: an item without ``=``, a name that is no setting, or a value the setting refuses.
  """
  names = {f.name for f in dataclasses.fields(RefineConfig)}
  out: dict[str, Any] = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
    if key not in names:
      raise ValueError(f"--set {key}: no such setting of RefineConfig; known: {', '.join(sorted(names))}")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  RefineConfig(**out)  # a value the setting refuses is named here, before any case runs
  return out


def defaults_record() -> dict:
  """``RefineConfig()``'s fields as a record stores them (a value JSON cannot hold as its ``repr``)."""
  return {
    k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
    for k, v in dataclasses.asdict(RefineConfig()).items()
  }


def environment(argv: list[str], program: str = "benchmarks.correction") -> dict:
  """Machine, versions, date and command of this run (``python -m program argv``)."""
  import flax
  import jax
  import optax

  from scribblejax.kernels import kernel_status

  return {
    "device": ev.device_name(),
    "platform": platform.platform(),
    "processor": platform.processor(),
    **ev.host_cpu(),
    "cpu_count": __import__("os").cpu_count(),
    "python": sys.version.split()[0],
    "jax": jax.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "onednn": str(kernel_status()),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": f"python -m {program} " + " ".join(argv),
    "defaults": defaults_record(),
  }


def overridden(env: dict) -> list[str]:
  """The markdown lines that say which settings a run changed from the defaults (none: no lines)."""
  given = env.get("overrides") or {}
  if not given:
    return []
  named = ", ".join(f"`{k}={v!r}`" for k, v in given.items())
  return [f"**Not the defaults:** `scribblejax` ran with {named}.", ""]


def _f(x, digits: int = 3) -> str:
  return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(payload: dict) -> str:
  """The results as markdown: a table per case, then the verdicts."""
  env = payload["environment"]
  lines = [
    "# Correction benchmark",
    "",
    f"Machine: {env['device']} ({env['cpu_count']} cores, {env['platform']}); jax {env['jax']}, flax "
    f"{env['flax']}; {env['date']}.",
    f"Command: `{env['command']}`",
    "",
    *overridden(env),
    "Dice@k: mean foreground Dice after k interactions (0: the network alone), the *last* interaction "
    "is the last column. NoC: interactions to reach 0.85 / 0.90 ('+': not reached). AUC: mean Dice over "
    "interactions 0..N (trapezoids). honoured: fraction of all marks so far that the last segmentation "
    "honours; unsat.: rounds that ended with a mark not honoured. s: median seconds per interaction "
    "(compiled code; compile time apart). net unsat.: rounds in which the refined network's own argmax "
    "left a mark unhonoured (before the round's merge). Marks after interaction 1 depend on each method's "
    "own prediction.",
    "",
  ]
  results = payload["results"]
  for case in dict.fromkeys(r["case"] for r in results):
    first = next(r for r in results if r["case"] == case)
    lines += [f"## {case} ({first['situation']}, {first['split']})", "", payload["notes"].get(case, ""), ""]
    n = max(len(r["dice_per_interaction"]) for r in results if r["case"] == case)
    lines.append(
      "| user | method | "
      + " | ".join(f"Dice@{k}" for k in range(n))
      + " | NoC85 | NoC90 | AUC | honoured | unsat. | net unsat. | s |"
    )
    lines.append("|" + "---|" * (n + 9))
    for r in (r for r in results if r["case"] == case):
      noc = [f"{r['noc'][t]}{'' if r['noc_reached'][t] else '+'}" for t in r["noc"]]
      honoured = r["marks_honoured"][-1] if r["marks_honoured"] else None
      seconds = float(np.median(r["seconds_per_interaction"])) if r["seconds_per_interaction"] else None
      name = f"**{r['method']}**" if r["method"] == OURS else r["method"]
      net = [i.get("satisfied") for i in r["method_info"] if "satisfied" in i]
      net_unsat = str(sum(not x for x in net)) if net else "-"
      lines.append(
        f"| {r['user']} | {name} | "
        + " | ".join(_f(d) for d in r["dice_per_interaction"])
        + f" | {' | '.join(noc)} | {_f(r['dice_auc'])} | {_f(honoured)} | {r['rounds_unsatisfied']} "
        f"| {net_unsat} | {_f(seconds, 2)} |"
      )
    lines.append("")
  lines += [
    "## Over all runs",
    "",
    "Per method, over every (case, robot user) run except the slice stored as 3-D (the same computation as "
    "tissue2d_s140): mean Dice-AUC; mean gain over the network after the first and after the last "
    "interaction; runs whose first interaction lowered Dice by more than 0.01; runs below the network "
    "at any interaction (by more than 0.01); the worst fall from one interaction to the next; rounds whose "
    "network left a mark unhonoured (-: the method has no network).",
    "",
    "| method | runs | mean AUC | mean gain @1 | mean gain @N | first drops | below network | worst fall "
    "| network-unsatisfied rounds |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for a in aggregate([r for r in results if r["case"] != "tissue2d_as_3d"]):
    lines.append(
      f"| {a['method']} | {a['runs']} | {a['mean_auc']:.3f} | {a['mean_gain_first']:+.3f} | "
      f"{a['mean_gain_last']:+.3f} | {a['first_drops']} | {a['below_network']} | "
      f"{a['worst_step_drop']:.3f} | {_f(a['network_unsatisfied_rounds'])} |"
    )
  lines.append("")
  lines += [
    "## Head to head",
    "",
    "The defaults against each peer alone, over the same runs as above: runs where the defaults stay within "
    "0.01 of the peer after every interaction, runs where the peer stays within 0.01 of the defaults, and "
    "runs where the defaults' Dice-AUC is the higher. The last column: runs where the method itself stays "
    "within 0.01 of the best of all the *other* methods after every interaction (the verdict below asks "
    "this of the defaults; `no_merge`, the defaults without the round's merge, and `take_best`, the defaults "
    "with the better of the merge and the refined network's own labels taken after every round, are not "
    "counted among the others).",
    "",
    "| method | runs | defaults hold | peer holds | defaults' AUC higher | within 0.01 of the best of the others |",
    "|---|---|---|---|---|---|",
  ]
  for h in payload.get("head_to_head") or head_to_head([r for r in results if r["case"] != "tissue2d_as_3d"]):
    lines.append(
      f"| {h['method']} | {h['runs']} | {_f(h.get('ours_holds'))} | {_f(h.get('peer_holds'))} | "
      f"{_f(h.get('ours_higher_auc'))} | {h['within_best_of_others']} |"
    )
  lines.append("")
  if payload.get("take_best"):
    lines += _take_best_section(payload["take_best"])
  lines += [
    "## Verdicts (the defaults, `scribblejax`)",
    "",
    "| case | user | split | >= network at every k | first drop <= 0.01 | within 0.01 of best peer "
    "| worst gap to best peer | final Dice | >= 0.85 (in-domain, shift) | unsat. rounds |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  yes = lambda v: "-" if v is None else ("yes" if v else "**no**")
  for v in payload["verdicts"]:
    lines.append(
      f"| {v['case']} | {v['user']} | {v['split']} | {yes(v['not_below_network'])} | "
      f"{yes(v['first_drop_at_most_0.01'])} | {yes(v['within_0.01_of_best_peer'])} | "
      f"{_f(v['worst_gap_to_best_peer'])} | {_f(v['final_dice'])} | {yes(v.get(f'final_at_least_{GOOD}'))} "
      f"| {v['rounds_unsatisfied']} |"
    )
  return "\n".join(lines) + "\n"


def _take_best_section(taken: dict) -> list[str]:
  """The markdown lines that set the verdicts' claims of the defaults beside those of ``take_best``."""
  took, rounds = taken["took_network_rounds"]
  lines = [
    "## The better of the two taken (`take_best`)",
    "",
    f"`take_best` took the refined network's own labels in {took} of its {rounds} rounds (over the runs above) "
    "and the merge in the others. The claims of the verdicts below, asked of the defaults and of `take_best` "
    "(every run, the slice stored as 3-D included; met / runs the claim applies to):",
    "",
    f"| claim | {OURS} | {TAKE_BEST} |",
    "|---|---|---|",
  ]
  met = taken["claims_met"]
  for claim, name in CLAIMS.items():
    lines.append(f"| {name} | {'/'.join(map(str, met[OURS][claim]))} | {'/'.join(map(str, met[TAKE_BEST][claim]))} |")
  return [*lines, ""]


def summary_table(payload: dict, user: str = "scribble") -> str:
  """A compact table for the README: Dice after the last interaction, per case and method, one robot user.

  The best value of each row is in bold (every value that reads the same at three decimals); the
  defaults' column is ``scribblejax``."""
  results = [r for r in payload["results"] if r["user"] == user]
  methods = [m for m in METHODS if any(r["method"] == m for r in results)]
  named = {
    "scribble": "scribbles",
    "click": "clicks",
    "box": "boxes",
    "point": "points",
    "cvpr25": "CVPR 2025 protocol",
  }
  head = f"| case, Dice@0 ({named.get(user, user)}: Dice@N) | " + " | ".join(methods) + " |"
  lines = [head, "|" + "---|" * (len(methods) + 1)]
  for case in dict.fromkeys(r["case"] for r in results):
    runs = {r["method"]: r for r in results if r["case"] == case}
    last = {m: runs[m]["dice_per_interaction"][-1] for m in methods if m in runs}
    best = _f(max(last.values()))  # as printed: every value that reads as the best is in bold
    start = next(iter(runs.values()))["dice_per_interaction"][0]
    cells = [("**" + _f(last[m]) + "**" if _f(last[m]) == best else _f(last[m])) if m in last else "-" for m in methods]
    lines.append(f"| {case} ({_f(start)}) | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_case(path: Path, case: str, results: list[dict]) -> None:
  """Dice per interaction of every method, one panel per robot user."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from scribblejax.io import fileio

  runs = [r for r in results if r["case"] == case]
  users = list(dict.fromkeys(r["user"] for r in runs))
  fig, axes = plt.subplots(1, len(users), figsize=(3.6 * len(users), 3.2), squeeze=False)
  for ax, user in zip(axes[0], users):
    for r in (r for r in runs if r["user"] == user):
      ax.plot(r["dice_per_interaction"], marker="o", ms=3, lw=2.2 if r["method"] == OURS else 1.0, label=r["method"])
    ax.set_title(f"{case}: {user}", fontsize=9)
    ax.set_xlabel("interaction")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("mean foreground Dice")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  try:
    with fileio.atomic_path(path) as tmp:
      fig.savefig(tmp, format="png", dpi=90)
  finally:
    plt.close(fig)


def write_record(out: Path, name: str, payload: dict, text: str) -> None:
  """Writes a record: ``payload`` as ``out/name.json`` and ``text`` (its markdown) as ``out/name.md``, each
  atomically (``out`` is made if need be)."""
  ev.write_json(out / f"{name}.json", payload)
  ev.write_text(out / f"{name}.md", text)


def write(out: Path, payload: dict) -> None:
  """Writes results.json, results.md and a plot per case, each atomically."""
  write_record(out, "results", payload, markdown(payload))
  for case in dict.fromkeys(r["case"] for r in payload["results"]):
    plot_case(out / f"{case}.png", case, payload["results"])


def parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.correction", description=__doc__.split("\n")[0])
  parser.add_argument(
    "--out",
    type=Path,
    default=None,
    help="output folder (default benchmarks/results/correction_<device>, or ..._quick with --quick)",
  )
  parser.add_argument("--cases", default=None, help=f"comma-separated, of: {', '.join(CASES)}")
  parser.add_argument("--users", default=None, help=f"comma-separated robot users, of: {', '.join(ROBOT_USERS)}")
  parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
  parser.add_argument("--interactions", type=int, default=None)
  parser.add_argument("--users-3d", default="scribble,cvpr25", help="robot users for 3-D cases (slower)")
  parser.add_argument("--more-users", default="box,cvpr25", help="robot users run on --more-users-cases as well")
  parser.add_argument(
    "--more-users-cases", default="nuclei2d,tissue2d", help="cases that the robot users of --more-users also correct"
  )
  parser.add_argument("--quick", action="store_true", help="3 cases, 2 robot users, 3 interactions")
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="run scribblejax with this RefineConfig setting instead of the default (repeatable), to compare a "
    "candidate; the record names it (environment.overrides)",
  )
  parser.add_argument(
    "--resume", action="store_true", help="keep the cases --out's results.json holds already and run only the others"
  )
  parser.add_argument(
    "--rewrite", action="store_true", help="write results.md and the plots of --out's results.json again (no run)"
  )
  parser.add_argument(
    "--summary",
    type=Path,
    default=None,
    metavar="RESULTS_JSON",
    help="print the README's table of a results.json (per robot user) and exit",
  )
  args = parser.parse_args(argv)
  pick = lambda given, quick, full: given.split(",") if given else list(quick if args.quick else full)
  args.cases = pick(args.cases, QUICK["cases"], CASES)
  args.users = pick(args.users, QUICK["users"], ("scribble", "click"))
  if args.quick:
    args.more_users = ""
  args.methods = args.methods.split(",")
  args.interactions = args.interactions or (QUICK["interactions"] if args.quick else 5)
  try:
    args.overrides = settings(args.set)
  except ValueError as err:
    parser.error(str(err))
  for name, given, known in (
    ("case", args.cases, CASES),
    ("robot user", args.users, ROBOT_USERS),
    ("method", args.methods, METHODS),
  ):
    unknown = [g for g in given if g not in known]
    if unknown:
      parser.error(f"unknown {name}(s) {', '.join(unknown)}; known: {', '.join(known)}")
  if args.out is None:
    device = "cpu" if ev.device_name().lower() == "cpu" else "gpu"
    args.out = Path("benchmarks/results") / f"correction_{device}{'_quick' if args.quick else ''}"
  return args


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  if args.rewrite:
    payload = json.loads((args.out / "results.json").read_text())
    payload = judged(payload)
    write(args.out, payload)
    return 0
  if args.summary is not None:
    payload = json.loads(args.summary.read_text())
    for user in dict.fromkeys(r["user"] for r in payload["results"]):
      print(summary_table(payload, user))
    return 0
  payload = {
    "environment": {**environment(argv), "overrides": args.overrides},
    "notes": {},
    "results": [],
    "verdicts": [],
  }
  config = dataclasses.replace(RefineConfig(), **args.overrides)
  started = time.perf_counter()
  if args.resume and (args.out / "results.json").is_file():
    earlier = json.loads((args.out / "results.json").read_text())
    if earlier["environment"].get("overrides", {}) != args.overrides:
      raise SystemExit(
        f"--resume: {args.out}/results.json was run with --set {earlier['environment'].get('overrides', {})}, "
        f"this run with {args.overrides}; resume with the same settings or write to another --out"
      )
    payload["results"], payload["notes"] = earlier["results"], earlier["notes"]
    payload["environment"]["resumed_from"] = earlier["environment"]
    started -= earlier.get("seconds", 0.0)
  for name in args.cases:
    if any(r["case"] == name for r in payload["results"]):
      continue
    bench = CASES[name]()
    payload["notes"][name] = bench.note
    users = args.users_3d.split(",") if bench.case.truth.ndim == 3 and not bench.squeeze else list(args.users)
    if name in args.more_users_cases.split(","):
      users += [u for u in args.more_users.split(",") if u and u not in users]
    for user in users:
      for method in args.methods:
        try:
          result = run_one(bench, method, user, args.interactions, log=print, config=config)
        except ImportError as err:  # a peer whose library is missing: said, not hidden
          print(f"{name} / {user} / {method}: skipped: {err}", flush=True)
          payload.setdefault("skipped", []).append({"case": name, "user": user, "method": method, "why": str(err)})
          continue
        payload["results"].append(result)
        print(
          f"{name:20s} {user:8s} {method:14s} "
          + " ".join(_f(d) for d in result["dice_per_interaction"])
          + f"  unsat={result['rounds_unsatisfied']}",
          flush=True,
        )
    payload = judged(payload)
    payload["seconds"] = time.perf_counter() - started
    write(args.out, payload)  # after every case: a long run leaves what it measured
  payload = judged(payload)
  payload["seconds"] = time.perf_counter() - started
  write(args.out, payload)
  print(f"wrote {args.out}/results.json, results.md and a plot per case ({payload['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
