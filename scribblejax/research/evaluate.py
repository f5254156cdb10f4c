"""The evaluation harness: a simulated user corrects one case over N interactions, for any method.

For a case (image, ground truth) and a method (:mod:`scribblejax.research.baselines`), each interaction:

1. the simulated user (:func:`scribblejax.research.simulate.robot_marks`, deterministic) compares the
   method's *current* prediction with the ground truth and marks the largest error region of every
   class with its true class (or one click, or boxes: see ``EvalConfig.mark_kind``), never on a
   pixel it has marked before;
2. optionally the new marks grow into neighbouring pixels of similar intensity (region growing with
   threshold T, :func:`scribblejax.marks.grow_marks`);
3. the marks accumulate over the earlier ones and the method updates its segmentation;
4. Dice (per class and mean foreground), the fraction of all marks so far that the new segmentation
   honours (``satisfied``: all of them), whether the method's network honoured them itself
   (``network_satisfied``, from the method's ``info``, where it says), the classes marked and
   corrected, and the wall-clock seconds of the update are recorded.

When the user finds no new error to mark while the segmentation is still imperfect (what is left is
thinner than ``ignore_border``, or lies under marks the method does not honour), the run stops
there and says so (``stop_reason``, and a warning through ``log``): the remaining interactions
repeat the last Dice and are not counted as progress.

Every method is fed by the same deterministic user, but - as in any interactive evaluation - the
marks of interaction i > 1 depend on the method's own prediction after interaction i - 1, so two
methods see the same marks at interaction 1 only. Before the first interaction the method's
``warmup`` compiles everything on the case's shapes; its time is reported apart as
``compile_seconds`` (it is ~0 when an earlier case already compiled the same shapes), and
``seconds_per_interaction`` measures compiled code only.

Example:
  >>> case = task_case("nuclei2d", model_info)
  >>> result = run_case(case, refine_method(model, 5), EvalConfig(interactions=5))
  >>> result["dice_per_interaction"], result["noc"]
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scribblejax._checks import is_integer
from scribblejax.io import fileio
from scribblejax.marks import UNMARKED, accumulate, grow_marks
from scribblejax.params import head, split_params
from scribblejax.pipeline.round import honoured_fraction
from scribblejax.refinement import predict
from scribblejax.research import metrics
from scribblejax.research.baselines import Method
from scribblejax.research.simulate import ROBOT_USERS, robot_marks

TAUS = (0.85, 0.9)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Settings of the simulated user and the harness.

  Attributes:
    interactions: N, the number of interactions.
    mark_kind: the robot user (:data:`scribblejax.research.simulate.ROBOT_USERS`): "scribble", "point", "box",
      "click" (RITM's: one click per interaction) or "cvpr25" (an object box, then clicks).
    radius: thickness of points and scribbles.
    max_length: most skeleton pixels per scribble (short scribbles: small values).
    per_class: one mark per class with errors (True) or only the largest error overall.
    ignore_border: errors thinner than this along a boundary are left alone.
    region_growing: T, the intensity threshold for growing new marks (0: off).
    grow_max_distance: most layers a mark grows (``None``: unbounded).
    taus: Dice thresholds for NoC.
  """

  interactions: int = 5
  mark_kind: str = "scribble"
  radius: int = 1
  max_length: int = 40
  per_class: bool = True
  ignore_border: int = 1
  region_growing: float = 0.0
  grow_max_distance: int | None = 20
  taus: tuple[float, ...] = TAUS

  def __post_init__(self):
    if not isinstance(self.interactions, (int, np.integer)) or self.interactions < 0:
      raise ValueError(f"interactions must be a non-negative integer, got {self.interactions!r}")
    if self.mark_kind not in ROBOT_USERS:
      raise ValueError(f"mark kind must be one of {ROBOT_USERS}, got {self.mark_kind!r}")
    if not np.isfinite(self.region_growing) or self.region_growing < 0:
      raise ValueError(f"region growing threshold must be finite and >= 0, got {self.region_growing!r}")
    for name, least in (("radius", 0), ("max_length", 1), ("ignore_border", 0)):
      value = getattr(self, name)
      if not is_integer(value) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not self.taus or any(not 0 < float(t) <= 1 for t in self.taus):
      raise ValueError(f"taus are Dice thresholds in (0, 1], got {self.taus!r}")


