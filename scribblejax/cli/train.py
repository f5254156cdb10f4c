"""``scribblejax train``: train a built-in task's backbone and save it as a model folder."""

from __future__ import annotations

import argparse
import dataclasses


def run(args: argparse.Namespace) -> int:
  """Trains the task's backbone and saves it; returns the exit status."""
  from scribblejax.research.train import TASK_NAMES, tasks, train_task

  if args.task not in TASK_NAMES:
    raise ValueError(f"unknown task {args.task!r}; known tasks: {', '.join(TASK_NAMES)}")
  defaults = tasks()[args.task].config
  overrides = {
    "steps": args.steps,
    "seed": args.seed,
    "batch_size": args.batch_size,
    "crop": args.crop,
    "learning_rate": args.learning_rate,
    "intensity": args.intensity,
    "dice_weight": args.dice_weight,
  }
  config = dataclasses.replace(
    defaults, **{k: v for k, v in overrides.items() if v is not None}, **({"flips": False} if args.no_flips else {})
  )
  train_task(
    args.task,
    args.out,
    config=config,
    progress=not args.no_progress,
    checkpoint_dir=args.checkpoint_dir,
    overwrite=args.overwrite,
  )
  return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers ``train`` on an ``argparse`` subparsers object."""
  parser = subparsers.add_parser(
    "train",
    help="train a backbone on a built-in task (nuclei2d, tissue2d, tissue3d) and save it",
    description="Trains a U-Net on the training split of a vendored dataset (optax Adam, random crops, flips, "
    "intensity augmentation, fixed seed), reports the Dice per class on the test split and writes "
    "a model folder (model.json + orbax checkpoint) that load_model and --model accept.",
  )
  parser.add_argument("--task", required=True, help="nuclei2d, tissue2d or tissue3d")
  parser.add_argument("--out", required=True, help="model folder to write")
  parser.add_argument("--steps", type=int, help="Adam steps (default: the task's)")
  parser.add_argument("--seed", type=int, help="seed of initialisation, crops and augmentation (default 0)")
  parser.add_argument("--batch-size", type=int, help="crops per step (default: the task's)")
  parser.add_argument("--crop", type=int, help="crop size per spatial axis (default: the task's)")
  parser.add_argument("--learning-rate", type=float, help="Adam learning rate (default: the task's)")
  parser.add_argument("--intensity", type=float, help="random intensity scale/shift amplitude (default: the task's)")
  parser.add_argument("--dice-weight", type=float, help="soft Dice loss weight (default: the task's)")
  parser.add_argument("--no-flips", action="store_true", help="no random flips")
  parser.add_argument("--checkpoint-dir", help="write/resume orbax checkpoints of the training state here")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.set_defaults(func=run)
  return parser
