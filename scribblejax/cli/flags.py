"""What the commands share: exit codes, progress and report printing, and the flag groups (the
pipeline's, and the refinement settings', generated from :data:`scribblejax.app.settings.SETTINGS`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping

from scribblejax.app.settings import DEFAULTS, SETTINGS, RefineSettings, settings_of
from scribblejax.pipeline.spec import InferenceOptions

EXIT_OK = 0  # success
EXIT_BAD_INPUT = 1  # bad input or a failure: one line on stderr
EXIT_USAGE = 2  # a command line argparse rejects
EPILOG = (
  "exit status: 0 success; 1 bad input or failure (one line on stderr); 2 usage error. "
  "Images: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), TIFF 2D/3D, PNG, JPEG, DICOM file or series folder. "
  "The output keeps the input's geometry and format family (DICOM -> NIfTI or NRRD, JPEG -> PNG or TIFF); "
  "a report (<out>.report.json) and an overlay (<out>.overlay.png) are written next to it."
)
# the refinement settings refine offers, in the order its help lists them (the table's)
REFINE_SETTINGS = settings_of("refine")


def one_line(err: BaseException) -> str:
  """An error's message on one line (its type's name when it has none)."""
  return " ".join(str(err).split()) or type(err).__name__


def error(command: str, err: BaseException) -> int:
  """Prints ``scribblejax COMMAND: error: MESSAGE`` on stderr and returns :data:`EXIT_BAD_INPUT`."""
  print(f"scribblejax {command}: error: {one_line(err)}", file=sys.stderr)
  return EXIT_BAD_INPUT


def logger(args: argparse.Namespace, command: str) -> Callable[[str], None]:
  """A log that prints ``[  seconds] scribblejax COMMAND: message`` on stderr (nothing with ``--quiet``)."""
  start = time.perf_counter()

  def log(message: str) -> None:
    if not args.quiet:
      print(f"[{time.perf_counter() - start:6.1f}s] scribblejax {command}: {message}", file=sys.stderr, flush=True)

  return log


def run_reporting(
  command: str, args: argparse.Namespace, work: Callable[[Callable[[str], None]], dict], summary: Callable[[dict], str]
) -> int:
  """Runs ``work(log)``; prints its report as JSON (``--json``) or its summary (unless ``--quiet``).

  Returns:
    :data:`EXIT_OK`, or :data:`EXIT_BAD_INPUT` after a one-line error on stderr.
  """
  try:
    report = work(logger(args, command))
  except (ValueError, OSError) as err:
    return error(command, err)
  if args.json:
    print(json.dumps(report, indent=2, default=str))
  elif not args.quiet:
    print(summary(report))
  return EXIT_OK


@contextlib.contextmanager
def progress_bar(args: argparse.Namespace, desc: str = "refining", unit: str = "step") -> Iterator:
  """A ``progress(done, total)`` callback drawing a tqdm bar (of SGD steps, by default) on stderr
  (``None`` with ``--quiet`` or ``--json``)."""
  if args.quiet or args.json:
    yield None
    return
  from tqdm import tqdm  # only when a bar is drawn

  bar = None

  def progress(steps: int, max_steps: int) -> None:
    nonlocal bar
    if bar is None:
      bar = tqdm(total=max_steps, desc=desc, unit=unit, file=sys.stderr, leave=False)
    elif steps < bar.n:  # a new pass (the sliding window after the refinement)
      bar.reset(total=max_steps)
    bar.update(steps - bar.n)

  try:
    yield progress
  finally:
    if bar is not None:
      bar.close()


def add_scripting(parser: argparse.ArgumentParser) -> None:
  """``--quiet`` and ``--json``."""
  parser.add_argument("--quiet", action="store_true", help="no progress on stderr, no summary on stdout")
  parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


# ----------------------------------------------------------------------------------------------
# The pipeline's flags.


def add_inference(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
  """The ``spacing and patches`` group: how the network sees the image."""
  group = parser.add_argument_group("spacing and patches", "how the network sees the image (nnU-Net's pipeline)")
  group.add_argument(
    "--no-resample",
    action="store_true",
    help="do not resample the image to the model's voxel spacing (model.json metadata.spacing; "
    "nnU-Net models state it)",
  )
  group.add_argument(
    "--no-crop",
    action="store_true",
    help="do not crop the image to its non-zero region before normalising (nnU-Net models crop, "
    "and give background outside it)",
  )
  group.add_argument(
    "--mirror",
    action="store_true",
    help="average the network over its input flipped along the model's mirroring axes, as nnU-Net "
    "predicts by default (up to 8 passes in 3-D; in the refinement loop too)",
  )
  group.add_argument(
    "--patch-size",
    default="auto",
    metavar="auto|whole|N,N[,N]",
    help="auto: patch by patch when the model states a patch size (nnU-Net), else the whole image; "
    "whole: the whole image at once; or the patch, one size per model axis (default auto)",
  )
  group.add_argument(
    "--patch-step",
    type=float,
    default=0.5,
    metavar="F",
    help="patches start at most F patches apart (default 0.5, as nnU-Net)",
  )
  return group


def add_patch_batch(group: argparse._ArgumentGroup) -> None:
  """``--patch-batch``, for the commands that refine on patches (refine, evaluate)."""
  group.add_argument(
    "--patch-batch",
    default="auto",
    metavar="auto|N",
    help="with patches, the most marked patches one network call of the refinement loop runs; "
    "more run one batch after another, each recomputed in the backward pass, so memory "
    "grows with one batch (auto: up to 128^3 voxels per call, mirrored copies and folds "
    "counted)",
  )


def inference_options(args: argparse.Namespace) -> InferenceOptions:
  """The pipeline's flags as :class:`scribblejax.pipeline.InferenceOptions`.

  Raises:
    ValueError: ``--patch-size`` or ``--patch-batch`` is not what they take.
  """
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
  return InferenceOptions(
    resample=not args.no_resample,
    patch_size=patch,
    step=args.patch_step,
    crop=not args.no_crop,
    mirror=args.mirror,
    patch_batch=None if batch == "auto" else batch,
  )


# ----------------------------------------------------------------------------------------------
# The refinement settings' flags, one per SETTINGS entry.


def setting_default(field: str):
  """A setting's flag default: ``None`` for one a model may store (the model's, else the preset's), else
  RefineConfig's default (a round's own knob: the table's)."""
  return DEFAULTS[field]