class Case(NamedTuple):
  """One image to correct."""

  name: str
  image: np.ndarray  # float32[*spatial, C], already normalised for the model
  truth: np.ndarray  # int32[*spatial]
  num_classes: int
  class_names: tuple[str, ...]


def make_case(name: str, image: Any, truth: Any, num_classes: int, class_names: Sequence[str] | None = None) -> Case:
  """Validates and packs a case.

  Raises:
    ValueError: shape mismatch between image and labels, non-integer labels, or label values outside
      ``0..num_classes-1``.
  """
  image = np.asarray(image, np.float32)
  truth = np.asarray(truth)
  if image.shape == truth.shape:
    image = image[..., None]
  if image.shape[:-1] != truth.shape:
    raise ValueError(f"image of shape {image.shape[:-1]} (spatial) and label map of shape {truth.shape} differ")
  if truth.dtype.kind == "f":
    if not np.all(np.isfinite(truth)) or not np.all(truth == np.round(truth)):
      raise ValueError("the label map must hold integer class values")
  elif truth.dtype.kind not in "iub":
    raise ValueError(f"the label map must be an integer array, got dtype {truth.dtype}")
  truth = truth.astype(np.int64)
  if truth.size and (truth.min() < 0 or truth.max() >= num_classes):
    raise ValueError(
      f"label values {int(truth.min())}..{int(truth.max())} lie outside the {num_classes} classes 0..{num_classes - 1}"
    )
  if not np.all(np.isfinite(image)):
    raise ValueError("the image contains NaN or Inf values")
  if class_names and len(class_names) != num_classes:
    raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
  names = tuple(class_names) if class_names else tuple(f"class {c}" for c in range(num_classes))
  return Case(name, image, truth.astype(np.int32), int(num_classes), names)


def _json_float(x: float) -> float | None:
  return None if x is None or not np.isfinite(x) else float(x)


