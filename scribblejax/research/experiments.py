"""The seed paper's experiments, run by the harness of :mod:`scribblejax.research.evaluate`.

Each experiment writes ``NAME.json``, ``NAME.md`` (a table) and ``NAME.png`` (a plot) into the output
folder, atomically, labelled with the machine and the size preset:

====================  =================================================================================
``dice``              (i) Dice per interaction, every method (initial, random walker, head, last l layers)
``multiclass``        (ii) classes marked and corrected per interaction (multi-class tissue; nuclei if
                      no tissue backbone)
``missed_class``      (iii) a class the network misses entirely (its head bias lowered by the least amount
                      that removes it on this image, stated as such), inserted by marks
``new_class``         (iv) a structure never trained for ("large nuclei", area >= 75th percentile), by
                      appending an output class to the head (:func:`scribblejax.models.surgery.add_classes`)
``shift``             (v) DSB nuclei backbone on synthetic 3D nuclei planes; tissue backbone on an
                      intensity/contrast-shifted MNI slice
``mark_types``        (vi) scribble vs point vs box: NoC (the seed's Table 4)
``region_growing``    (vii) short scribbles with region growing off and on (the seed's Fig. 6)
``steps_layers``      (viii) steps M and tunable layers l (the seed's Figs. 4-5)
``optimizer_sweep``   (viii) learning rate x proximal weight x momentum: Dice per interaction and
                      satisfied rate
====================  =================================================================================

Size presets: ``tiny`` (tests: 48x48 crops, 1 interaction, 5 steps), ``small`` (CPU: 96x96 crops,
3 interactions, 40 steps, reduced grids), ``full`` (the whole test crops, 5 interactions, 100 steps,
full grids; meant for a GPU, see ``benchmarks/gpu_experiments.sh``).

Run everything:  ``python -m scribblejax.research.experiments --all --size full --out benchmarks/results/experiments``
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from scribblejax.config import RefineConfig
from scribblejax.models import surgery
from scribblejax.research import baselines as bl
from scribblejax.research import evaluate as ev


@dataclasses.dataclass(frozen=True)
class Size:
  """A size preset."""

  name: str
  crop: Any  # centre crop of 2D cases (None: whole test image)
  crop3d: Any  # centre crop of 3D cases
  interactions: int
  max_steps: int
  layers: int = 5
  steps_grid: tuple[int, ...] = (10, 30, 100)
  layers_grid: tuple[int, ...] = (1, 3, 5, 7)
  lr_grid: tuple[float, ...] = (0.01, 0.05)
  prox_grid: tuple[float, ...] = (0.01, 1.0)
  momentum_grid: tuple[float, ...] = (0.9,)
  growing: tuple[float, ...] = (0.0, 0.05)


SIZES = {
  "tiny": Size(
    "tiny",
    48,
    (8, 32, 32),
    1,
    5,
    layers=3,
    steps_grid=(2, 5),
    layers_grid=(1, 3),
    lr_grid=(0.01, 0.05),
    prox_grid=(1.0,),
    momentum_grid=(0.9,),
    growing=(0.0, 0.05),
  ),
  "small": Size(
    "small",
    96,
    (12, 48, 48),
    3,
    40,
    steps_grid=(10, 40),
    layers_grid=(1, 3, 5),
    lr_grid=(0.01, 0.05),
    prox_grid=(0.01, 1.0),
    momentum_grid=(0.9,),
  ),
  "full": Size(
    "full",
    None,
    None,
    5,
    100,
    steps_grid=(10, 20, 50, 100, 150),
    layers_grid=(1, 2, 3, 5, 7, 9),
    lr_grid=(0.003, 0.01, 0.03, 0.05, 0.1),
    prox_grid=(0.01, 0.1, 1.0),
    momentum_grid=(0.0, 0.9),
    growing=(0.0, 0.02, 0.05, 0.1),
  ),
}


@dataclasses.dataclass(frozen=True)
class Context:
  """What every experiment needs: output folder, size, backbones."""

  out: Path
  size: Size
  nuclei: ev.Backbone
  tissue: ev.Backbone | None  # None: no tissue backbone available (tissue parts are skipped, said so)
  log: Callable = print

  def config(self, **kw) -> RefineConfig:
    return RefineConfig.paper(max_steps=kw.pop("max_steps", self.size.max_steps), **kw)

  def eval_config(self, **kw) -> ev.EvalConfig:
    return ev.EvalConfig(interactions=kw.pop("interactions", self.size.interactions), **kw)

  def crop(self, task: str):
    return self.size.crop3d if task == "tissue3d" else self.size.crop

  def case(self, task: str) -> ev.Case:
    backbone = self.nuclei if task.startswith("nuclei") else self.tissue
    return ev.task_case(task, backbone, self.crop(task))

  def backbone(self, task: str) -> ev.Backbone:
    return self.nuclei if task.startswith("nuclei") else self.tissue

  def tasks(self, *wanted: str) -> list[str]:
    return [t for t in wanted if t.startswith("nuclei") or self.tissue is not None]


def _payload(ctx: Context, name: str, description: str, results: list[dict], **extra) -> dict:
  return {
    "experiment": name,
    "description": description,
    "size": ctx.size.name,
    "device": ev.device_name(),
    "nuclei_model": ctx.nuclei.name,
    "tissue_model": ctx.tissue.name if ctx.tissue else None,
    "skipped": None if ctx.tissue else "tissue parts skipped: no tissue backbone (tissue2d not shipped)",
    "max_steps": ctx.size.max_steps,
    "layers": ctx.size.layers,
    "results": results,
    **extra,
  }


def _write(
  ctx: Context,
  name: str,
  description: str,
  results: list[dict],
  title: str,
  payload_extra: dict | None = None,
  **write_kwargs,
) -> dict:
  """Writes ``<name>.{json,md,png}`` under ``ctx.out`` (see :func:`evaluate.write_results`); returns the payload."""
  payload = _payload(ctx, name, description, results, **(payload_extra or {}))
  ev.write_results(ctx.out, name, payload, results, title=title, **write_kwargs)
  return payload


def _standard_methods(ctx: Context, model) -> list[bl.Method]:
  cfg = ctx.config()
  return [
    bl.initial_method(model),
    bl.random_walker_method(model),
    bl.refine_method(model, "head", cfg),
    bl.refine_method(model, ctx.size.layers, cfg),
    _keep_method(ctx, model),
  ]


def _keep_method(ctx: Context, model) -> bl.Method:
  """Last-l refinement plus the optional keep term (not in the paper; ``RefineConfig.keep_weight``)."""
  return bl.refine_method(
    model, ctx.size.layers, dataclasses.replace(ctx.config(), keep_weight=1.0), name=f"refine_l{ctx.size.layers}_keep"
  )


def exp_dice(ctx: Context) -> dict:
  """(i) Dice per interaction for every method, per task."""
  results = []
  for task in ctx.tasks("nuclei2d", "tissue2d"):
    case = ctx.case(task)
    for m in _standard_methods(ctx, ctx.backbone(task).model):
      results.append(ev.run_case(case, m, ctx.eval_config()))
      ctx.log(f"  dice {task} {m.name}: {np.round(results[-1]['dice_per_interaction'], 3).tolist()}")
  desc = (
    "Dice per interaction (mean foreground Dice) for each method on the same case, each fed by the "
    "same deterministic simulated user (scribbles); marks after interaction 1 depend on each method's "
    "own prediction."
  )
  return _write(ctx, "dice", desc, results, "(i) Dice per interaction")


def exp_multiclass(ctx: Context) -> dict:
  """(ii) Several classes corrected in one interaction."""
  task = "tissue2d" if ctx.tissue is not None else "nuclei2d"
  case = ctx.case(task)
  results = [
    ev.run_case(case, bl.refine_method(ctx.backbone(task).model, ctx.size.layers, ctx.config()), ctx.eval_config())
  ]
  r = results[0]
  rows = []
  for i, (marked, corrected) in enumerate(zip(r["classes_marked"], r["classes_corrected"]), start=1):
    rows.append(
      {
        "interaction": i,
        "marked": ",".join(map(str, marked)),
        "n_marked": len(marked),
        "corrected": ",".join(map(str, corrected)),
        "n_corrected": len(corrected),
        **{f"dice_{c}": r["dice_per_class"][i][c] for c in range(case.num_classes)},
      }
    )
  cols = ["interaction", "marked", "n_marked", "corrected", "n_corrected"] + [
    f"dice_{c}" for c in range(case.num_classes)
  ]
  table = ev.markdown_table(rows, cols) + (
    f"\nclasses: {', '.join(f'{c}={n}' for c, n in enumerate(case.class_names))}. "
    "'corrected': per-class Dice rose by >= 0.01 in that interaction.\n"
  )
  desc = f"Several classes marked and corrected in one interaction ({task}, one mark per class with errors)."
  curves = {case.class_names[c]: [d[c] for d in r["dice_per_class"]] for c in range(case.num_classes)}
  return _write(
    ctx,
    "multiclass",
    desc,
    results,
    f"(ii) per-class Dice per interaction ({task})",
    {"rows": rows, "task": task},
    table=table,
    curves=curves,
    ylabel="Dice",
  )


def exp_missed_class(ctx: Context) -> dict:
  """(iii) A class the network misses entirely, inserted by marks."""
  results, notes = [], []
  for task, c in [("nuclei2d", 1)] + ([("tissue2d", 1)] if ctx.tissue is not None else []):
    case = ctx.case(task)
    model = ctx.backbone(task).model
    amount = ev.suppression_amount(model, case.image, c)
    missing = surgery.suppress_class(model, c, amount=amount)
    notes.append(
      f"{task}: class {c} ({case.class_names[c]}) removed by lowering its head bias by {amount:.2f} "
      "(the least amount that removes it on this image, plus 1)"
    )
    for m in [
      bl.random_walker_method(missing),
      bl.refine_method(missing, "head", ctx.config()),
      bl.refine_method(missing, ctx.size.layers, ctx.config()),
    ]:
      r = ev.run_case(case, m, ctx.eval_config())
      r["missed_class"] = c
      r["missed_class_dice"] = [d[c] for d in r["dice_per_class"]]
      results.append(r)
  desc = (
    "A class missed entirely by the initial prediction, inserted by marks. The miss is PRODUCED: the "
    "class's head bias is lowered (see notes); the proximal term anchors to the lowered weights. " + " ".join(notes)
  )
  curves = {f"{r['case']} {r['method']}": r["missed_class_dice"] for r in results}
  return _write(
    ctx,
    "missed_class",
    desc,
    results,
    "(iii) Dice of the missed class per interaction",
    {"notes": notes},
    curves=curves,
    ylabel="Dice of the missed class",
  )


def new_class_case(ctx: Context, percentile: float = 75.0) -> ev.Case:
  """DSB test crop with a third class "large nucleus": nuclei whose area (in the whole field) is at least
  the ``percentile`` of all nuclei areas. The binary backbone never saw this distinction."""
  from scribblejax.pipeline.normalization import normalize
  from scribblejax.research import data

  ds = data.nuclei2d("binary")
  _, instances = data.nuclei_instances()
  areas = np.bincount(instances.ravel())
  cut = np.percentile(areas[1:], percentile)
  ids = np.arange(len(areas))
  large = np.isin(instances, ids[1:][areas[1:] >= cut])
  truth = np.where(instances > 0, np.where(large, 2, 1), 0).astype(np.int32)
  image, truth = ev.centre_crop([ds.image[ds.test], truth[ds.test]], ctx.size.crop, 2)
  return ev.make_case(
    "nuclei2d_large", normalize(image, ctx.nuclei.normalization), truth, 3, ("background", "nucleus", "large nucleus")
  )


def exp_new_class(ctx: Context) -> dict:
  """(iv) A structure never trained for, via an appended output class."""
  case = new_class_case(ctx)
  model = surgery.add_classes(ctx.nuclei.model, 1)
  results = []
  for m in [
    bl.initial_method(model),
    bl.random_walker_method(model),
    bl.refine_method(model, "head", ctx.config(), new_classes=(2,)),
    bl.refine_method(model, ctx.size.layers, ctx.config(), new_classes=(2,)),
  ]:
    r = ev.run_case(case, m, ctx.eval_config())
    r["new_class_dice"] = [d[2] for d in r["dice_per_class"]]
    results.append(r)
  desc = (
    "A class the backbone never learnt: 'large nucleus' (DSB nuclei with area >= the 75th percentile of "
    "all nuclei areas; defined from the instance mask). The binary backbone gets a third output channel by "
    "add_classes (a copy of the background channel with its bias lowered by 4, so the initial prediction "
    "is unchanged and never contains the class); the user marks it like any class."
  )
  curves = {r["method"]: r["new_class_dice"] for r in results}
  return _write(
    ctx,
    "new_class",
    desc,
    results,
    "(iv) Dice of the appended class 'large nucleus'",
    curves=curves,
    ylabel="Dice of the new class",
  )


def exp_shift(ctx: Context) -> dict:
  """(v) Distribution shift."""
  results = []
  for task in ctx.tasks("nuclei3d_slices", "tissue2d_shifted"):
    case = ctx.case(task)
    model = ctx.backbone(task).model
    for m in [
      bl.initial_method(model),
      bl.random_walker_method(model),
      bl.refine_method(model, ctx.size.layers, ctx.config()),
      _keep_method(ctx, model),
    ]:
      results.append(ev.run_case(case, m, ctx.eval_config()))
  desc = (
    "Distribution shift: the 2D DSB nuclei backbone on three planes of the synthetic 3D nuclei "
    "(z = 8, 15, 22, side by side; a different imaging source); the tissue backbone on an MNI test slice "
    "after a gamma-0.6 contrast change and a +-20% intensity ramp (evaluate.shift_intensity)."
  )
  return _write(ctx, "shift", desc, results, "(v) distribution shift")


def exp_mark_types(ctx: Context) -> dict:
  """(vi) Scribble vs point vs box."""
  results = []
  for task in ctx.tasks("nuclei2d", "tissue2d"):
    case = ctx.case(task)
    for kind in ("scribble", "point", "box"):
      method = bl.refine_method(ctx.backbone(task).model, ctx.size.layers, ctx.config())
      results.append(ev.run_case(case, method, ctx.eval_config(mark_kind=kind)))
  desc = "Mark types: interactions needed (NoC) and Dice per interaction with scribbles, points (radius 1) and boxes."
  return _write(ctx, "mark_types", desc, results, "(vi) mark types")


def exp_region_growing(ctx: Context) -> dict:
  """(vii) Region growing off and on with short scribbles."""
  results = []
  for task in ctx.tasks("nuclei2d", "tissue2d"):
    case = ctx.case(task)
    for t in ctx.size.growing:
      method = bl.refine_method(ctx.backbone(task).model, ctx.size.layers, ctx.config())
      r = ev.run_case(case, method, ctx.eval_config(max_length=5, region_growing=t))
      r["method"] = f"refine T={t:g}"
      results.append(r)
  desc = (
    "Short scribbles (at most 5 skeleton pixels) with region growing off (T=0) and on (T in normalised "
    "intensity units; growth of at most 20 pixel layers)."
  )
  return _write(ctx, "region_growing", desc, results, "(vii) region growing, short scribbles")


def _final_row(r: dict, **keys) -> dict:
  info = r["method_info"]
  return {
    **keys,
    "dice_0": r["dice_per_interaction"][0],
    "dice_N": r["dice_per_interaction"][-1],
    "mean_dice": float(np.mean(r["dice_per_interaction"][1:])) if len(r["dice_per_interaction"]) > 1 else None,
    "satisfied_rate": float(np.mean([i["satisfied"] for i in info])) if info else None,
    "mean_steps": float(np.mean([i["steps"] for i in info])) if info else None,
    "s_per_interaction": r["mean_seconds"],
  }


FINAL_COLUMNS = ["dice_0", "dice_N", "mean_dice", "satisfied_rate", "mean_steps", "s_per_interaction"]
FINAL_NOTE = (
  "\ndice_N: after the last interaction; mean_dice: mean over interactions 1..N; satisfied_rate: share "
  "of interactions whose refinement honoured every mark.\n"
)


def _write_rows(
  ctx: Context,
  name: str,
  description: str,
  results: list[dict],
  rows: list[dict],
  keys: list[str],
  title: str,
  note: str = FINAL_NOTE,
  **extra,
) -> dict:
  """Writes an experiment whose table has one :func:`_final_row` per run (``keys`` first)."""
  table = ev.markdown_table(rows, keys + FINAL_COLUMNS) + note
  return _write(ctx, name, description, results, title, {"rows": rows, **extra}, table=table)


def exp_steps_layers(ctx: Context) -> dict:
  """(viii) Steps M and tunable layers l."""
  results, rows = [], []
  for task in ctx.tasks("nuclei2d", "tissue2d"):
    case = ctx.case(task)
    model = ctx.backbone(task).model
    for m_steps in ctx.size.steps_grid:
      r = ev.run_case(case, bl.refine_method(model, ctx.size.layers, ctx.config(max_steps=m_steps)), ctx.eval_config())
      r["method"] = f"M={m_steps} l={ctx.size.layers}"
      results.append(r)
      rows.append(_final_row(r, task=task, M=m_steps, l=ctx.size.layers))
    for layers in ctx.size.layers_grid:
      r = ev.run_case(case, bl.refine_method(model, layers, ctx.config()), ctx.eval_config())
      r["method"] = f"M={ctx.size.max_steps} l={layers}"
      results.append(r)
      rows.append(_final_row(r, task=task, M=ctx.size.max_steps, l=layers))
  return _write_rows(
    ctx,
    "steps_layers",
    "Steps M and number of tunable last layers l.",
    results,
    rows,
    ["task", "M", "l"],
    "(viii) steps M and layers l",
  )


def exp_optimizer_sweep(ctx: Context) -> dict:
  """(viii) Learning rate x proximal weight x momentum."""
  results, rows = [], []
  for task in ctx.tasks("nuclei2d", "tissue2d"):
    case = ctx.case(task)
    model = ctx.backbone(task).model
    for lr in ctx.size.lr_grid:
      for prox in ctx.size.prox_grid:
        for mom in ctx.size.momentum_grid:
          cfg = ctx.config(learning_rate=lr, prox_weight=prox, momentum=mom)
          r = ev.run_case(case, bl.refine_method(model, ctx.size.layers, cfg), ctx.eval_config())
          r["method"] = f"lr={lr:g} a={prox:g} m={mom:g}"
          results.append(r)
          rows.append(_final_row(r, task=task, lr=lr, prox=prox, momentum=mom))
  # rank settings by mean Dice over interactions 1..N averaged over tasks, ties by satisfied rate
  by_setting: dict[tuple, list] = {}
  for row in rows:
    by_setting.setdefault((row["lr"], row["prox"], row["momentum"]), []).append(row)
  ranking = sorted(
    (
      {
        "lr": k[0],
        "prox": k[1],
        "momentum": k[2],
        "mean_dice": float(np.mean([r["mean_dice"] for r in v])),
        "min_dice_N": float(np.min([r["dice_N"] for r in v])),
        "satisfied_rate": float(np.mean([r["satisfied_rate"] for r in v])),
      }
      for k, v in by_setting.items()
    ),
    key=lambda d: (-d["mean_dice"], -d["satisfied_rate"]),
  )
  note = (
    FINAL_NOTE
    + "\n## Ranking (mean over tasks)\n\n"
    + ev.markdown_table(ranking, ["lr", "prox", "momentum", "mean_dice", "min_dice_N", "satisfied_rate"])
  )
  return _write_rows(
    ctx,
    "optimizer_sweep",
    f"SGD learning rate x proximal weight alpha x momentum, l={ctx.size.layers}, M={ctx.size.max_steps}.",
    results,
    rows,
    ["task", "lr", "prox", "momentum"],
    "(viii) optimiser sweep",
    note,
    ranking=ranking,
    best=ranking[0] if ranking else None,
  )


def exp_precision(ctx: Context) -> dict:
  """bf16 compute (``RefineConfig.compute_dtype``) against float32, same simulated user."""
  results, rows = [], []
  for task in ctx.tasks("nuclei2d", "tissue2d", "tissue2d_shifted"):
    case = ctx.case(task)
    model = ctx.backbone(task).model
    for dtype in ("float32", "bfloat16"):
      cfg = ctx.config(compute_dtype=dtype)
      r = ev.run_case(
        case,
        bl.refine_method(model, ctx.size.layers, cfg, name=f"refine_l{ctx.size.layers}_{dtype}"),
        ctx.eval_config(),
      )
      results.append(r)
      rows.append(_final_row(r, task=task, compute_dtype=dtype))
      ctx.log(f"  precision {task} {dtype}: {np.round(r['dice_per_interaction'], 3).tolist()}")
  note = FINAL_NOTE + (
    "\nSame case, same simulated user; marks after interaction 1 depend on each run's own "
    "prediction. Parameters, gradients and the loss stay float32 in both.\n"
  )
  return _write_rows(
    ctx,
    "precision",
    "float32 against bfloat16 compute (parameters float32).",
    results,
    rows,
    ["task", "compute_dtype"],
    "bf16 compute against float32",
    note,
  )


EXPERIMENTS = {
  "dice": exp_dice,
  "multiclass": exp_multiclass,
  "missed_class": exp_missed_class,
  "new_class": exp_new_class,
  "shift": exp_shift,
  "mark_types": exp_mark_types,
  "region_growing": exp_region_growing,
  "steps_layers": exp_steps_layers,
  "optimizer_sweep": exp_optimizer_sweep,
  "precision": exp_precision,
}


def make_context(
  out: str | Path, size: str = "small", nuclei_model: str | None = None, tissue_model: str | None = None, log=print
) -> Context:
  """Resolves the backbones: the given names/folders, else the built-in ones (nuclei2d has a trained
  fallback; without a tissue backbone the tissue parts are skipped and say so)."""
  if size not in SIZES:
    raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
  nuclei = ev.resolve_backbone(nuclei_model, "nuclei2d")
  if tissue_model == "none":
    return Context(Path(out), SIZES[size], nuclei, None, log)
  try:
    tissue = ev.resolve_backbone(tissue_model, "tissue2d")
  except ValueError:
    if tissue_model is not None:
      raise
    tissue = None
  return Context(Path(out), SIZES[size], nuclei, tissue, log)


def run_experiments(
  names,
  out: str | Path,
  size: str = "small",
  nuclei_model: str | None = None,
  tissue_model: str | None = None,
  log=print,
) -> dict:
  """Runs the named experiments (a name, or a sequence of names); returns ``{name: payload}``."""
  names = [names] if isinstance(names, str) else list(names)
  unknown = [n for n in names if n not in EXPERIMENTS]
  if unknown:
    raise ValueError(f"unknown experiment(s) {unknown}; known: {', '.join(EXPERIMENTS)}")
  ctx = make_context(out, size, nuclei_model, tissue_model, log)
  done = {}
  for name in names:
    start = time.perf_counter()
    done[name] = EXPERIMENTS[name](ctx)
    log(f"{name}: done in {time.perf_counter() - start:.1f}s -> {ctx.out / name}.{{json,md,png}}")
  return done


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m scribblejax.research.experiments",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("names", nargs="*", help=f"experiments ({', '.join(EXPERIMENTS)})")
  parser.add_argument("--all", action="store_true", help="run every experiment")
  parser.add_argument("--size", default="small", choices=sorted(SIZES))
  parser.add_argument("--out", default="benchmarks/results/experiments")
  parser.add_argument("--nuclei-model", default=None, help="nuclei backbone (default: built-in nuclei2d)")
  parser.add_argument(
    "--tissue-model", default=None, help="tissue backbone (default: built-in tissue2d; 'none' skips tissue parts)"
  )
  args = parser.parse_args(argv)
  names = list(EXPERIMENTS) if args.all else args.names
  if not names:
    parser.error("name experiments or pass --all")
  try:
    run_experiments(names, args.out, args.size, args.nuclei_model, args.tissue_model)
  except (ValueError, OSError) as err:  # bad input: 1, like the scribblejax command (2: argparse's usage errors)
    print(f"experiments: error: {err}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
