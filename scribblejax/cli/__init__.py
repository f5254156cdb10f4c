"""The ``scribblejax`` command line: argparse only, one module per command."""

from scribblejax.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
