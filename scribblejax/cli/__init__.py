"""The ``scribblejax`` command line: argparse only, one module per command."""

from scribblejax.cli.entry import build_parser, enable_compilation_cache, main

__all__ = ["build_parser", "enable_compilation_cache", "main"]
