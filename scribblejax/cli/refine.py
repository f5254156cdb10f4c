"""``scribblejax refine``: a refinement round with marks drawn in LabelMe, 3D Slicer or any label map.

Exit status: 0 on success; 1 on bad input or a failure (a one-line message on stderr); 2 on a usage
error (argparse). Progress goes to stderr (``--quiet`` silences it); ``--json`` prints the report on
stdout for scripts.
"""

from __future__ import annotations

import argparse

from scribblejax.app import MarkOptions, run_refine, taken_words
from scribblejax.cli import flags


def run(args: argparse.Namespace) -> int:
  """Runs ``refine``; returns the exit status."""

  def work(log):
    settings = flags.refine_settings(args, "refine", new_classes=tuple(args.new_class or ()))
    classes = None if args.classes is None else tuple(args.classes.split(","))
    options = MarkOptions(
      class_names=classes,
      background_value=args.background_value,
      unmarked_value=args.unmarked_value,
      radius=args.radius,
      rectangle=args.rectangle,
    )
    with flags.progress_bar(args) as progress, flags.progress_bar(args, "segmenting", "patch") as patches:
      return run_refine(
        model=args.model,
        image=args.image,
        marks=args.marks or [],
        out=args.out,
        session=args.session,
        undo=args.undo,
        take=args.take,
        where=args.where,
        regions=args.regions or (),
        settings=settings,
        mark_options=options,
        overlay=not args.no_overlay,
        log=log,
        progress=progress,
        inference=flags.inference_options(args),
        patch_progress=patches,
      )

  return flags.run_reporting("refine", args, work, summary)


def summary(report: dict) -> str:
  """The line ``refine`` prints (after a round, an undo, or a take)."""
  where = f"; wrote {report['out']}" if "out" in report else ""
  if "take" in report:
    what = taken_words(report["take"], report.get("shows") == "mixed")
    if report.get("shows") == "mixed":
      what += " (the rest as before)"
    left = report.get("differences")
    rest = ""
    if left:
      rest = f"; the largest region left: {_largest(left)} (--take {report['differences_with']} --regions 1)"
    return (
      f"round {report['round']} now shows {what}: {report['changed_pixels']} pixel(s) changed, "
      f"{report['marks_honoured']:.1%} of marks honoured{rest}{where}"
    )
  if "steps" not in report:
    return f"undid round {report['undone_round']}: {report['rounds']} round(s) left{where}"
  network = report.get("network_marks_honoured", report["marks_honoured"])
  if report["satisfied"] and network == 1.0:
    state = "every mark honoured"
  else:
    why = (
      "some marks lie between the model's voxels"
      if report["satisfied"]
      else "the objective became non-finite"
      if report.get("nonfinite")
      else f"not satisfied after {report['steps']} steps"
    )
    state = f"the network honours {network:.1%} of marks ({why}), the segmentation {report['marks_honoured']:.1%}"
  differs = report.get("network_differs", 0)
  how = "--take network [--regions 1]"
  if "session" not in report:
    how = "--no-progressive-merge, or a --session and --take network"
  largest = f", the largest region {_largest(report['differences'])}" if report.get("differences") else ""
  other = f"; the refined network's own labels differ in {differs} pixel(s){largest} ({how})" if differs else ""
  return (
    f"wrote {report['out']}: round {report['round']}, {report['steps']} steps, {state}, "
    f"{report['seconds']:.2f}s ({report['compile_seconds']:.2f}s compiling) on {report['device']}{other}"
  )


def _largest(regions: list[dict]) -> str:
  """The largest of a report's regions of difference, in words."""
  first = regions[0]
  point = ", ".join(str(i) for i in first["point"])
  return f"{first['pixels']} pixel(s) at ({point}), {first['shown']} -> {first['other']}"


