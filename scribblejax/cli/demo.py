"""``scribblejax demo``: the README's main command."""

from __future__ import annotations

import argparse

from scribblejax.cli import flags
from scribblejax.config import RefineConfig


def run(args: argparse.Namespace) -> int:
  """Runs the demo; returns the exit status."""
  from scribblejax.research.demo import run_demo  # trains a backbone when no weights ship: only when run

  given = {k: v for k in ("max_steps", "keep_weight") if (v := getattr(args, k)) is not None}
  config = RefineConfig.paper(**given) if args.preset == "paper" else RefineConfig(**given)
  run_demo(
    args.out,
    task=args.task,
    train_steps=args.train_steps,
    interactions=args.interactions,
    kind=args.marks,
    layers=args.layers,
    config=config,
  )
  return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers ``demo`` on an ``argparse`` subparsers object."""
  parser = subparsers.add_parser("demo", help="refine a real backbone on the DSB nuclei image (Dice, PNG overlay)")
  parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
  parser.add_argument(
    "--task",
    default="nuclei2d",
    choices=("nuclei2d", "tissue2d", "tissue2d_shifted", "nuclei3d_slices"),
    help="built-in case (default nuclei2d: DSB nuclei test columns)",
  )
  flags.add_setting(parser, "preset")
  flags.add_setting(parser, "keep_weight", help="weight of the keep term (not in the paper; default: the preset's)")
  parser.add_argument("--interactions", type=int, default=3)
  parser.add_argument("--marks", choices=("scribble", "point", "box"), default="scribble")
  parser.add_argument("--layers", type=int, default=5, help="tunable last layers (default 5)")
  flags.add_setting(parser, "max_steps", help="most refinement steps M (default: the preset's)")
  parser.add_argument(
    "--train-steps", type=int, default=150, help="training steps when no shipped weights exist (default 150)"
  )
  parser.set_defaults(func=run)
  return parser
