"""The ``scribblejax`` command line: ``scribblejax COMMAND --help`` describes each command."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules with an add_parser(subparsers) function, one per subcommand (or group of subcommands).
COMMAND_MODULES = (
    "scribblejax.commands.bench",
    "scribblejax.commands.demo",
    "scribblejax.commands.evaluate",
    "scribblejax.commands.io_commands",
    "scribblejax.commands.train",
    "converters.cli",
)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="scribblejax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name in COMMAND_MODULES:
    importlib.import_module(name).add_parser(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, OSError) as err:
    print(f"scribblejax {args.command}: error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
