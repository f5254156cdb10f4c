"""The settings of a refinement round, in one table: :data:`SETTINGS`, keyed by
:class:`scribblejax.RefineConfig` field (and the round's own knobs), gives each setting its one
command-line name, its type and help, and says whether a model may store a default for it
(``model.json`` ``metadata.refine``). The command line's flags (:mod:`scribblejax.cli.flags`), the
round's settings (:class:`RefineSettings`), the model's stored defaults and the report's ``settings``
all derive from it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from scribblejax.config import COMPUTE_DTYPES, DRIVERS, OPTIMIZERS, PAPER, PRESETS, RefineConfig
from scribblejax.io.marks_files import RECTANGLE_MODES
from scribblejax.kernels import CONV_BACKENDS


class Setting(NamedTuple):
  """One setting of a round, as the command line and ``model.json`` name it."""

  flag: str  # its one documented command-line name
  type: type  # int, float, str or bool
  help: str
  stored: bool = False  # a model may state a default (model.json metadata.refine); the flag's default
  #                                  is then None ("the model's, else the preset's")
  choices: tuple[str, ...] | None = None
  aliases: tuple[str, ...] = ()  # older names that still work, undocumented
  metavar: str | None = None  # the value's name in the help (default: the flag's, in capitals)


# Keyed by RefineConfig field, then the round's own knobs (RefineSettings fields that are not RefineConfig's).
SETTINGS: dict[str, Setting] = {
  "max_steps": Setting("--steps", int, "most optimiser steps M", stored=True, metavar="M"),
  "optimizer": Setting("--optimizer", str, "the optimiser", stored=True, choices=OPTIMIZERS),
  "learning_rate": Setting(
    "--learning-rate", float, "the optimiser's learning rate", stored=True, aliases=("--lr",), metavar="LR"
  ),
  "momentum": Setting("--momentum", float, "SGD momentum", stored=True),
  "prox_weight": Setting(
    "--prox-weight", float, "alpha, the weight of ||W_lam - W||_2", stored=True, aliases=("--alpha",), metavar="ALPHA"
  ),
  "keep_weight": Setting(
    "--keep-weight",
    float,
    "weight of the keep term: the unmarked pixels' cross-entropy against the network's labels",
    stored=True,
  ),
  "progressive_merge": Setting(
    "--progressive-merge",
    bool,
    "change the segmentation only in the regions of change "
    "that touch this round's marks, and honour every mark in it (default: on; off in "
    "the paper preset)",
    stored=True,
  ),
  "driver": Setting(
    "--driver",
    str,
    "auto: one compiled loop on GPU/TPU, and on the CPU with oneDNN convolutions "
    "(the cpu extra); host-driven chunks on the CPU otherwise",
    choices=DRIVERS,
  ),
  "check_every": Setting("--check-every", int, "steps per compiled chunk of the host driver"),
  "class_balance": Setting("--class-balance", bool, "weight every marked class equally"),
  "compute_dtype": Setting(
    "--compute-dtype", str, "dtype the network computes in; weights stay float32", choices=COMPUTE_DTYPES
  ),
  "remat": Setting("--remat", bool, "recompute the tail's activations in the backward pass (less memory, more time)"),
  "conv_backend": Setting(
    "--conv-backend",
    str,
    "who computes the convolutions: auto (oneDNN on the CPU when the "
    "kernels are available, else XLA), xla, or onednn (CPU only; see scribblejax.kernels)",
    choices=CONV_BACKENDS,
  ),
  # the round's own
  "layers": Setting(
    "--layers", int, "tunable last layers l (default: 5, or fewer if the model has fewer)", stored=True, metavar="L"
  ),
  "preset": Setting(
    "--preset",
    str,
    "the settings every option left out takes: the library's defaults, or "
    "'paper' (Algorithm 1 exactly: SGD 0.01, momentum 0.9, alpha 1, no keep term, no merge)",
    choices=PRESETS,
  ),
  "region_growing": Setting(
    "--region-growing",
    float,
    "grow this round's marks into neighbours whose normalised intensity differs by < T",
    stored=True,
    metavar="T",
  ),
  "continue_weights": Setting(
    "--continue-weights", bool, "in a session, start from the previous round's weights instead of the network's"
  ),
}
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(RefineConfig))
# RefineConfig fields a round's settings (and a model's stored "metadata.refine") may give
TUNED = tuple(name for name, s in SETTINGS.items() if s.stored and name in CONFIG_FIELDS)
# the report's "settings", in this order
REPORTED = (
  "layers",
  "max_steps",
  "learning_rate",
  "momentum",
  "prox_weight",
  "region_growing",
  "keep_weight",
  "optimizer",
  "progressive_merge",
  "preset",
  "class_balance",
  "continue_weights",
  "check_every",
  "compute_dtype",
  "remat",
  "conv_backend",
)


@dataclasses.dataclass(frozen=True)
class RefineSettings:
  """The knobs of one refinement round; ``None`` means the model's stored default (``model.json``
  ``metadata.refine``), else the library's.

  Attributes:
    preset: "default" (the library's defaults) or "paper" (Algorithm 1 exactly,
      ``RefineConfig.paper()``): the settings every field left ``None`` takes.
    layers: tunable last layers l.
    max_steps: M, the most optimiser steps.
    learning_rate: the optimiser's step size.
    momentum: SGD's momentum.
    prox_weight: alpha, the weight of ``||W_lam - W||_2``.
    keep_weight: the weight of the keep term (``RefineConfig.keep_weight``).
    optimizer: "sgd" or "adam" (``RefineConfig.optimizer``).
    progressive_merge: ``RefineConfig.progressive_merge``: change the segmentation only in the regions
      of change that touch the round's new marks, and honour every mark in it.
    region_growing: T: grow this round's marks into neighbours whose normalised intensity differs by
      less than T (:func:`scribblejax.grow_marks`); ``None`` or 0: no growing.
    driver: "auto", "loop" or "host".
    check_every: steps per compiled chunk of the host driver.
    class_balance: weight every marked class equally in the loss.
    continue_weights: start from the previous round's W_lam instead of W (sessions only).
    compute_dtype: "float32" or "bfloat16" (``RefineConfig.compute_dtype``).
    remat: rematerialise the tail's activations in the backward pass (``RefineConfig.remat``).
    conv_backend: "auto", "xla" or "onednn" (``RefineConfig.conv_backend``).
    new_classes: names of output classes to append to the network's head for structures it was never
      trained for (:func:`scribblejax.models.add_classes`: each starts as the background's logit less 4,
      so the first segmentation is the network's own); they follow the model's classes. A session keeps
      the classes it started with.
  """

  layers: int | None = None
  max_steps: int | None = None
  learning_rate: float | None = None
  momentum: float | None = None
  prox_weight: float | None = None
  keep_weight: float | None = None
  optimizer: str | None = None
  progressive_merge: bool | None = None
  preset: str = "default"
  region_growing: float | None = None
  driver: str = "auto"
  check_every: int = 1
  class_balance: bool = False
  continue_weights: bool = False
  compute_dtype: str = "float32"
  remat: bool = False
  conv_backend: str = "auto"
  new_classes: tuple[str, ...] = ()

  def resolve(self, metadata: dict) -> tuple[int | None, RefineConfig, float | None]:
    """``(layers, RefineConfig, region_growing)`` with the defaults filled in.

    Raises:
      ValueError: an unknown preset, a setting out of range, or a negative region-growing threshold.
    """
    stored = (metadata or {}).get("refine", {}) if isinstance(metadata, dict) else {}
    if self.preset not in PRESETS:
      raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
    if self.preset == "paper":  # the paper's settings, whatever the model stores
      stored = {}
    pick = lambda name: getattr(self, name) if getattr(self, name) is not None else stored.get(name)
    fields = {k: pick(k) for k in TUNED}
    if fields["optimizer"] == "sgd" and fields["learning_rate"] is None:
      fields["learning_rate"] = PAPER["learning_rate"]  # Adam's default step would barely move SGD
    base = RefineConfig.paper if self.preset == "paper" else RefineConfig
    config = base(
      **{k: v for k, v in fields.items() if v is not None},
      driver=self.driver,
      check_every=self.check_every,
      compute_dtype=self.compute_dtype,
      remat=self.remat,
      conv_backend=self.conv_backend,
      **({"class_balance": True} if self.class_balance else {}),
    )
    grow = pick("region_growing")
    if grow is not None and (not np.isfinite(grow) or grow < 0):
      raise ValueError(f"the region growing threshold must be finite and >= 0, got {grow}")
    return pick("layers"), config, grow or None


def reported_settings(settings: RefineSettings, layers: int, config: RefineConfig, grow: float | None) -> dict:
  """The report's ``settings``: what a round ran with, its defaults filled in (:data:`REPORTED`)."""
  own = {
    "layers": layers,
    "region_growing": grow,
    "preset": settings.preset,
    "continue_weights": settings.continue_weights,
    "optimizer": str(config.optimizer or "sgd"),
  }
  return {name: own[name] if name in own else getattr(config, name) for name in REPORTED}


@dataclasses.dataclass(frozen=True)
class MarkOptions:
  """How marks files are read (see :mod:`scribblejax.io.marks_files`)."""

  class_names: tuple[str, ...] | None = None
  background_value: int = 255
  unmarked_value: int = 0
  radius: float = 1.0
  rectangle: str = "box"

  def __post_init__(self):
    if self.rectangle not in RECTANGLE_MODES:
      raise ValueError(f"rectangle must be one of {RECTANGLE_MODES}, got {self.rectangle!r}")
    if self.background_value == self.unmarked_value:
      raise ValueError(f"the background value and the unmarked value are both {self.background_value}")


def resolve_class_names(given: Sequence[str] | None, info: Any, num_classes: int | None) -> tuple[str, ...] | None:
  """``--classes`` if given (checked against the model's class count), else the model's names.

  Raises:
    ValueError: empty or repeated names, or not one name per class.
  """
  if given is None:
    return info.class_names
  names = tuple(n.strip() for n in given)
  if any(not n for n in names) or len(set(names)) != len(names):
    raise ValueError(f"--classes must be distinct non-empty names, got {','.join(given)!r}")
  if num_classes is not None and len(names) != num_classes:
    raise ValueError(f"--classes lists {len(names)} names, but the model predicts {num_classes} classes")
  return names


def session_new_classes(given: Sequence[str] | str, doc: dict | None, session: str | None) -> tuple[str, ...]:
  """The classes appended to the network's head this round: ``--new-class`` names, or the session's.

  Raises:
    ValueError: empty or repeated names, or names other than those the session started with.
  """
  given = tuple(str(n).strip() for n in ((given,) if isinstance(given, str) else given))
  if any(not n for n in given) or len({n.casefold() for n in given}) != len(given):
    raise ValueError(f"--new-class names must be distinct and non-empty, got {list(given)}")
  stored = tuple(doc.get("new_classes", ())) if doc is not None else ()
  if doc is not None and given and given != stored:
    started = f"with new classes {list(stored)}" if stored else "without new classes"
    raise ValueError(
      f"session {session} was started {started}; a session keeps its classes (pass the same "
      "--new-class names, or none; a new session can add classes)"
    )
  return given or stored


def with_new_classes(names: Sequence[str], added: Sequence[str]) -> tuple[str, ...]:
  """The class names with ``added`` after them.

  Raises:
    ValueError: an added name that a marks file could take for one of the classes: the same name in
      any letter case (marks files match names ignoring case), or a number (a class index).
  """
  for name in added:
    same = [n for n in names if n.casefold() == name.casefold()]
    if same:
      raise ValueError(
        f"--new-class {name!r} is already a class of the model ({', '.join(names)}); marks files "
        "match class names ignoring case"
      )
    if name.lstrip("+-").isdigit():
      raise ValueError(
        f"--new-class {name!r} is a number, which marks files read as a class index; name it with letters"
      )
  return tuple(names) + tuple(added)
