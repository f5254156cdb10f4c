"""``scribblejax info``: a model's classes, layers, parameter counts and input expectations.

Exit status: 0 on success; 1 on bad input (a one-line message on stderr); 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json

from scribblejax.app import describe_model
from scribblejax.cli import flags


def run(args: argparse.Namespace) -> int:
  """Runs ``info``; returns the exit status."""

  def work(log):
    log(f"loading {args.model}")
    return describe_model(args.model)

  return flags.run_reporting("info", args, work, summary)


def summary(d: dict) -> str:
  """The description ``info`` prints."""
  inp = d["input"]
  lines = [
    f"model: {d['model']} ({d['family']})",
    f"classes: {', '.join(d['classes']) if d['classes'] else d['num_classes']}",
    f"input: {inp['spatial_dims']}-D, {inp['channels']} channel(s), {inp['layout']}; "
    f"normalisation {json.dumps(inp['normalization'])}",
    "pipeline: " + pipeline_text(d["pipeline"]),
    f"parameters: {d['total_params']:,} in {len(d['layers'])} layers (+ {d['other_variables']:,} other variables)",
    "layers in forward order (refine --layers l tunes the last l):",
  ]
  if d.get("members"):
    folds = (d.get("metadata") or {}).get("folds")
    lines.insert(
      1,
      f"ensemble: {d['members']} networks of {d['member_family']}"
      f"{' (folds ' + ', '.join(map(str, folds)) + ')' if folds else ''}, logits averaged; "
      "each layer below is every network's, and its parameter count theirs together",
    )
  if d.get("regions"):
    lines.insert(2, _regions_text(d["regions"]))
  width = max(len(layer["name"]) for layer in d["layers"])
  count = len(d["layers"])
  lines += [
    f"  {count - i:3d}  {layer['name']:<{width}}  {layer['params']:>10,}" for i, layer in enumerate(d["layers"])
  ]
  return "\n".join(lines)


def _regions_text(r: dict) -> str:
  names = r.get("names") or [f"region {i}" for i in range(len(r["class_order"]))]
  labels = r.get("labels") or [None] * len(names)
  each = ", ".join(
    f"{n}{'' if v is None else ' (labels ' + ', '.join(map(str, v)) + ')'} writes class {c}"
    for n, v, c in zip(names, labels, r["class_order"])
  )
  return (
    f"regions: one sigmoid output per region, read in turn as nnU-Net does (a later region's "
    f"class over an earlier one's where its sigmoid > 0.5): {each}"
  )


def pipeline_text(pipeline: dict) -> str:
  """A model's pipeline (:func:`scribblejax.pipeline.pipeline_of`) in words."""
  parts = []
  if pipeline["axis_order"]:
    parts.append(f"axis order {json.dumps(pipeline['axis_order'])}")
  if pipeline["crop_to_nonzero"]:
    parts.append("crop to the non-zero region")
  parts.append(f"spacing {pipeline['spacing']}" if pipeline["spacing"] else "the file's own spacing")
  parts.append(f"patches of {pipeline['patch_size']}" if pipeline["patch_size"] else "the whole image at once")
  if pipeline["mirroring_axes"] != "all":
    parts.append(f"--mirror along {pipeline['mirroring_axes']}" if pipeline["mirroring_axes"] else "no mirroring")
  return "; ".join(parts)


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers ``info`` on an ``argparse`` subparsers object."""
  parser = subparsers.add_parser(
    "info",
    help="a model's classes, layers, parameter counts and input expectations",
    description="Describe a stored or built-in model.",
    epilog=flags.EPILOG,
  )
  parser.add_argument("model", help="a built-in model name or a model folder")
  flags.add_scripting(parser)
  parser.set_defaults(func=run)
  return parser
