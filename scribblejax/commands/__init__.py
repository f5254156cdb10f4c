"""Subcommands of the ``scribblejax`` command line: each module has ``add_parser(subparsers)``."""
