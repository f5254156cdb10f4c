"""The README's demo: refine a real backbone on a real image, with Dice before/after and a PNG overlay.

The default task corrects the right 128 columns of the DSB 2018 nuclei image with the shipped
``nuclei2d`` model (or, without shipped weights, a small U-Net trained on the left columns first);
``task="tissue2d"`` corrects an MNI152 test slice with the shipped 4-class ``tissue2d`` model. Each
interaction of the simulated user marks the largest error of every class.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from scribblejax._checks import is_integer
from scribblejax.config import RefineConfig
from scribblejax.io import fileio
from scribblejax.models.store import builtin_models, load_model
from scribblejax.models.unet import UNet
from scribblejax.params import last_layers, split_params
from scribblejax.pipeline.normalization import normalize
from scribblejax.refinement import describe_marks, marks_report, resolve_driver
from scribblejax.research import data, metrics
from scribblejax.research.simulate import ROBOT_USER_SCHEDULES, simulate_marks
from scribblejax.research.train import TrainConfig, machine_description, train_segmenter
from scribblejax.session import add_marks, current_labels, current_marks, start_session

NORMALIZATION = {"kind": "percentile", "lower": 1.0, "upper": 99.8}
DEMO_TASKS = ("nuclei2d", "tissue2d", "tissue2d_shifted", "nuclei3d_slices")


def demo_backbone(train_steps: int, log=print) -> tuple[nnx.Module, dict]:
  """The shipped nuclei model, or a small U-Net trained now on the DSB training columns."""
  if "nuclei2d" in builtin_models():
    model, info = load_model("nuclei2d")
    log(f"backbone: shipped model 'nuclei2d' ({info.family})")
    return model, {"normalization": info.normalization, "source": "shipped nuclei2d"}
  ds = data.nuclei2d("binary")
  image = normalize(ds.image, NORMALIZATION)
  model = UNet(spatial_dims=2, in_channels=1, num_classes=2, channels=(16, 32, 64), rngs=nnx.Rngs(0))
  log(
    f"backbone: no shipped weights; training a 16/32/64 U-Net for {train_steps} Adam steps on the DSB training columns"
  )
  start = time.perf_counter()
  train_segmenter(model, image[ds.train], ds.labels[ds.train], TrainConfig(steps=train_steps, crop=96, batch_size=4))
  return model, {
    "normalization": NORMALIZATION,
    "source": f"trained for {train_steps} steps",
    "train_seconds": time.perf_counter() - start,
  }


def _case(task: str, train_steps: int, log):
  """(model, image, truth, num_classes, backbone description) of a built-in 2D task."""
  from scribblejax.research import evaluate

  if task not in DEMO_TASKS:
    raise ValueError(f"unknown demo task {task!r}; choose one of {DEMO_TASKS}")
  if task == "nuclei2d":
    model, source = demo_backbone(train_steps, log)
    ds = data.nuclei2d("binary")
    return model, normalize(ds.image, source["normalization"])[ds.test], ds.labels[ds.test], 2, source["source"]
  backbone = evaluate.resolve_backbone(None, task)
  log(f"backbone: shipped model {backbone.name!r}")
  case = evaluate.task_case(task, backbone)
  return backbone.model, case.image, case.truth, case.num_classes, f"shipped {backbone.name}"


def _overlay(
  path: Path,
  image: np.ndarray,
  truth: np.ndarray,
  before: np.ndarray,
  after: np.ndarray,
  marks: np.ndarray,
  num_classes: int,
  dice_before: float,
  dice_after: float,
  honoured: str,
) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  height = image.shape[0] / image.shape[1] * 3
  fig, axes = plt.subplots(1, 3, figsize=(9, min(12.0, height + 0.8)))
  panels = [
    ("ground truth", truth, None),
    (f"network: Dice {dice_before:.3f}", before, None),
    (f"refined: Dice {dice_after:.3f}, {honoured}", after, marks),
  ]
  for ax, (title, seg, mk) in zip(axes, panels):
    ax.imshow(image, cmap="gray")
    if num_classes == 2:
      ax.contour(seg > 0, levels=[0.5], colors="yellow", linewidths=0.7)
    else:
      ax.imshow(
        np.ma.masked_equal(seg, 0), cmap="viridis", vmin=0, vmax=num_classes - 1, alpha=0.45, interpolation="nearest"
      )
    if mk is not None:
      ax.imshow(
        np.ma.masked_less(mk, 0), cmap="cool", vmin=0, vmax=num_classes - 1, alpha=0.95, interpolation="nearest"
      )
    ax.set_title(title, fontsize=9)
    ax.axis("off")
  fig.tight_layout()
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=110)
  plt.close(fig)


def run_demo(
  out_dir: str | os.PathLike = "demo_output",
  *,
  task: str = "nuclei2d",
  train_steps: int = 150,
  interactions: int = 3,
  kind: str = "scribble",
  layers: int = 5,
  config: RefineConfig = RefineConfig(),
  log=print,
) -> dict:
  """Runs the demo and writes ``overlay.png`` and ``results.json`` into ``out_dir``.

  Args:
    out_dir: output folder.
    task: a built-in 2D case (``DEMO_TASKS``): the DSB nuclei test columns by default.
    train_steps: training steps of the nuclei backbone when no shipped weights exist.
    interactions: rounds of the simulated user.
    kind: a robot user (:data:`scribblejax.research.simulate.ROBOT_USERS`: "scribble", "point", "box",
      "click", "cvpr25") or a kind of mark (:data:`scribblejax.research.simulate.KINDS`).
    layers: tunable last layers.
    config: refinement settings.
    log: where progress lines go.

  Returns:
    The results dict (Dice per interaction, steps, seconds, device).

  Raises:
    ValueError: an unknown task, negative interactions or a layer count the model lacks (before anything
      is written).
  """
  if not is_integer(interactions) or interactions < 0:
    raise ValueError(f"interactions must be an integer >= 0, got {interactions!r}")
  model, image, truth, num_classes, source = _case(task, train_steps, log)
  split = split_params(model, last_layers(layers))  # refuses a bad layer count before anything is written
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  session = start_session(split, image, config)
  dice = [metrics.mean_foreground_dice(np.asarray(current_labels(session)), truth, num_classes)]
  log(
    f"task {task}: image {truth.shape[0]}x{truth.shape[1]}, {num_classes} classes, device "
    f"{jax.devices()[0].device_kind}, "
    f"driver {resolve_driver(config.driver, config.conv_backend, config.compute_dtype, config.cache_trunk)}"
  )
  log(f"interaction 0 (network alone): Dice {dice[0]:.3f}")
  seconds, steps, reports = [], [], []
  for i in range(1, interactions + 1):
    marked = current_marks(session) >= 0
    drawn = ROBOT_USER_SCHEDULES[kind](i) if kind in ROBOT_USER_SCHEDULES else kind  # the user's kind this time
    new = simulate_marks(np.asarray(current_labels(session)), truth, num_classes, kind=drawn, marked=marked)
    new = np.where(marked, -1, new).astype(np.int32)
    if not (new >= 0).any():
      log(f"interaction {i}: the simulated user finds no new error to mark; stopping")
      break
    start = time.perf_counter()
    session = add_marks(session, new)
    labels = np.asarray(current_labels(session))
    seconds.append(time.perf_counter() - start)
    result = session.rounds[-1].result
    steps.append(int(result.num_steps))
    reports.append(marks_report(result, session.rounds[-1].marks, config))
    dice.append(metrics.mean_foreground_dice(labels, truth, num_classes))
    log(
      f"interaction {i}: {int((new >= 0).sum())} marked pixels, {steps[-1]} steps, "
      f"satisfied={reports[-1].satisfied} (network: {describe_marks(reports[-1])}); {seconds[-1]:.2f}s -> "
      f"Dice {dice[-1]:.3f}"
    )
  marks = session.rounds[-1].marks if session.rounds else np.full(truth.shape, -1)
  before = np.asarray(np.argmax(session.initial_logits, -1))
  final = np.asarray(current_labels(session))
  from scribblejax.research.evaluate import marks_honoured

  fraction = marks_honoured(final, marks)
  honoured = (
    "no marks"
    if fraction is None
    else "every mark honoured"
    if fraction == 1.0
    else f"{fraction:.0%} of marks honoured"
  )
  _overlay(out / "overlay.png", image[..., 0], truth, before, final, marks, num_classes, dice[0], dice[-1], honoured)
  results = {
    "task": task,
    "dice_per_interaction": dice,
    "steps_per_interaction": steps,
    "seconds_per_interaction": seconds,
    "mark_kind": kind,
    "tunable_layers": layers,
    "max_steps": config.max_steps,
    "keep_weight": config.keep_weight,
    "backbone": source,
    "satisfied_per_interaction": [r.satisfied for r in reports],
    "network_marks_honoured": [r.honoured for r in reports],
    "learning_rate": config.learning_rate,
    "progressive_merge": config.progressive_merge,
    "device": jax.devices()[0].device_kind,
    "machine": machine_description(),
    "versions": {"jax": jax.__version__, "flax": importlib.metadata.version("flax")},
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    "note": "seconds of interaction 1 include compilation",
  }
  fileio.write_json(out / "results.json", results)
  log(f"Dice {dice[0]:.3f} -> {dice[-1]:.3f}; wrote {out / 'overlay.png'} and {out / 'results.json'}")
  return results
