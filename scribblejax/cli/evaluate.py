"""``scribblejax evaluate``: run an experiment, or one case with the simulated user."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

from scribblejax.app import check_outputs
from scribblejax.cli import flags
from scribblejax.models import surgery
from scribblejax.pipeline import resolve_layers
from scribblejax.research import baselines as bl
from scribblejax.research import evaluate as ev
from scribblejax.research.evaluate_image import file_case, pipeline_method, pipeline_summary
from scribblejax.research.simulate import ROBOT_USERS

# the refinement settings one case takes (the table's "evaluate" rows: scribblejax.app.settings.SETTINGS)
EVALUATE_SETTINGS = flags.settings_of("evaluate")


def _user_case(args, backbone, model, layers):
  """The case given by ``--image``/``--label`` and the model's pipeline on its image: ``(case, pipeline)``."""
  return file_case(args.image, args.label, backbone, model, layers, flags.inference_options(args), args.add_classes)


def _example(image: np.ndarray):
  """A one-image batch's shape and dtype, for tracing a model's layer order."""
  return jax.ShapeDtypeStruct((1, *image.shape), np.float32)


def _noc_text(result: dict) -> str:
  """``NoC@0.85 2, NoC@0.9 5+`` ('+': not reached within the interactions run)."""
  reached = result.get("noc_reached", {})
  return ", ".join(f"NoC@{tau} {n}{'' if reached.get(tau, True) else '+'}" for tau, n in result["noc"].items())


def _single_case(args) -> int:
  if args.interactions < 0:
    raise ValueError(f"--interactions must be >= 0, got {args.interactions}")
  if args.add_classes < 0:
    raise ValueError(f"--add-classes must be >= 0, got {args.add_classes}")
  if args.crop is not None and args.crop < 1:
    raise ValueError(f"--crop must be >= 1, got {args.crop}")
  if (args.image is None) != (args.label is None):
    raise ValueError("give both --image and --label")
  if args.image is None and args.task is None:
    raise ValueError("give --experiment NAME, --task NAME, or --image FILE --label FILE")
  if args.image is not None and args.model is None:
    raise ValueError("a case given by --image/--label needs --model NAME_OR_PATH")
  if args.image is not None and (args.task is not None or args.crop is not None):
    raise ValueError(
      f"{'--task' if args.task is not None else '--crop'} names a built-in case; a case given by "
      "--image/--label takes neither"
    )
  if args.image is not None:
    check_outputs([Path(args.out) / f"results.{ext}" for ext in ("json", "md", "png")], [args.image, args.label])
  if args.layers is not None and args.layers < 1:
    raise ValueError(f"--layers must be >= 1, got {args.layers}")
  if args.max_steps is not None and args.max_steps < 0:
    raise ValueError(f"--steps must be >= 0, got {args.max_steps}")
  pipeline_flags = [flags.flag_of(k) for k, v in PIPELINE_FLAGS.items() if getattr(args, k) != v]
  if args.image is None and pipeline_flags:
    raise ValueError(
      f"{', '.join(pipeline_flags)} set(s) how the network sees a case given by --image/--label; "
      "a built-in --task is fed whole"
    )
  backbone = ev.resolve_backbone(args.model, args.task)
  model = surgery.add_classes(backbone.model, args.add_classes) if args.add_classes else backbone.model
  # appended after the network's own classes: the round's merge does not protect against them
  new_classes = tuple(range(backbone.num_classes, backbone.num_classes + args.add_classes))
  # as refine resolves them: the flags, else the model's stored defaults (model.json metadata.refine), else
  # the library's; the layers at most the model's
  metadata = getattr(backbone.info, "metadata", None) or {}
  settings = flags.refine_settings(args, "evaluate", preset="paper" if args.method == "paper" else args.preset)
  layers, config, grow = settings.resolve(metadata)
  pipe = None
  if args.image is not None:
    case, pipe = _user_case(args, backbone, model, layers if args.method in ("refine", "paper") else 1)
    method = pipeline_method(args.method, pipe, config, new_classes)
    layers = pipe.layers
  else:
    case = ev.task_case(args.task, backbone, args.crop)
    if args.add_classes:
      case = case._replace(
        num_classes=case.num_classes + args.add_classes,
        class_names=case.class_names + tuple(f"added {c}" for c in range(args.add_classes)),
      )
    if layers is None:
      layers = resolve_layers(model, _example(case.image), None)
    method = bl.make_method(args.method, model, layers=layers, config=config, new_classes=new_classes)
  eval_config = ev.EvalConfig(interactions=args.interactions, mark_kind=args.marks, region_growing=grow or 0.0)
  result = ev.run_case(case, method, eval_config, log=lambda line: print(f"warning: {line}", file=sys.stderr))
  result.update(
    {
      "model": backbone.name,
      "device": ev.device_name(),
      "layers": layers,
      "max_steps": config.max_steps,
      "learning_rate": config.learning_rate,
      "prox_weight": config.prox_weight,
      "momentum": config.momentum,
      "keep_weight": config.keep_weight,
      "optimizer": str(config.optimizer or "sgd"),
      "progressive_merge": config.progressive_merge,
      "preset": args.preset,
      "added_classes": args.add_classes,
      "task": args.task,
      "image": args.image,
      "label": args.label,
    }
  )
  if pipe is not None:
    result["pipeline"] = pipeline_summary(pipe)
  out = Path(args.out)
  ev.write_json(out / "results.json", result)
  ev.write_text(
    out / "results.md",
    f"# scribblejax evaluate: {case.name}\n\n"
    + ev.results_table([result])
    + f"\nmodel: {backbone.name}; device: {result['device']}\n",
  )
  ev.plot_curves(
    out / "results.png",
    {result["method"]: result["dice_per_interaction"]},
    title=f"{case.name}: {result['method']}, {args.marks}",
  )
  dice = " ".join(f"{d:.3f}" if d is not None else "nan" for d in result["dice_per_interaction"])
  rounds = len(result["satisfied"])
  honoured = (
    "the segmentation honoured every mark in every round"
    if not result["rounds_unsatisfied"]
    else f"{result['rounds_unsatisfied']} of {rounds} round(s) ended with marks the segmentation does not honour"
  )
  if result["network_unsatisfied"]:
    honoured += f"; the network itself left marks unhonoured in {result['network_unsatisfied']} round(s)"
  stop = f"; stopped: {result['stop_reason']}" if result["stop_reason"] not in (None, "perfect") else ""
  print(
    f"{case.name} {result['method']} ({args.marks}): Dice per interaction {dice}; "
    f"{_noc_text(result)}; {honoured}{stop}; wrote {out / 'results.json'}"
  )
  return 0


