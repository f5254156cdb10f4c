"""``scribblejax convert SRC --out DIR [--arch A --kwargs JSON --normalize JSON]``."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers the ``convert`` subcommand on an ``argparse`` subparsers object."""
  parser = subparsers.add_parser(
    "convert",
    help="import a trained PyTorch network (nnU-Net folder, MONAI bundle or checkpoint)",
    description="Convert an nnU-Net v2 trained-model folder, a MONAI bundle folder, or a bare checkpoint "
    "(with --arch and --kwargs) into a scribblejax model folder.",
  )
  parser.add_argument("src", help="nnU-Net trained-model folder, MONAI bundle folder, or checkpoint file")
  parser.add_argument("--out", required=True, help="model folder to write")
  parser.add_argument("--arch", help="architecture as its library names it, e.g. monai.networks.nets.BasicUNet")
  parser.add_argument("--kwargs", help="constructor arguments as JSON, e.g. '{\"spatial_dims\": 2}'")
  parser.add_argument("--normalize", help='normalisation spec as JSON, e.g. \'{"kind": "zscore"}\'')
  parser.add_argument(
    "--folds",
    metavar="cv|K[,K...]",
    help="nnU-Net folders: the folds to convert, averaged as one model (cv: every numbered fold, "
    "what nnUNetv2_predict uses by default; names as its -f: 0,1,2 or all for fold_all; "
    "default: the first fold)",
  )
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
  parser.set_defaults(func=run)
  return parser


def _json_arg(text: str | None, name: str):
  if text is None:
    return None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"--{name} is not valid JSON: {e}") from None


def run(args: argparse.Namespace) -> int:
  """Runs ``convert``; prints the output folder (exit 0) or a one-line error (exit 1)."""
  from scribblejax.convert.folder import convert

  try:
    kwargs = _json_arg(args.kwargs, "kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
      raise ValueError("--kwargs must be a JSON object")
    folds = args.folds
    if folds is not None and folds.strip() == "cv":
      folds = "cv"
    elif folds is not None:
      folds = [f.strip() for f in folds.split(",")]
      if not all(folds):
        raise ValueError(f"--folds must be cv or fold names separated by commas, got {args.folds!r}")
    out = convert(
      args.src,
      args.out,
      arch=args.arch,
      kwargs=kwargs,
      normalize=_json_arg(args.normalize, "normalize"),
      overwrite=args.overwrite,
      folds=folds,
      log=lambda text: print(text, file=sys.stderr),
    )
  except (ValueError, OSError) as e:
    print(f"scribblejax convert: error: {e}", file=sys.stderr)
    return 1
  print(out)
  return 0
