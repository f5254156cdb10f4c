"""``scribblejax demo``: the README's main command."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
  from scribblejax.demo import run_demo
  from scribblejax.refine import RefineConfig
  run_demo(args.out, task=args.task, train_steps=args.train_steps, interactions=args.interactions,
           kind=args.marks, layers=args.layers,
           config=RefineConfig(max_steps=args.steps, keep_weight=args.keep_weight))
  return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
  parser = subparsers.add_parser("demo", help="refine a real backbone on the DSB nuclei image (Dice, PNG overlay)")
  parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
  parser.add_argument("--task", default="nuclei2d",
                      choices=("nuclei2d", "tissue2d", "tissue2d_shifted", "nuclei3d_slices"),
                      help="built-in case (default nuclei2d: DSB nuclei test columns)")
  parser.add_argument("--keep-weight", type=float, default=0.0,
                      help="weight of the optional keep term (not in the paper; default 0)")
  parser.add_argument("--interactions", type=int, default=3)
  parser.add_argument("--marks", choices=("scribble", "point", "box"), default="scribble")
  parser.add_argument("--layers", type=int, default=5, help="tunable last layers (default 5)")
  parser.add_argument("--steps", type=int, default=100, help="most refinement steps M (default 100)")
  parser.add_argument("--train-steps", type=int, default=150,
                      help="training steps when no shipped weights exist (default 150)")
  parser.set_defaults(func=run)
  return parser
