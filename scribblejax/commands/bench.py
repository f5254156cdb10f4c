"""``scribblejax bench``: the speed benchmark (:mod:`benchmarks.speed`) as a subcommand."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
  from benchmarks import speed
  return speed.execute(args)


def add_parser(subparsers) -> argparse.ArgumentParser:
  from benchmarks import speed
  parser = subparsers.add_parser(
      "bench", help="time refinement (fixed steps, early stop, batches, 2D/3D) against a PyTorch eager reference",
      description=speed.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  speed.build_parser(parser)
  parser.set_defaults(func=run)
  return parser
