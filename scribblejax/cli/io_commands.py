"""``scribblejax predict``, ``scribblejax refine`` and ``scribblejax info``: the network's segmentation,
a refinement round with marks drawn in LabelMe, 3D Slicer or any label map, and a model's description.

Exit status: 0 on success; 1 on bad input or a failure (a one-line message on stderr); 2 on a usage
error (argparse). Progress goes to stderr (``--quiet`` silences it); ``--json`` prints the report on
stdout for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

EPILOG = ("exit status: 0 success; 1 bad input or failure (one line on stderr); 2 usage error. "
          "Images: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), TIFF 2D/3D, PNG, JPEG, DICOM file or series folder. "
          "The output keeps the input's geometry and format family (DICOM -> NIfTI or NRRD, JPEG -> PNG or TIFF); "
          "a report (<out>.report.json) and an overlay (<out>.overlay.png) are written next to it.")


def _one_line(err: BaseException) -> str:
  return " ".join(str(err).split()) or type(err).__name__


def _logger(args: argparse.Namespace, command: str):
  start = time.perf_counter()

  def log(message: str) -> None:
    if not args.quiet:
      print(f"[{time.perf_counter() - start:6.1f}s] scribblejax {command}: {message}", file=sys.stderr, flush=True)

  return log


def _run(command: str, args: argparse.Namespace, work, summary) -> int:
  try:
    report = work(_logger(args, command))
  except (ValueError, OSError) as err:
    print(f"scribblejax {command}: error: {_one_line(err)}", file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(report, indent=2, default=str))
  elif not args.quiet:
    print(summary(report))
  return 0


@contextlib.contextmanager
def _progress_bar(args: argparse.Namespace, desc: str = "refining", unit: str = "step"):
  """A ``progress(done, total)`` callback drawing a tqdm bar (of SGD steps, by default) on stderr
  (``None`` with ``--quiet`` or ``--json``)."""
  if args.quiet or args.json:
    yield None
    return
  from tqdm import tqdm
  bar = None

  def progress(steps: int, max_steps: int) -> None:
    nonlocal bar
    if bar is None:
      bar = tqdm(total=max_steps, desc=desc, unit=unit, file=sys.stderr, leave=False)
    elif steps < bar.n:                  # a new pass (the sliding window after the refinement)
      bar.reset(total=max_steps)
    bar.update(steps - bar.n)

  try:
    yield progress
  finally:
    if bar is not None:
      bar.close()


def _scripting(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--quiet", action="store_true", help="no progress on stderr, no summary on stdout")
  parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def _classes(text: str | None) -> tuple[str, ...] | None:
  return None if text is None else tuple(text.split(","))


def _inference_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
  group = parser.add_argument_group("spacing and patches", "how the network sees the image (nnU-Net's pipeline)")
  group.add_argument("--no-resample", action="store_true",
                     help="do not resample the image to the model's voxel spacing (model.json metadata.spacing; "
                          "nnU-Net models state it)")
  group.add_argument("--no-crop", action="store_true",
                     help="do not crop the image to its non-zero region before normalising (nnU-Net models crop, "
                          "and give background outside it)")
  group.add_argument("--mirror", action="store_true",
                     help="average the network over its input flipped along the model's mirroring axes, as nnU-Net "
                          "predicts by default (up to 8 passes in 3-D; in the refinement loop too)")
  group.add_argument("--patch-size", default="auto", metavar="auto|whole|N,N[,N]",
                     help="auto: patch by patch when the model states a patch size (nnU-Net), else the whole image; "
                          "whole: the whole image at once; or the patch, one size per model axis (default auto)")
  group.add_argument("--patch-step", type=float, default=0.5, metavar="F",
                     help="patches start at most F patches apart (default 0.5, as nnU-Net)")
  return group


def _patch_batch_flag(group: argparse._ArgumentGroup) -> None:
  """``--patch-batch``, for the commands that refine on patches (refine, evaluate)."""
  group.add_argument("--patch-batch", default="auto", metavar="auto|N",
                     help="with patches, the most marked patches one network call of the refinement loop runs; "
                          "more run one batch after another, each recomputed in the backward pass, so memory "
                          "grows with one batch (auto: up to 128^3 voxels per call, mirrored copies and folds "
                          "counted)")


def _inference(args: argparse.Namespace):
  from scribblejax.app.workflow import InferenceOptions
  text = args.patch_size.strip().lower()
  if text in ("auto", "whole"):
    patch = "auto" if text == "auto" else None
  else:
    try:
      patch = tuple(int(v) for v in text.split(","))
    except ValueError:
      raise ValueError(f"--patch-size must be auto, whole or sizes like 96,96,96, got {args.patch_size!r}") from None
  batch = getattr(args, "patch_batch", "auto").strip().lower()
  if batch != "auto":
    try:
      batch = int(batch)
    except ValueError:
      raise ValueError(f"--patch-batch must be auto or a positive integer, got {args.patch_batch!r}") from None
  return InferenceOptions(resample=not args.no_resample, patch_size=patch, step=args.patch_step,
                          crop=not args.no_crop, mirror=args.mirror, patch_batch=None if batch == "auto" else batch)


# ----------------------------------------------------------------------------------------------
# predict

def _predict(args: argparse.Namespace) -> int:
  def work(log):
    from scribblejax.app.workflow import run_predict
    with _progress_bar(args, "predicting", "patch") as progress:
      return run_predict(args.model, args.image, args.out, overlay=not args.no_overlay, log=log,
                         inference=_inference(args), progress=progress)

  def summary(report):
    pixels = ", ".join(f"{k}: {v}" for k, v in report["class_pixels"].items())
    return f"wrote {report['out']} ({pixels}; {report['seconds']:.2f}s on {report['device']})"

  return _run("predict", args, work, summary)


def _add_predict(subparsers) -> None:
  parser = subparsers.add_parser(
      "predict", help="the network's own segmentation of an image (NIfTI, NRRD, TIFF, PNG, JPEG, DICOM)",
      description="Segment an image with a model, writing the labels in the image's geometry and format.",
      epilog=EPILOG)
  parser.add_argument("--model", required=True, help="a built-in model name or a model folder (model.json)")
  parser.add_argument("--image", required=True, help="image file, or a DICOM series folder")
  parser.add_argument("--out", required=True, help="segmentation to write (its suffix picks the format)")
  parser.add_argument("--no-overlay", action="store_true", help="do not write <out>.overlay.png")
  _inference_flags(parser)
  _scripting(parser)
  parser.set_defaults(func=_predict)


# ----------------------------------------------------------------------------------------------
# refine

def _refine(args: argparse.Namespace) -> int:
  def work(log):
    from scribblejax.app.workflow import MarkOptions, RefineSettings, run_refine
    settings = RefineSettings(layers=args.layers, max_steps=args.steps, learning_rate=args.lr, momentum=args.momentum,
                              prox_weight=args.prox_weight, keep_weight=args.keep_weight, optimizer=args.optimizer,
                              progressive_merge=args.progressive_merge, preset=args.preset,
                              region_growing=args.region_growing, driver=args.driver,
                              check_every=args.check_every, class_balance=args.class_balance,
                              continue_weights=args.continue_weights, compute_dtype=args.compute_dtype,
                              remat=args.remat, conv_backend=args.conv_backend,
                              new_classes=tuple(args.new_class or ()))
    options = MarkOptions(class_names=_classes(args.classes), background_value=args.background_value,
                          unmarked_value=args.unmarked_value, radius=args.radius, rectangle=args.rectangle)
    with _progress_bar(args) as progress, _progress_bar(args, "segmenting", "patch") as patches:
      return run_refine(model=args.model, image=args.image, marks=args.marks or [], out=args.out,
                        session=args.session, undo=args.undo, settings=settings, mark_options=options,
                        overlay=not args.no_overlay, log=log, progress=progress, inference=_inference(args),
                        patch_progress=patches)

  def summary(report):
    if "steps" not in report:
      where = f"; wrote {report['out']}" if "out" in report else ""
      return f"undid round {report['undone_round']}: {report['rounds']} round(s) left{where}"
    network = report.get("network_marks_honoured", report["marks_honoured"])
    if report["satisfied"] and network == 1.0:
      state = "every mark honoured"
    else:
      why = ("some marks lie between the model's voxels" if report["satisfied"] else
             "the objective became non-finite" if report.get("nonfinite") else
             f"not satisfied after {report['steps']} steps")
      state = f"the network honours {network:.1%} of marks ({why}), the segmentation {report['marks_honoured']:.1%}"
    return (f"wrote {report['out']}: round {report['round']}, {report['steps']} steps, {state}, "
            f"{report['seconds']:.2f}s ({report['compile_seconds']:.2f}s compiling) on {report['device']}")

  return _run("refine", args, work, summary)


def _add_refine(subparsers) -> None:
  parser = subparsers.add_parser(
      "refine", help="correct a segmentation with marks (label map, LabelMe JSON, 3D Slicer .seg.nrrd)",
      description="Fine-tune one copy of the network's last layers until it predicts every marked pixel as "
                  "its mark (Sambaturu et al., MICCAI 2021), and write the corrected segmentation. With "
                  "--session, marks accumulate over rounds and --undo drops the latest round.",
      epilog=EPILOG)
  io = parser.add_argument_group("files")
  io.add_argument("--model", help="a built-in model name or a model folder (default: the session's)")
  io.add_argument("--image", help="image file, or a DICOM series folder (default: the session's)")
  io.add_argument("--marks", action="append", metavar="FILE",
                  help="marks: a label map in the image's geometry, LabelMe .json or Slicer .seg.nrrd; repeat to "
                       "add files (later files override earlier ones)")
  io.add_argument("--out", help="segmentation to write (its suffix picks the format)")
  io.add_argument("--session", metavar="DIR", help="keep the marks and state of rounds in DIR (created if missing)")
  io.add_argument("--undo", action="store_true",
                  help="drop the session's latest round (then refine with --marks, if given)")
  io.add_argument("--no-overlay", action="store_true", help="do not write <out>.overlay.png")
  method = parser.add_argument_group(
      "method", "defaults: the model's stored settings (model.json metadata.refine), else scribblejax.RefineConfig's")
  method.add_argument("--layers", type=int, help="tunable last layers l (default: 5, or fewer if the model has fewer)")
  method.add_argument("--preset", choices=("default", "paper"), default="default",
                      help="the settings every option left out takes: the library's defaults, or 'paper' "
                           "(Algorithm 1 exactly: SGD 0.01, momentum 0.9, alpha 1, no keep term, no merge)")
  method.add_argument("--steps", type=int, help="most optimiser steps M")
  method.add_argument("--optimizer", choices=("sgd", "adam"), help="the optimiser")
  method.add_argument("--lr", "--learning-rate", dest="lr", type=float, help="the optimiser's learning rate")
  method.add_argument("--momentum", type=float, help="SGD momentum")
  method.add_argument("--prox-weight", "--alpha", dest="prox_weight", type=float,
                      help="alpha, the weight of ||W_lam - W||_2")
  method.add_argument("--keep-weight", type=float,
                      help="weight of the keep term: the unmarked pixels' cross-entropy against the network's labels")
  method.add_argument("--progressive-merge", action=argparse.BooleanOptionalAction, default=None,
                      help="change the segmentation only in the regions of change that touch this round's marks, "
                           "and honour every mark in it (default: on; off in the paper preset)")
  method.add_argument("--region-growing", type=float, metavar="T",
                      help="grow this round's marks into neighbours whose normalised intensity differs by < T")
  method.add_argument("--driver", choices=("auto", "loop", "host"), default="auto",
                      help="auto: one compiled loop on GPU/TPU, and on the CPU with oneDNN convolutions "
                           "(the cpu extra); host-driven chunks on the CPU otherwise (default auto)")
  method.add_argument("--check-every", type=int, default=1, help="steps per compiled chunk of the host driver")
  method.add_argument("--class-balance", action="store_true", help="weight every marked class equally")
  method.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                      help="dtype the network computes in; weights stay float32 (default float32)")
  method.add_argument("--remat", action="store_true",
                      help="recompute the tail's activations in the backward pass (less memory, more time)")
  method.add_argument("--conv-backend", choices=("auto", "xla", "onednn"), default="auto",
                      help="who computes the convolutions: auto (oneDNN on the CPU when the kernels are available, "
                           "else XLA), xla, or onednn (CPU only; see scribblejax.kernels) (default auto)")
  method.add_argument("--continue-weights", action="store_true",
                      help="in a session, start from the previous round's weights instead of the network's")
  marks = parser.add_argument_group("marks files")
  marks.add_argument("--classes", metavar="A,B,C", help="class names in index order (default: the model's)")
  marks.add_argument("--new-class", action="append", metavar="NAME",
                     help="append an output class NAME to the network's head, for a structure it was never trained "
                          "for (repeatable; it follows the model's classes: label-map value n for a model of n "
                          "classes); the first segmentation stays the network's own, and marks of NAME teach it; a "
                          "session keeps the classes it started with")
  marks.add_argument("--background-value", type=int, default=255,
                     help="label-map value meaning class 0 / background (default 255)")
  marks.add_argument("--unmarked-value", type=int, default=0, help="label-map value meaning unmarked (default 0)")
  marks.add_argument("--radius", type=float, default=1.0, help="thickness of LabelMe points and lines (default 1)")
  marks.add_argument("--rectangle", choices=("box", "fill"), default="box",
                     help="LabelMe rectangles: box (core + background ring) or fill (default box)")
  _patch_batch_flag(_inference_flags(parser))
  _scripting(parser)
  parser.set_defaults(func=_refine)


# ----------------------------------------------------------------------------------------------
# info

def _info(args: argparse.Namespace) -> int:
  def work(log):
    from scribblejax.app.workflow import describe_model
    log(f"loading {args.model}")
    return describe_model(args.model)

  def summary(d):
    inp = d["input"]
    lines = [f"model: {d['model']} ({d['family']})",
             f"classes: {', '.join(d['classes']) if d['classes'] else d['num_classes']}",
             f"input: {inp['spatial_dims']}-D, {inp['channels']} channel(s), {inp['layout']}; "
             f"normalisation {json.dumps(inp['normalization'])}",
             "pipeline: " + _pipeline_text(d["pipeline"]),
             f"parameters: {d['total_params']:,} in {len(d['layers'])} layers (+ {d['other_variables']:,} other "
             "variables)", "layers in forward order (refine --layers l tunes the last l):"]
    if d.get("members"):
      folds = (d.get("metadata") or {}).get("folds")
      lines.insert(1, f"ensemble: {d['members']} networks of {d['member_family']}"
                      f"{' (folds ' + ', '.join(map(str, folds)) + ')' if folds else ''}, logits averaged; "
                      "each layer below is every network's, and its parameter count theirs together")
    if d.get("regions"):
      r = d["regions"]
      names = r.get("names") or [f"region {i}" for i in range(len(r["class_order"]))]
      labels = r.get("labels") or [None] * len(names)
      each = ", ".join(f"{n}{'' if v is None else ' (labels ' + ', '.join(map(str, v)) + ')'} writes class {c}"
                       for n, v, c in zip(names, labels, r["class_order"]))
      lines.insert(2, f"regions: one sigmoid output per region, read in turn as nnU-Net does (a later region's "
                      f"class over an earlier one's where its sigmoid > 0.5): {each}")
    width = max(len(layer["name"]) for layer in d["layers"])
    count = len(d["layers"])
    lines += [f"  {count - i:3d}  {layer['name']:<{width}}  {layer['params']:>10,}" for i, layer in enumerate(d["layers"])]
    return "\n".join(lines)

  return _run("info", args, work, summary)


def _pipeline_text(pipeline: dict) -> str:
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


def _add_info(subparsers) -> None:
  parser = subparsers.add_parser("info", help="a model's classes, layers, parameter counts and input expectations",
                                 description="Describe a stored or built-in model.", epilog=EPILOG)
  parser.add_argument("model", help="a built-in model name or a model folder")
  _scripting(parser)
  parser.set_defaults(func=_info)


def add_parser(subparsers) -> None:
  """Registers ``predict``, ``refine`` and ``info`` on an ``argparse`` subparsers object."""
  _add_predict(subparsers)
  _add_refine(subparsers)
  _add_info(subparsers)
