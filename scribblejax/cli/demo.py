"""``scribblejax demo``: the README's main command."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
  from scribblejax.research.demo import run_demo
  from scribblejax.config import RefineConfig
  given = {k: v for k, v in (("max_steps", args.steps), ("keep_weight", args.keep_weight)) if v is not None}
  config = RefineConfig.paper(**given) if args.preset == "paper" else RefineConfig(**given)
  run_demo(args.out, task=args.task, train_steps=args.train_steps, interactions=args.interactions,
           kind=args.marks, layers=args.layers, config=config)
  return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
  parser = subparsers.add_parser("demo", help="refine a real backbone on the DSB nuclei image (Dice, PNG overlay)")
  parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
  parser.add_argument("--task", default="nuclei2d",
                      choices=("nuclei2d", "tissue2d", "tissue2d_shifted", "nuclei3d_slices"),
                      help="built-in case (default nuclei2d: DSB nuclei test columns)")
  parser.add_argument("--preset", choices=("default", "paper"), default="default",
                      help="refinement settings: the library's defaults, or 'paper' (Algorithm 1 exactly)")
  parser.add_argument("--keep-weight", type=float, default=None,
                      help="weight of the keep term (not in the paper; default: the preset's)")
  parser.add_argument("--interactions", type=int, default=3)
  parser.add_argument("--marks", choices=("scribble", "point", "box"), default="scribble")
  parser.add_argument("--layers", type=int, default=5, help="tunable last layers (default 5)")
  parser.add_argument("--steps", type=int, default=None, help="most refinement steps M (default: the preset's)")
  parser.add_argument("--train-steps", type=int, default=150,
                      help="training steps when no shipped weights exist (default 150)")
  parser.set_defaults(func=run)
  return parser