def flag_of(dest: str) -> str:
  """The documented flag of an argparse ``dest``: a setting's :data:`SETTINGS` name, else ``--dest``."""
  return SETTINGS[dest].flag if dest in SETTINGS else f"--{dest.replace('_', '-')}"


def add_setting(parser: argparse.ArgumentParser | argparse._ArgumentGroup, field: str, help: str | None = None) -> None:
  """One setting's flag (``dest`` the field's name), its aliases accepted but not listed.

  Args:
    parser: the parser or group to add it to.
    field: a key of :data:`SETTINGS`.
    help: the help text (default: the table's, with the default where it is fixed).
  """
  setting = SETTINGS[field]
  default = setting_default(field)
  kwargs: dict = {"dest": field, "default": default}
  if setting.type is bool:
    kwargs["action"] = argparse.BooleanOptionalAction if setting.stored else "store_true"
  else:
    kwargs["type"] = setting.type
    if setting.choices:
      kwargs["choices"] = setting.choices
    else:
      kwargs["metavar"] = setting.metavar or setting.flag.lstrip("-").upper().replace("-", "_")
  if help is None:
    fixed = default not in (None, False, "default")  # a default worth saying ("default": the preset)
    help = f"{setting.help} (default {default})" if fixed else setting.help
  parser.add_argument(setting.flag, help=help, **kwargs)
  for alias in setting.aliases:
    parser.add_argument(alias, help=argparse.SUPPRESS, **kwargs)


def add_settings(
  parser: argparse.ArgumentParser | argparse._ArgumentGroup, command: str, helps: Mapping[str, str] | None = None
) -> None:
  """The flags of the settings ``command`` offers (``Setting.commands``), in the table's order.

  Args:
    parser: the parser or group to add them to.
    command: the command (a front end of :data:`scribblejax.app.settings.FRONT_ENDS`).
    helps: help texts of the command's own, by setting (default: the table's).
  """
  for field in settings_of(command):
    add_setting(parser, field, (helps or {}).get(field))


def refine_settings(args: argparse.Namespace, command: str, **overrides) -> RefineSettings:
  """The settings ``command``'s flags give, as :class:`scribblejax.app.RefineSettings`."""
  given = {field: getattr(args, field) for field in settings_of(command)}
  return RefineSettings(**{**given, **overrides})
