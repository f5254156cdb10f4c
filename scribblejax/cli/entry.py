"""The ``scribblejax`` command line: ``scribblejax COMMAND --help`` describes each command."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import jax

from scribblejax.cli import flags

# The command registry: one module per command, each with an add_parser(subparsers) function that sets the
# command's func(args) -> exit status. Listed in the order `scribblejax --help` shows them.
COMMAND_MODULES = (
  "scribblejax.cli.demo",
  "scribblejax.cli.evaluate",
  "scribblejax.cli.predict",
  "scribblejax.cli.refine",
  "scribblejax.cli.info",
  "scribblejax.cli.train",
  "scribblejax.cli.view",
  "scribblejax.cli.convert",
)


def build_parser() -> argparse.ArgumentParser:
  """The ``scribblejax`` parser with every command of :data:`COMMAND_MODULES`."""
  parser = argparse.ArgumentParser(prog="scribblejax", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name in COMMAND_MODULES:
    importlib.import_module(name).add_parser(sub)
  return parser


# Commands whose results include compile times leave JAX's persistent cache alone.
_UNCACHED = ("evaluate",)


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache for this process and returns its folder.

  Every ``scribblejax`` command is a new process, so without it each one compiles its programs again
  (a session continued with ``scribblejax refine --session`` included). With it, a later run loads
  them from disk instead of compiling them.
  ``SCRIBBLEJAX_COMPILATION_CACHE`` names the folder (default ``$XDG_CACHE_HOME/scribblejax/jax``),
  or is ``0`` to leave the cache off; a folder already set in JAX's own configuration is kept.
  """
  setting = os.environ.get("SCRIBBLEJAX_COMPILATION_CACHE", "")
  if setting == "0":
    return None
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
  folder = Path(setting) if setting else base / "scribblejax" / "jax"
  jax.config.update("jax_compilation_cache_dir", str(folder))
  return str(folder)


def main(argv: list[str] | None = None) -> int:
  """Runs ``scribblejax ARGV``; returns the exit status (:data:`scribblejax.cli.flags.EXIT_OK`, ``EXIT_BAD_INPUT``
  after a one-line error on stderr; argparse exits with ``EXIT_USAGE`` itself)."""
  args = build_parser().parse_args(argv)
  if args.command not in _UNCACHED:
    enable_compilation_cache()
  try:
    return args.func(args)
  except (ValueError, OSError) as err:  # bad input: exit 1, as every command's help says (2: usage errors)
    return flags.error(args.command, err)


if __name__ == "__main__":
  sys.exit(main())
