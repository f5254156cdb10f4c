"""``scribblejax view``: open an image in napari with the refinement widget docked.

Needs the ``napari`` extra (``pip install "scribblejax[napari]"``). The widget's rounds are
``scribblejax refine --session`` rounds, so a session started here continues on the command line and
the other way round.
"""

from __future__ import annotations

import argparse

from scribblejax.cli import flags

# the settings the widget's fields take from the command line (the table's "view" rows)
VIEW_SETTINGS = flags.settings_of("view")


def _view(args: argparse.Namespace) -> int:
  try:
    import napari
  except ImportError as err:
    raise ValueError(f'napari is not installed ({err}); pip install "scribblejax[napari]"') from None
  from scribblejax.napari.widget import ScribbleWidget

  viewer = napari.Viewer(title="scribblejax")
  widget = ScribbleWidget(viewer)
  viewer.window.add_dock_widget(widget, name="scribblejax refine", area="right")
  for field in VIEW_SETTINGS:
    if (value := getattr(args, field)) is not None:
      widget.set_setting(field, value)
  if args.model or args.session:
    widget.open(args.image, args.model, args.session)
  elif args.image:  # no model named: let the user choose one first
    widget.image_edit.setText(args.image)
    widget.message_label.setText("choose a model (a shipped one or a model folder), then Open")
  napari.run()
  return 0


def add_parser(subparsers) -> None:
  """Registers ``view`` on an ``argparse`` subparsers object."""
  parser = subparsers.add_parser(
    "view",
    help="open an image in napari with the interactive refinement widget (needs the napari extra)",
    description="Open an image in napari with scribblejax's widget docked: the network's segmentation, a "
    "scribble layer (value = class + 1, 0 = unmarked), Refine, Undo, Reset, Save. Each Refine is "
    "a 'scribblejax refine --session' round.",
  )
  parser.add_argument("image", nargs="?", help="image file or DICOM series folder (default: the session's)")
  parser.add_argument(
    "--model", help="a built-in model name or a model folder (default: the session's, else chosen in the widget)"
  )
  parser.add_argument(
    "--session",
    metavar="DIR",
    help="session folder: continued if it holds one, else created by the first round "
    "(default: a temporary folder; the widget's Save session keeps it)",
  )
  flags.add_settings(parser, "view", {field: f"as refine {flags.SETTINGS[field].flag}" for field in VIEW_SETTINGS})
  parser.set_defaults(func=_view)