def _ranks(text: str) -> tuple[int, ...]:
  """``--regions``' value: ranks ``1,3``, each at least 1."""
  try:
    ranks = tuple(int(part) for part in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"ranks separated by commas (1,3), got {text!r}") from None
  if any(r < 1 for r in ranks):
    raise argparse.ArgumentTypeError(f"ranks start at 1 (the largest region), got {text!r}")
  return ranks


def add_parser(subparsers) -> argparse.ArgumentParser:
  """Registers ``refine`` on an ``argparse`` subparsers object."""
  parser = subparsers.add_parser(
    "refine",
    help="correct a segmentation with marks (label map, LabelMe JSON, 3D Slicer .seg.nrrd)",
    description="Fine-tune one copy of the network's last layers until it predicts every marked pixel as "
    "its mark (Sambaturu et al., MICCAI 2021), and write the corrected segmentation. With "
    "--session, marks accumulate over rounds, --undo drops the latest round, and --take network shows the "
    "latest round's refined network's own labels instead of the merged ones.",
    epilog=flags.EPILOG,
  )
  io = parser.add_argument_group("files")
  io.add_argument("--model", help="a built-in model name or a model folder (default: the session's)")
  io.add_argument("--image", help="image file, or a DICOM series folder (default: the session's)")
  io.add_argument(
    "--marks",
    action="append",
    metavar="FILE",
    help="marks: a label map in the image's geometry, LabelMe .json or Slicer .seg.nrrd; repeat to "
    "add files (later files override earlier ones)",
  )
  io.add_argument("--out", help="segmentation to write (its suffix picks the format)")
  io.add_argument("--session", metavar="DIR", help="keep the marks and state of rounds in DIR (created if missing)")
  io.add_argument(
    "--undo", action="store_true", help="drop the session's latest round (then refine with --marks, if given)"
  )
  io.add_argument(
    "--take",
    choices=("network", "merged"),
    help="make the session's latest round show the refined network's own labels (network) or the round's "
    "merge (merged; what a round shows with the merge on), write it to --out, and start the next round from "
    "it; no refinement",
  )
  io.add_argument(
    "--where",
    metavar="FILE",
    help="with --take: take only in the regions where the two segmentations differ that this marks file's "
    "marked pixels touch (a click or a short stroke in each; any marks format: a label map's values are not read "
    "as classes)",
  )
  io.add_argument(
    "--regions",
    type=_ranks,
    metavar="R,R",
    help="with --take, instead of --where: take the regions where the two segmentations differ of these ranks "
    "(1: the largest; the report's 'differences' lists the largest five with a point inside each)",
  )
  io.add_argument("--no-overlay", action="store_true", help="do not write <out>.overlay.png")
  method = parser.add_argument_group(
    "method", "defaults: the model's stored settings (model.json metadata.refine), else scribblejax.RefineConfig's"
  )
  flags.add_settings(method, "refine")
  marks = parser.add_argument_group("marks files")
  marks.add_argument("--classes", metavar="A,B,C", help="class names in index order (default: the model's)")
  marks.add_argument(
    "--new-class",
    action="append",
    metavar="NAME",
    help="append an output class NAME to the network's head, for a structure it was never trained "
    "for (repeatable; it follows the model's classes: label-map value n for a model of n "
    "classes); the first segmentation stays the network's own, and marks of NAME teach it; a "
    "session keeps the classes it started with",
  )
  marks.add_argument(
    "--background-value", type=int, default=255, help="label-map value meaning class 0 / background (default 255)"
  )
  marks.add_argument("--unmarked-value", type=int, default=0, help="label-map value meaning unmarked (default 0)")
  marks.add_argument("--radius", type=float, default=1.0, help="thickness of LabelMe points and lines (default 1)")
  marks.add_argument(
    "--rectangle",
    choices=("box", "fill"),
    default="box",
    help="LabelMe rectangles: box (core + background ring) or fill (default box)",
  )
  flags.add_patch_batch(flags.add_inference(parser))
  flags.add_scripting(parser)
  parser.set_defaults(func=run)
  return parser