# How the network sees a case given by files (their defaults): refused beside --task and --experiment.
PIPELINE_FLAGS = {
  "no_resample": False,
  "no_crop": False,
  "mirror": False,
  "patch_size": "auto",
  "patch_step": 0.5,
  "patch_batch": "auto",
}
# Flags of one case (their defaults): an experiment sets these itself, so they are refused beside it.
SINGLE_CASE_FLAGS = {
  "task": None,
  "image": None,
  "label": None,
  "marks": "scribble",
  "interactions": 5,
  "add_classes": 0,
  "method": "refine",
  **{field: flags.setting_default(field) for field in EVALUATE_SETTINGS},
  "crop": None,
  **PIPELINE_FLAGS,
}


def run(args: argparse.Namespace) -> int:
  """Runs ``evaluate``: the experiments named, else one case; returns the exit status."""
  if args.experiment:
    given = [flags.flag_of(k) for k, v in SINGLE_CASE_FLAGS.items() if getattr(args, k) != v]
    if given:
      raise ValueError(
        f"{', '.join(given)} set(s) one case and does not apply to --experiment, whose settings "
        "come from --size; leave it out, or run one case with --task or --image/--label"
      )
    from scribblejax.research.experiments import EXPERIMENTS, run_experiments  # only for experiments

    names = args.experiment.split(",")
    if names == ["all"]:
      names = list(EXPERIMENTS)
    run_experiments(names, args.out, args.size, args.model, args.tissue_model)
    return 0
  return _single_case(args)


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers ``evaluate`` on an ``argparse`` subparsers object."""
  parser = subparsers.add_parser(
    "evaluate",
    help="simulated-user evaluation: an experiment, a built-in task or your own image and label",
    description="Runs an experiment (--experiment NAME[,NAME...] or all) or one case: a built-in task "
    "(--task) or --image FILE --label FILE (NIfTI, TIFF, PNG, NRRD) with --model. Writes "
    "OUT/results.json, results.md and results.png (experiments: OUT/NAME.{json,md,png}). An "
    "experiment takes only --size, --model, --tissue-model and --out.",
  )
  parser.add_argument("--experiment", default=None, help="experiment name(s), comma-separated, or 'all'")
  parser.add_argument("--size", default="small", choices=("tiny", "small", "full"), help="experiment size preset")
  one = SINGLE_CASE_FLAGS  # one case only: refused beside --experiment
  parser.add_argument("--task", default=one["task"], choices=ev.TASKS)
  parser.add_argument("--image", default=one["image"])
  parser.add_argument("--label", default=one["label"])
  parser.add_argument("--model", default=None, help="built-in model name or saved model folder")
  parser.add_argument("--tissue-model", default=None, help="tissue backbone for experiments")
  parser.add_argument(
    "--marks",
    choices=ROBOT_USERS,
    default=one["marks"],
    help="the robot user: scribble, point, box, click (RITM: one click per interaction) or cvpr25 (a box, then clicks)",
  )
  parser.add_argument("--interactions", type=int, default=one["interactions"])
  parser.add_argument(
    "--add-classes", type=int, default=one["add_classes"], help="append K output classes for labels >= the model's"
  )
  parser.add_argument("--method", choices=bl.METHODS, default=one["method"])
  method = parser.add_argument_group(
    "refinement settings", "defaults: the model's stored settings (model.json metadata.refine), else the preset's"
  )
  flags.add_settings(method, "evaluate")
  parser.add_argument("--crop", type=int, default=one["crop"], help="centre crop of a built-in task's image")
  parser.add_argument("--out", default="evaluate_output")
  patches = flags.add_inference(parser)
  patches.description = (
    "--image/--label cases only: how the network sees the image, as predict and refine run "
    "it (nnU-Net's pipeline); the simulated user marks, and Dice is measured, on the image's "
    "own grid"
  )
  flags.add_patch_batch(patches)
  parser.set_defaults(func=run)
  return parser
