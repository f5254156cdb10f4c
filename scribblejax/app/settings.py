"""The settings of a refinement round, in one table: :data:`SETTINGS`, keyed by
:class:`scribblejax.RefineConfig` field (and the round's own knobs), gives each setting its one
command-line name, its type and help, the commands that offer it, and says whether a model may store a
default for it (``model.json`` ``metadata.refine``) and whether the report states it. The command
lines' flags (:mod:`scribblejax.cli.flags`), the round's settings (:class:`RefineSettings`, generated
from the table), the model's stored defaults, the napari widget's fields and the report's ``settings``
all derive from it: a new setting is one row."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from scribblejax.config import COMPUTE_DTYPES, DRIVERS, OPTIMIZERS, PRESETS, RefineConfig, default_learning_rate
from scribblejax.io.marks_files import RECTANGLE_MODES
from scribblejax.kernels import CONV_BACKENDS

# the front ends a setting may be offered by: the commands' flags, and the napari widget's fields
FRONT_ENDS = ("refine", "evaluate", "view", "demo", "napari")


class Setting(NamedTuple):
  """One setting of a round, as the command line and ``model.json`` name it.

  Attributes:
    flag: its one documented command-line name.
    type: int, float, str or bool.
    help: its help on the command line (and its line in :class:`RefineSettings`' docstring).
    stored: a model may state a default (``model.json`` ``metadata.refine``); the flag's default is then
      ``None`` ("the model's, else the preset's").
    choices: the values it takes, if a closed set.
    aliases: older names that still work, undocumented.
    metavar: the value's name in the help (default: the flag's, in capitals).
    default: the default of a round's own knob that no model stores (a ``RefineConfig`` field's default
      is ``RefineConfig``'s; a stored setting's is ``None``).
    commands: the front ends that offer it (:data:`FRONT_ENDS`): each command's flags, and ``"napari"``
      for a field of the widget (a number's edit box, a bool's check box).
    reported: the report's ``settings`` state it (in the table's order).
  """

  flag: str
  type: type
  help: str
  stored: bool = False
  choices: tuple[str, ...] | None = None
  aliases: tuple[str, ...] = ()
  metavar: str | None = None
  default: Any = None
  commands: tuple[str, ...] = ("refine",)
  reported: bool = True


# Keyed by RefineConfig field, then the round's own knobs (RefineSettings fields that are not RefineConfig's),
# in the order the report's "settings" and the commands' help list them.
SETTINGS: dict[str, Setting] = {
  "layers": Setting(
    "--layers",
    int,
    "tunable last layers l (default: 5, or fewer if the model has fewer)",
    stored=True,
    metavar="L",
    commands=("refine", "evaluate", "view", "demo", "napari"),
  ),
  "max_steps": Setting(
    "--steps",
    int,
    "most optimiser steps M",
    stored=True,
    metavar="M",
    commands=("refine", "evaluate", "view", "demo", "napari"),
  ),
  "learning_rate": Setting(
    "--learning-rate",
    float,
    "the optimiser's learning rate",
    stored=True,
    aliases=("--lr",),
    metavar="LR",
    commands=("refine", "evaluate", "napari"),
  ),
  "momentum": Setting("--momentum", float, "SGD momentum", stored=True),
  "prox_weight": Setting(
    "--prox-weight",
    float,
    "alpha, the weight of ||W_lam - W||_2",
    stored=True,
    aliases=("--alpha",),
    metavar="ALPHA",
    commands=("refine", "evaluate", "napari"),
  ),
  "region_growing": Setting(
    "--region-growing",
    float,
    "grow this round's marks into neighbours whose normalised intensity differs by < T",
    stored=True,
    metavar="T",
    commands=("refine", "evaluate", "view", "napari"),
  ),
  "keep_weight": Setting(
    "--keep-weight",
    float,
    "weight of the keep term: the unmarked pixels' cross-entropy against the network's labels",
    stored=True,
    commands=("refine", "evaluate", "demo", "napari"),
  ),
  "optimizer": Setting(
    "--optimizer", str, "the optimiser", stored=True, choices=OPTIMIZERS, commands=("refine", "evaluate")
  ),
  "progressive_merge": Setting(
    "--progressive-merge",
    bool,
    "change the segmentation only in the regions of change "
    "that touch this round's marks and where the refined network is very sure, never where the network was "
    "very sure (but for classes appended to its head), and honour every mark in it "
    "(default: on; off in the paper preset)",
    stored=True,
    commands=("refine", "evaluate", "view", "napari"),
  ),
  "merge_contrast": Setting(
    "--merge-contrast",
    float,
    "with the merge, also take each region of change that looks like its neighbours of its new class "
    "by a score above S, in [-1, 1] (1: none)",
    metavar="S",
    commands=("refine", "evaluate"),
  ),
  "preset": Setting(
    "--preset",
    str,
    "the settings every option left out takes: the library's defaults, or "
    "'paper' (Algorithm 1 exactly: SGD 0.01, momentum 0.9, alpha 1, no keep term, no merge)",
    choices=PRESETS,
    default="default",
    commands=("refine", "evaluate", "demo"),
  ),
  "class_balance": Setting("--class-balance", bool, "weight every marked class equally"),
  "continue_weights": Setting(
    "--continue-weights",
    bool,
    "in a session, start from the previous round's weights instead of the network's",
    default=False,
    commands=("refine", "napari"),
  ),
  "driver": Setting(
    "--driver",
    str,
    "auto: one compiled loop on GPU/TPU, and on the CPU with oneDNN convolutions "
    "(the cpu extra); host-driven chunks on the CPU otherwise",
    choices=DRIVERS,
    reported=False,
  ),
  "check_every": Setting("--check-every", int, "steps per compiled chunk of the host driver"),
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
}
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(RefineConfig))
_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RefineConfig)}
# RefineConfig fields a round's settings (and a model's stored "metadata.refine") may give
TUNED = tuple(name for name, s in SETTINGS.items() if s.stored and name in CONFIG_FIELDS)
# the report's "settings", in this order
REPORTED = tuple(name for name, s in SETTINGS.items() if s.reported)
# each setting's default in RefineSettings (and its flag's): None for a stored one (the model's, else the
# preset's), else RefineConfig's for its fields, else the table's
DEFAULTS = {
  name: None if s.stored else _CONFIG_DEFAULTS[name] if name in CONFIG_FIELDS else s.default
  for name, s in SETTINGS.items()
}


def settings_of(front_end: str) -> tuple[str, ...]:
  """The settings a front end (:data:`FRONT_ENDS`) offers, in the table's order.

  Raises:
    ValueError: an unknown front end.
  """
  if front_end not in FRONT_ENDS:
    raise ValueError(f"front end must be one of {FRONT_ENDS}, got {front_end!r}")
  return tuple(name for name, s in SETTINGS.items() if front_end in s.commands)


def _resolve(self, metadata: dict) -> tuple[int | None, RefineConfig, float | None]:
  """``(layers, RefineConfig, region_growing)`` with the defaults filled in: each setting as given, else
  (a stored one) the model's stored default, else the preset's.

  Args:
    metadata: the model's stored metadata (its ``refine`` entry: the stored defaults; ignored under the
      paper preset).

  Raises:
    ValueError: an unknown preset, a setting out of range, or a negative region-growing threshold.
  """
  stored = (metadata or {}).get("refine", {}) if isinstance(metadata, dict) else {}
  if self.preset not in PRESETS:
    raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
  if self.preset == "paper":  # the paper's settings, whatever the model stores
    stored = {}
  values = {}
  for name, setting in SETTINGS.items():
    value = getattr(self, name)
    values[name] = stored.get(name) if value is None and setting.stored else value
  if values["learning_rate"] is None:
    values["learning_rate"] = default_learning_rate(values["optimizer"])  # None: the preset's own
  # a RefineConfig field overrides the preset's where it is given: a stored setting when not None, another
  # when not its default
  given = {
    name: value
    for name, value in values.items()
    if name in CONFIG_FIELDS and value is not None and (SETTINGS[name].stored or value != DEFAULTS[name])
  }
  config = (RefineConfig.paper if self.preset == "paper" else RefineConfig)(**given)
  grow = values["region_growing"]
  if grow is not None and (not np.isfinite(grow) or grow < 0):
    raise ValueError(f"the region growing threshold must be finite and >= 0, got {grow}")
  return values["layers"], config, grow or None


def _settings_doc() -> str:
  lines = [
    "The knobs of one refinement round, one field per :data:`SETTINGS` row (generated from it); a stored",
    "setting left ``None`` takes the model's stored default (``model.json`` ``metadata.refine``), else the",
    "preset's (``preset``: the library's defaults, or ``RefineConfig.paper()``).",
    "",
    "Attributes:",
  ]
  lines += [f"  {name}: {s.help} (``{s.flag}``)." for name, s in SETTINGS.items()]
  lines += [
    "  new_classes: names of output classes to append to the network's head for structures it was never",
    "    trained for (:func:`scribblejax.models.add_classes`: each starts as the background's logit less 4,",
    "    so the first segmentation is the network's own); they follow the model's classes. A session keeps",
    "    the classes it started with.",
  ]
  return "\n".join(lines)


RefineSettings = dataclasses.make_dataclass(
  "RefineSettings",
  [
    (name, s.type | None if s.stored else s.type, dataclasses.field(default=DEFAULTS[name]))
    for name, s in SETTINGS.items()
  ]
  + [("new_classes", tuple[str, ...], dataclasses.field(default=()))],
  namespace={"resolve": _resolve, "__doc__": _settings_doc(), "__module__": __name__},
  frozen=True,
)


def reported_settings(settings: RefineSettings, layers: int, config: RefineConfig, grow: float | None) -> dict:
  """The report's ``settings``: what a round ran with, its defaults filled in (:data:`REPORTED`): the
  resolved ``layers`` and ``grow``, each ``RefineConfig`` field's value in ``config`` (the optimizer by
  name), and the round's other knobs as given."""
  resolved = {"layers": layers, "region_growing": grow, "optimizer": str(config.optimizer or "sgd")}

  def value(name: str) -> Any:
    if name in resolved:
      return resolved[name]
    return getattr(config, name) if name in CONFIG_FIELDS else getattr(settings, name)

  return {name: value(name) for name in REPORTED}


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