def next_marks(
  marks: np.ndarray,
  drawn: np.ndarray,
  new: np.ndarray,
  image: np.ndarray,
  region_growing: float,
  max_distance: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One interaction's marks: the new drawn marks, grown (``region_growing`` > 0), over the marks so far.

  What the user drew before stands: growth neither replaces nor crosses it. What earlier growth
  inferred, this round's growth may relabel.

  Returns:
    ``(marks, drawn, new)``: every mark so far, the drawn ones among them, and this round's (grown).
  """
  if region_growing > 0:
    grown = grow_marks(new, image, region_growing, max_distance=max_distance, blocked=drawn >= 0)
  else:
    grown = new
  return accumulate(marks, grown), accumulate(drawn, new), grown


def marks_honoured(labels: np.ndarray, marks: np.ndarray) -> float | None:
  """The fraction of marked pixels whose label is their mark (``None`` with nothing marked): the round's
  :func:`scribblejax.pipeline.round.honoured_fraction`, which says 1 where the harness says nothing."""
  marks = np.asarray(marks)
  return honoured_fraction(np.asarray(labels), marks) if (marks >= 0).any() else None


def dice_auc(dice: Sequence[float | None]) -> float | None:
  """The area under Dice over interactions 0..N (trapezoids), divided by N: 1 is perfect throughout."""
  values = [np.nan if d is None else d for d in dice]
  if len(values) < 2 or not np.all(np.isfinite(values)):
    return None
  return float((np.sum(values) - (values[0] + values[-1]) / 2) / (len(values) - 1))


def run_case(case: Case, method: Method, config: EvalConfig = EvalConfig(), *, log=None) -> dict:
  """Runs N interactions of the simulated user against ``method`` on ``case``.

  Args:
    case: the image and its ground truth.
    method: the method under test.
    config: the simulated user and harness settings.
    log: called with a message when the user stops early with errors left (``None``: silent).

  Returns:
    A JSON-serialisable dict: ``dice_per_interaction`` (N+1 values, index 0 before any mark),
    ``dice_per_class`` (per interaction), ``noc`` ({tau: int}), ``noc_reached``, ``dice_auc``,
    ``marks_honoured`` and ``satisfied`` per interaction, ``rounds_unsatisfied``,
    ``seconds_per_interaction``, ``compile_seconds``, ``initial_seconds``, ``marked_pixels``,
    ``classes_marked``, ``classes_corrected`` and ``method_info`` per interaction, ``stopped_early``
    (the interactions run when the user stopped, else ``None``) and ``stop_reason``.
  """
  start = time.perf_counter()
  method.warmup(case.image)
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  state = method.init(case.image)
  labels = np.asarray(method.labels(state))
  initial_seconds = time.perf_counter() - start
  k = case.num_classes
  dice = [metrics.mean_foreground_dice(labels, case.truth, k)]
  per_class = [metrics.dice_per_class(labels, case.truth, k)]
  seconds, marked, classes_marked, corrected, info, honoured, satisfied = [], [], [], [], [], [], []
  marks = np.full(case.truth.shape, UNMARKED, np.int32)
  drawn = marks  # the simulated user's own marks so far (without region growing's)
  stopped, reason = None, None
  for i in range(1, config.interactions + 1):
    # never where the user drew before; where growth inferred a wrong class, the user may mark again
    new = robot_marks(
      config.mark_kind,
      i,
      labels,
      case.truth,
      k,
      radius=config.radius,
      max_length=config.max_length,
      per_class=config.per_class,
      ignore_border=config.ignore_border,
      marked=drawn >= 0,
    )
    new = np.where(drawn >= 0, UNMARKED, new).astype(np.int32)
    if not (new >= 0).any():
      stopped = i - 1
      reason = "perfect" if np.array_equal(labels, case.truth) else "no new error to mark"
      if reason != "perfect" and log is not None:
        log(
          f"{case.name} / {method.name}: after {stopped} interaction(s) the simulated user finds no new error "
          f"to mark (Dice {dice[-1]:.3f}); the remaining interactions repeat it"
        )
      break
    marks, drawn, new = next_marks(marks, drawn, new, case.image, config.region_growing, config.grow_max_distance)
    before = labels
    t0 = time.perf_counter()
    state = method.update(state, marks)
    labels = np.asarray(jax.block_until_ready(method.labels(state)))
    seconds.append(time.perf_counter() - t0)
    dice.append(metrics.mean_foreground_dice(labels, case.truth, k))
    per_class.append(metrics.dice_per_class(labels, case.truth, k))
    marked.append(int((new >= 0).sum()))
    classes_marked.append(sorted(int(c) for c in np.unique(new[new >= 0])))
    corrected.append(metrics.classes_corrected(before, labels, case.truth, k))
    info.append(method.info(state))
    honoured.append(marks_honoured(labels, marks))
    satisfied.append(honoured[-1] == 1.0)
  if stopped is not None:  # what the user left stays as it is
    dice += [dice[-1]] * (config.interactions - stopped)
  timing = metrics.timing_summary(seconds, compile_seconds)
  noc = metrics.noc_summary(dice, config.taus)
  return {
    "case": case.name,
    "method": method.name,
    "num_classes": k,
    "class_names": list(case.class_names),
    "mark_kind": config.mark_kind,
    "interactions": config.interactions,
    "region_growing": config.region_growing,
    "max_length": config.max_length,
    "dice_per_interaction": [_json_float(d) for d in dice],
    "dice_per_class": [[_json_float(x) for x in d] for d in per_class],
    "noc": {t: v["noc"] for t, v in noc.items()},
    "noc_reached": {t: v["reached"] for t, v in noc.items()},
    "dice_auc": dice_auc(dice),
    "marks_honoured": honoured,
    "satisfied": satisfied,
    "rounds_unsatisfied": int(sum(not s for s in satisfied)),
    "network_unsatisfied": int(sum(not x["satisfied"] for x in info if "satisfied" in x)),
    "seconds_per_interaction": timing["seconds_per_interaction"],
    "mean_seconds": _json_float(timing["mean_seconds"]),
    "compile_seconds": timing["compile_seconds"],
    "initial_seconds": initial_seconds,
    "marked_pixels": marked,
    "classes_marked": classes_marked,
    "classes_corrected": corrected,
    "method_info": info,
    "stopped_early": stopped,
    "stop_reason": reason,
  }


def compare_methods(case: Case, methods: Sequence[Method], config: EvalConfig = EvalConfig()) -> list[dict]:
  """:func:`run_case` for each method with the same simulated user and settings."""
  return [run_case(case, m, config) for m in methods]


def device_name() -> str:
  """The JAX device kind, e.g. ``"cpu"`` or ``"NVIDIA H100 80GB HBM3"``."""
  return jax.devices()[0].device_kind


# A selection of the x86 instruction-set extensions by which XLA and oneDNN choose their kernels, and so
# the rounding of a computation (not all of them: enough to tell the usual server generations apart). Two
# machines that differ in them can give different correction curves (docs/correction.md, "Results").
CPU_FEATURES = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_of(cpuinfo: str) -> dict:
  """The host CPU from the text of ``/proc/cpuinfo``: its model name and which of :data:`CPU_FEATURES` it has.

  Args:
    cpuinfo: the file's text (its first processor's ``model name`` and ``flags`` lines are read).

  Returns:
    ``{"cpu_model": str | None, "cpu_features": list[str]}`` (features in :data:`CPU_FEATURES`' order).
  """
  fields = {}
  for line in cpuinfo.splitlines():
    key, sep, value = line.partition(":")
    if sep and key.strip() in ("model name", "flags"):
      fields.setdefault(key.strip(), value.strip())
  flags = set(fields.get("flags", "").split())
  return {"cpu_model": fields.get("model name"), "cpu_features": [f for f in CPU_FEATURES if f in flags]}


def host_cpu() -> dict:
  """:func:`cpu_of` this machine (``cpu_model`` ``None`` and no features where ``/proc/cpuinfo`` is absent)."""
  try:
    with open("/proc/cpuinfo") as f:
      return cpu_of(f.read())
  except OSError:
    return cpu_of("")


# ---------------------------------------------------------------------------------------------
# Writing results: JSON, a markdown table and a PNG plot, each atomically
# ---------------------------------------------------------------------------------------------


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` as indented JSON, atomically."""
  fileio.write_json(path, obj, default=_json_default)


def _json_default(x):
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return _json_float(float(x))
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes text atomically."""
  fileio.write_text(path, text)


def _fmt(x, digits: int = 3) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  return str(x)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], header: Sequence[str] | None = None) -> str:
  """A markdown table of ``rows`` (dicts) over ``columns``."""
  header = list(header or columns)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
  return "\n".join(lines) + "\n"


def results_table(results: Sequence[dict]) -> str:
  """Markdown: one row per result with Dice per interaction, NoC and timing."""
  n = max(len(r["dice_per_interaction"]) for r in results)
  rows = []
  for r in results:
    row = {"case": r.get("case"), "method": r["method"], "marks": r.get("mark_kind")}
    for i, d in enumerate(r["dice_per_interaction"]):
      row[f"d{i}"] = d
    for t, v in r["noc"].items():
      row[f"noc{t}"] = f"{v}" + ("" if r["noc_reached"][t] else "+")
    row["s"] = r.get("mean_seconds")
    row["compile"] = r.get("compile_seconds")
    rows.append(row)
  taus = list(results[0]["noc"])
  cols = ["case", "method", "marks"] + [f"d{i}" for i in range(n)] + [f"noc{t}" for t in taus] + ["s", "compile"]
  head = (
    ["case", "method", "marks"]
    + [f"Dice@{i}" for i in range(n)]
    + [f"NoC@{t}" for t in taus]
    + ["s/interaction", "compile s"]
  )
  return markdown_table(rows, cols, head) + (
    "\nDice@i: mean foreground Dice after i interactions (0: the "
    "network alone). NoC@tau: interactions to reach tau; '+' = not "
    "reached within the interactions run (capped). s/interaction: "
    "mean over interactions of compiled code; compile s: warm-up "
    "apart.\n"
  )


def plot_curves(
  path: str | os.PathLike,
  curves: dict[str, Sequence[float]],
  *,
  title: str = "",
  xlabel: str = "interaction",
  ylabel: str = "mean foreground Dice",
  x: Sequence | None = None,
) -> None:
  """A line plot of named curves, written atomically as PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for name, ys in curves.items():
    ys = [np.nan if y is None else y for y in ys]
    xs = list(range(len(ys))) if x is None else list(x)[: len(ys)]
    ax.plot(xs, ys, marker="o", ms=3, label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()

  try:
    with fileio.atomic_path(path) as tmp:
      fig.savefig(tmp, format="png", dpi=100)
  finally:
    plt.close(fig)


def write_results(
  out_dir: str | os.PathLike,
  name: str,
  payload: dict,
  results: Sequence[dict],
  *,
  table: str | None = None,
  curves: dict | None = None,
  title: str = "",
  **plot_kw,
) -> dict:
  """Writes ``out_dir/name.json``, ``name.md`` and ``name.png`` (Dice curves of ``results``)."""
  out = Path(out_dir)
  write_json(out / f"{name}.json", payload)
  text = f"# {title or name}\n\n" + (payload.get("description", "") + "\n\n" if payload.get("description") else "")
  text += table if table is not None else results_table(results)
  text += f"\nmachine: {payload.get('device', device_name())}; size: {payload.get('size', '-')}\n"
  write_text(out / f"{name}.md", text)
  if curves is None:
    curves = {
      f"{r.get('case', '')} {r['method']} {r.get('mark_kind', '')}".strip(): r["dice_per_interaction"] for r in results
    }
  plot_curves(out / f"{name}.png", curves, title=title or name, **plot_kw)
  return payload


# ---------------------------------------------------------------------------------------------
# Built-in tasks and backbones
# ---------------------------------------------------------------------------------------------

# task -> the built-in backbone it uses by default
TASK_MODELS = {
  "nuclei2d": "nuclei2d",
  "nuclei3d_slices": "nuclei2d",
  "tissue2d": "tissue2d",
  "tissue2d_shifted": "tissue2d",
  "tissue3d": "tissue3d",
}
TASKS = tuple(TASK_MODELS)
FALLBACK_NORMALIZATION = {"kind": "percentile", "lower": 1.0, "upper": 99.8}
TISSUE_TEST_SLICE = 125  # the axial slice (z, 1 mm) of the 2D tissue case: inside the test range 105..149


class Backbone(NamedTuple):
  """A model with what the harness needs to know about it."""

  model: Any
  name: str  # built-in name or folder
  normalization: Any
  class_names: tuple[str, ...] | None
  num_classes: int
  info: Any = None  # the stored model's ModelInfo (None for a backbone built here)


def cache_dir() -> Path:
  """Where fallback backbones are cached: ``$SCRIBBLEJAX_CACHE`` or ``~/.cache/scribblejax``."""
  return Path(os.environ.get("SCRIBBLEJAX_CACHE", Path.home() / ".cache" / "scribblejax"))


def _num_classes(model, info) -> int:
  n = getattr(model, "num_classes", None)
  if n is None and info.class_names:
    n = len(info.class_names)
  if n is None:
    n = info.kwargs.get("num_classes") or info.kwargs.get("out_channels")
  if n is None:
    raise ValueError(f"cannot tell how many classes the model {info.path} has")
  return int(n)


def load_backbone(name_or_path: str | os.PathLike) -> Backbone:
  """A built-in model by name or a saved model folder (see :func:`scribblejax.load_model`)."""
  from scribblejax.models.store import load_model

  model, info = load_model(name_or_path)
  return Backbone(model, str(name_or_path), info.normalization, info.class_names, _num_classes(model, info), info)


def fallback_nuclei2d(train_steps: int = 300, log=print) -> Backbone:
  """The shipped ``nuclei2d`` model, or (until it ships) a 16/32/64 U-Net trained on the DSB training
  columns for ``train_steps`` Adam steps, cached under :func:`cache_dir`."""
  from scribblejax.models.store import builtin_models, save_model

  if "nuclei2d" in builtin_models():
    return load_backbone("nuclei2d")
  folder = cache_dir() / f"fallback_nuclei2d_{train_steps}"
  if (folder / "model.json").is_file():
    return load_backbone(folder)._replace(name=f"fallback nuclei2d ({train_steps} steps, {folder})")
  from flax import nnx

  from scribblejax.models.unet import UNet
  from scribblejax.pipeline.normalization import normalize
  from scribblejax.research import data
  from scribblejax.research.train import TrainConfig, train_segmenter

  ds = data.nuclei2d("binary")
  kwargs = dict(spatial_dims=2, in_channels=1, num_classes=2, channels=[16, 32, 64])
  model = UNet(**kwargs, rngs=nnx.Rngs(0))
  log(f"no shipped nuclei2d weights: training a fallback U-Net for {train_steps} steps")
  train_segmenter(
    model,
    normalize(ds.image, FALLBACK_NORMALIZATION)[ds.train],
    ds.labels[ds.train],
    TrainConfig(steps=train_steps, crop=96, batch_size=4),
  )
  save_model(
    folder,
    model,
    family="scribblejax.UNet",
    kwargs=kwargs,
    normalization=FALLBACK_NORMALIZATION,
    class_names=list(ds.class_names),
    metadata={"note": f"fallback, {train_steps} Adam steps"},
    overwrite=True,
  )
  return load_backbone(folder)._replace(name=f"fallback nuclei2d ({train_steps} steps, {folder})")


def resolve_backbone(
  name_or_path: str | os.PathLike | None, task: str | None = None, *, train_steps: int = 300
) -> Backbone:
  """The model named (built-in or folder), or the task's default built-in one.

  Raises:
    ValueError: nothing given and the task's built-in model is not shipped (nuclei2d alone has a
      trained-on-the-fly fallback).
  """
  from scribblejax.models.store import builtin_models

  if name_or_path is not None:
    return load_backbone(name_or_path)
  if task is None:
    raise ValueError("give a model (--model NAME_OR_PATH) or a built-in task")
  name = TASK_MODELS[task]
  if name in builtin_models():
    return load_backbone(name)
  if name == "nuclei2d":
    return fallback_nuclei2d(train_steps)
  raise ValueError(f"the built-in model {name!r} for task {task!r} is not shipped; pass --model NAME_OR_PATH")


def centre_crop(arrays: Sequence[np.ndarray], size: int | Sequence[int] | None, ndim: int) -> list[np.ndarray]:
  """The centre ``size`` (per axis, or one size for all) of each array's first ``ndim`` axes (all of
  each array when ``size`` is ``None``)."""
  if size is None:
    return list(arrays)
  sizes = (size,) * ndim if isinstance(size, (int, np.integer)) else tuple(size)
  shape = arrays[0].shape[:ndim]
  index = tuple(slice(max(0, (s - c) // 2), max(0, (s - c) // 2) + c) for s, c in zip(shape, sizes))
  return [a[index] for a in arrays]


def shift_intensity(image: np.ndarray, gamma: float = 0.6, ramp: float = 0.4) -> np.ndarray:
  """A non-linear contrast change and a smooth intensity ramp (a stand-in for scanner/bias-field shift).

  The image is scaled to 0..1 by its maximum, raised to ``gamma``, and multiplied by a linear ramp
  from ``1 - ramp/2`` to ``1 + ramp/2`` along the last spatial axis; then scaled back to the original
  maximum. Percentile normalisation cannot undo either change.
  """
  image = np.asarray(image, np.float32)
  top = float(image.max()) or 1.0
  x = np.clip(image / top, 0, None) ** gamma
  n = image.shape[-2]
  ramp_profile = np.linspace(1 - ramp / 2, 1 + ramp / 2, n, dtype=np.float32)
  x = x * ramp_profile.reshape((1,) * (image.ndim - 2) + (n, 1))
  return (x * top).astype(np.float32)


def task_case(task: str, backbone: Backbone, crop: int | Sequence[int] | None = None) -> Case:
  """A built-in evaluation case, normalised as ``backbone`` expects.

  Tasks:
    * ``nuclei2d``: the DSB test columns 384..511 (512x128), binary.
    * ``nuclei3d_slices``: three planes (z = 8, 15, 22) of the synthetic 3D nuclei side by side
      (61x171), binary: a distribution shift for a 2D DSB model.
    * ``tissue2d``: MNI axial slice z = 125 (test range), 197x233, 4 derived tissue classes.
    * ``tissue2d_shifted``: the same slice after :func:`shift_intensity`.
    * ``tissue3d``: the 2 mm MNI test slab, 4 derived tissue classes.
  """
  from scribblejax.pipeline.normalization import normalize
  from scribblejax.research import data

  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
  if task == "nuclei2d":
    ds = data.nuclei2d("binary")
    image, truth = ds.image[ds.test], ds.labels[ds.test]
    names = ds.class_names
  elif task == "nuclei3d_slices":
    ds = data.nuclei3d()
    volume, labels = ds.image, ds.labels
    planes = (8, 15, 22)
    image = np.concatenate([volume[z] for z in planes], axis=1)
    truth = np.concatenate([labels[z] for z in planes], axis=1)
    names = ("background", "nucleus")
  elif task in ("tissue2d", "tissue2d_shifted"):
    ds = data.tissue2d()
    image, truth = ds.image[TISSUE_TEST_SLICE], ds.labels[TISSUE_TEST_SLICE]
    if task == "tissue2d_shifted":
      image = shift_intensity(image)
    names = ds.class_names
  else:
    ds = data.tissue3d()
    image, truth = ds.image[ds.test], ds.labels[ds.test]
    names = ds.class_names
  image, truth = centre_crop([image, truth], crop, truth.ndim)
  image = normalize(image, backbone.normalization)
  return make_case(task, image, truth, backbone.num_classes, backbone.class_names or names)


def suppression_amount(model: nnx.Module, image: np.ndarray, c: int, margin: float = 1.0) -> float:
  """The smallest lowering of class ``c``'s logit that removes ``c`` from the prediction on ``image``,
  plus ``margin`` (0 plus ``margin`` when ``c`` is never predicted)."""
  image = np.asarray(image)
  split = split_params(model, head(), example=jax.ShapeDtypeStruct((1, *image.shape), jnp.float32))

  logits = np.asarray(predict(split, image))
  others = np.delete(logits, c, axis=-1).max(-1)
  return float(max(0.0, (logits[..., c] - others).max()) + margin)
