"""``scribblejax predict``: the network's own segmentation of an image.

Exit status: 0 on success; 1 on bad input or a failure (a one-line message on stderr); 2 on a usage
error (argparse). Progress goes to stderr (``--quiet`` silences it); ``--json`` prints the report on
stdout for scripts.
"""

from __future__ import annotations

import argparse

from scribblejax.app import run_predict
from scribblejax.cli import flags


def run(args: argparse.Namespace) -> int:
  """Runs ``predict``; returns the exit status."""

  def work(log):
    with flags.progress_bar(args, "predicting", "patch") as progress:
      return run_predict(
        args.model,
        args.image,
        args.out,
        overlay=not args.no_overlay,
        log=log,
        inference=flags.inference_options(args),
        progress=progress,
      )

  return flags.run_reporting("predict", args, work, summary)


def summary(report: dict) -> str:
  """The line ``predict`` prints."""
  pixels = ", ".join(f"{k}: {v}" for k, v in report["class_pixels"].items())
  return f"wrote {report['out']} ({pixels}; {report['seconds']:.2f}s on {report['device']})"


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers ``predict`` on an ``argparse`` subparsers object."""
  parser = subparsers.add_parser(
    "predict",
    help="the network's own segmentation of an image (NIfTI, NRRD, TIFF, PNG, JPEG, DICOM)",
    description="Segment an image with a model, writing the labels in the image's geometry and format.",
    epilog=flags.EPILOG,
  )
  parser.add_argument("--model", required=True, help="a built-in model name or a model folder (model.json)")
  parser.add_argument("--image", required=True, help="image file, or a DICOM series folder")
  parser.add_argument("--out", required=True, help="segmentation to write (its suffix picks the format)")
  parser.add_argument("--no-overlay", action="store_true", help="do not write <out>.overlay.png")
  flags.add_inference(parser)
  flags.add_scripting(parser)
  parser.set_defaults(func=run)
  return parser
