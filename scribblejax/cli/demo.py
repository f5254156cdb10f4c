"""``scribblejax demo``: the README's main command."""

from __future__ import annotations

import argparse

from scribblejax.cli import flags
from scribblejax.research.simulate import ROBOT_USERS

# help texts of demo's own (the demo's built-in backbone stores no defaults: the preset's hold)
HELPS = {
  "keep_weight": "weight of the keep term (not in the paper; default: the preset's)",
  "max_steps": "most refinement steps M (default: the preset's)",
}


def run(args: argparse.Namespace) -> int:
  """Runs the demo; returns the exit status."""
  from scribblejax.research.demo import run_demo  # trains a backbone when no weights ship: only when run

  layers, config, _ = flags.refine_settings(args, "demo").resolve({})
  run_demo(
    args.out,
    task=args.task,
    train_steps=args.train_steps,
    interactions=args.interactions,
    kind=args.marks,
    config=config,
    **({} if layers is None else {"layers": layers}),
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
  flags.add_settings(parser, "demo", HELPS)
  parser.add_argument("--interactions", type=int, default=3)
  parser.add_argument("--marks", choices=ROBOT_USERS, default="scribble", help="the robot user (default scribble)")
  parser.add_argument(
    "--train-steps", type=int, default=150, help="training steps when no shipped weights exist (default 150)"
  )
  parser.set_defaults(func=run)
  return parser
