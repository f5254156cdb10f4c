"""Supervised training of a backbone on random crops, and the built-in training tasks.

:func:`train_segmenter` trains any Flax NNX segmentation model with optax Adam on random crops of one
image (or of a stack of 2D images), with random flips and a small random intensity scale/shift,
cross-entropy (plus optional soft Dice), a tqdm progress bar and optional orbax checkpoints of the
training state. Given the seed it is deterministic: the crops of step ``i`` depend only on
``(seed, i)``, so a run resumed from a checkpoint equals an uninterrupted one.

:func:`train_task` trains one of :data:`TASKS` on the training split of its vendored dataset, measures
the Dice per class on the test split and writes the model with :func:`scribblejax.models.store.save_model`
(the shipped weights in ``scribblejax/weights/`` were made this way; ``model.json`` records the command).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from scribblejax._checks import is_finite_number, is_integer


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training settings.

  Attributes:
    steps: Adam steps.
    batch_size: crops per step.
    crop: crop size per spatial axis (smaller axes are taken whole).
    learning_rate: Adam learning rate.
    seed: seed of the crops and augmentations (and of the initialisation in :func:`train_task`).
    flips: random flips along every spatial axis.
    intensity: per-crop random intensity scale in ``[1 - a, 1 + a]`` and shift in ``[-a, a]`` (0: off).
    dice_weight: weight of a soft Dice loss (mean over classes present in the batch) added to the
      cross-entropy.
  """

  steps: int = 400
  batch_size: int = 8
  crop: int = 128
  learning_rate: float = 3e-3
  seed: int = 0
  flips: bool = True
  intensity: float = 0.0
  dice_weight: float = 0.0

  def __post_init__(self):
    for name in ("steps", "batch_size", "crop", "seed"):
      value = getattr(self, name)
      if not is_integer(value) or value < (0 if name == "seed" else 1):
        raise ValueError(f"TrainConfig.{name} must be an integer >= {0 if name == 'seed' else 1}, got {value!r}")
    for name in ("learning_rate", "intensity", "dice_weight"):
      value = getattr(self, name)
      if not is_finite_number(value):
        raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}")
    if not self.learning_rate > 0:
      raise ValueError(f"TrainConfig.learning_rate must be positive, got {self.learning_rate}")
    if not 0 <= self.intensity < 1:
      raise ValueError(f"TrainConfig.intensity must lie in [0, 1) (a scale in [1 - a, 1 + a]), got {self.intensity}")
    if self.dice_weight < 0:
      raise ValueError(f"TrainConfig.dice_weight must be non-negative, got {self.dice_weight}")


def sample_batch(
  step: int, image: np.ndarray, labels: np.ndarray, config: TrainConfig, *, stacked: bool = False
) -> tuple[np.ndarray, np.ndarray]:
  """The augmented crops of training step ``step``: a function of ``(config.seed, step)`` only.

  Args:
    step: the step index.
    image: ``float32[*spatial, C]`` (``[n, *spatial, C]`` if ``stacked``), already normalised.
    labels: ``int[*spatial]`` (``[n, *spatial]`` if ``stacked``).
    config: a :class:`TrainConfig`.
    stacked: axis 0 indexes independent images; each crop comes from one of them, drawn at random.

  Returns:
    ``(x float32[batch, *crop, C], y int32[batch, *crop])``.
  """
  rng = np.random.default_rng((config.seed, step))
  spatial = labels.shape[1:] if stacked else labels.shape
  size = [min(config.crop, s) for s in spatial]
  xs, ys = [], []
  for _ in range(config.batch_size):
    start = [int(rng.integers(0, s - c + 1)) for s, c in zip(spatial, size)]
    index = tuple(slice(a, a + c) for a, c in zip(start, size))
    if stacked:
      index = (int(rng.integers(0, labels.shape[0])), *index)
    x, y = image[index].astype(np.float32), labels[index]
    if config.flips:
      for axis in range(len(spatial)):
        if rng.random() < 0.5:
          x, y = np.flip(x, axis), np.flip(y, axis)
    if config.intensity:
      a = config.intensity
      x = x * np.float32(rng.uniform(1 - a, 1 + a)) + np.float32(rng.uniform(-a, a))
    xs.append(x)
    ys.append(y)
  return np.stack(xs).astype(np.float32), np.stack(ys).astype(np.int32)


def _loss(logits: jax.Array, y: jax.Array, dice_weight: float) -> jax.Array:
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  if dice_weight:
    axes = tuple(range(logits.ndim - 1))
    probs = jax.nn.softmax(logits, -1)
    onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=probs.dtype)
    inter = (probs * onehot).sum(axes)
    denom = probs.sum(axes) + onehot.sum(axes)
    present = onehot.sum(axes) > 0
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    loss = loss + dice_weight * (1 - jnp.where(present, dice, 0).sum() / jnp.maximum(present.sum(), 1))
  return loss


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _train_step(graphdef, learning_rate, dice_weight, params, opt_state, rest, x, y):
  """One Adam step; compiled once per architecture, settings and shapes (shared across calls)."""

  def loss_fn(p):
    return _loss(nnx.merge(graphdef, p, rest)(x), y, dice_weight)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = optax.adam(learning_rate).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def _checkpoint_manager(directory: str | os.PathLike, every: int):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=every, create=True)
  return ocp.CheckpointManager(Path(directory).resolve(), options=options)


RUN_FILE = "run.json"  # what a checkpoint folder's run trains: settings, parameter shapes, data digests


def _digest(array: np.ndarray) -> str:
  import hashlib

  array = np.ascontiguousarray(array)
  return hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes()).hexdigest()[:16]


def _run_description(params: Any, image: np.ndarray, labels: np.ndarray, config: TrainConfig, stacked: bool) -> dict:
  """What must be the same for a run to resume another: all but the number of steps."""
  shapes = {
    jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "steps"}
  settings = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in settings.items()}
  return {
    "format": "scribblejax-training",
    "settings": settings,
    "parameters": shapes,
    "data": {"image": _digest(image), "labels": _digest(labels), "stacked": bool(stacked)},
  }


def _check_checkpoint_dir(directory: Path, description: dict) -> bool:
  """Refuses a folder that is not this run's checkpoint folder; True when it holds one to resume.

  Raises:
    ValueError: the path is a file, or a folder holding something other than this run's checkpoints
      (a checkpoint of other settings, parameters or data included).
  """
  import json

  if directory.exists() and not directory.is_dir():
    raise ValueError(f"checkpoint folder {directory} is a file")
  if not directory.exists() or not any(directory.iterdir()):
    return False
  run = directory / RUN_FILE
  if not run.is_file():
    raise ValueError(
      f"checkpoint folder {directory} is not empty and holds no {RUN_FILE} (not a scribblejax training "
      "checkpoint, or one made by an older version): choose another folder"
    )
  try:
    stored = json.loads(run.read_text())
  except (OSError, ValueError) as err:
    raise ValueError(f"cannot read {run}: {err}") from None
  if not isinstance(stored, dict):
    raise ValueError(f"{run} is not a training run description")
  differ = [key for key in ("settings", "parameters", "data") if stored.get(key) != description[key]]
  if differ:
    detail = {"settings": "training settings", "parameters": "model (parameter shapes)", "data": "training data"}
    changed = ""
    if "settings" in differ:
      old, new = stored.get("settings") or {}, description["settings"]
      changed = ": " + ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])
    raise ValueError(
      f"checkpoint folder {directory} holds a run of other {' and '.join(detail[d] for d in differ)}"
      f"{changed}; resuming it would not give this run: choose another folder"
    )
  return True


def train_segmenter(
  model: nnx.Module,
  image: np.ndarray,
  labels: np.ndarray,
  config: TrainConfig = TrainConfig(),
  *,
  stacked: bool = False,
  progress: bool = True,
  checkpoint_dir: str | os.PathLike | None = None,
  checkpoint_every: int = 100,
) -> tuple[nnx.Module, list[float]]:
  """Trains ``model`` (updated in place, as Flax NNX training does) on random crops.

  Args:
    model: a Flax NNX segmentation model taking ``[batch, *spatial, C]`` and returning class logits.
    image: ``float32[*spatial, C]``, already normalised; ``[n, *spatial, C]`` if ``stacked``.
    labels: ``int[*spatial]`` (``[n, *spatial]`` if ``stacked``) with values in ``[0, classes)``.
    config: a :class:`TrainConfig`.
    stacked: axis 0 of ``image`` and ``labels`` indexes independent images (e.g. 2D slices).
    progress: show a tqdm progress bar on stderr.
    checkpoint_dir: if given, an orbax checkpoint of the training state (parameters, Adam state, step,
      losses) is written there every ``checkpoint_every`` steps and at the end; a run whose folder
      already holds a checkpoint resumes from its latest step (the result equals an uninterrupted run).
    checkpoint_every: steps between checkpoints.

  Returns:
    ``(model, losses)``: the trained model and the loss of every step (``config.steps`` floats).

  Raises:
    ValueError: image and labels do not match, labels that are not class indices of the model, or a
      checkpoint folder that is a file or holds another run (other settings but ``steps``, another
      model or other data).
  """
  from tqdm.auto import tqdm

  image = np.asarray(image)
  labels = np.asarray(labels)
  if image.shape[:-1] != labels.shape:
    raise ValueError(f"image of shape {image.shape} (channels last) does not match labels of shape {labels.shape}")
  if not labels.size:
    raise ValueError(f"the labels of shape {labels.shape} hold no pixel")
  if not is_integer(checkpoint_every) or checkpoint_every < 1:
    raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  labels = _check_labels(labels, _num_outputs(graphdef, params, rest, image, config, stacked))
  opt_state = optax.adam(config.learning_rate).init(params)
  train_step = functools.partial(_train_step, graphdef, float(config.learning_rate), float(config.dice_weight))

  start_step, losses = 0, []
  manager = None
  if checkpoint_dir is not None:
    import orbax.checkpoint as ocp

    from scribblejax.io import fileio

    description = _run_description(params, image, labels, config, stacked)
    resume = _check_checkpoint_dir(Path(checkpoint_dir), description)
    if not resume:
      fileio.write_json(Path(checkpoint_dir) / RUN_FILE, description)
    manager = _checkpoint_manager(checkpoint_dir, int(checkpoint_every))
    latest = manager.latest_step()
    if latest is not None:
      if latest > config.steps:
        raise ValueError(f"{checkpoint_dir} holds a checkpoint of step {latest}, beyond steps={config.steps}")
      leaves, treedef = jax.tree.flatten((params, opt_state))
      abstract = {
        "leaves": [jax.ShapeDtypeStruct(np.shape(v), jnp.asarray(v).dtype) for v in leaves],
        "losses": jax.ShapeDtypeStruct((latest,), np.float32),
      }
      restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
      params, opt_state = jax.tree.unflatten(treedef, [jnp.asarray(v) for v in restored["leaves"]])
      start_step, losses = latest, [float(v) for v in np.asarray(restored["losses"])]

  def save(step: int, force: bool = False):
    import orbax.checkpoint as ocp

    state = {
      "leaves": [np.asarray(v) for v in jax.tree.leaves((params, opt_state))],
      "losses": np.asarray(losses, np.float32),
    }
    manager.save(step, args=ocp.args.StandardSave(state), force=force)

  bar = tqdm(
    range(start_step, config.steps),
    total=config.steps,
    initial=start_step,
    disable=not progress,
    desc="training",
    file=sys.stderr,
    dynamic_ncols=True,
  )
  pending = []
  try:
    for step in bar:
      x, y = sample_batch(step, image, labels, config, stacked=stacked)
      params, opt_state, loss = train_step(params, opt_state, rest, jnp.asarray(x), jnp.asarray(y))
      pending.append(loss)
      if manager is not None and (step + 1) % checkpoint_every == 0 and step + 1 < config.steps:
        losses.extend(float(v) for v in pending)
        pending = []
        save(step + 1)
      if progress and (step % 10 == 0 or step == config.steps - 1):
        bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    losses.extend(float(v) for v in pending)
    if manager is not None:
      if manager.latest_step() != config.steps:
        save(config.steps, force=True)
      manager.wait_until_finished()
  finally:
    if manager is not None:
      manager.close()  # its threads would otherwise keep the process alive after an error
  nnx.update(model, params)
  return model, losses


def _num_outputs(graphdef, params, rest, image: np.ndarray, config: TrainConfig, stacked: bool) -> int:
  """The model's number of output classes, by abstract evaluation on one training crop."""
  spatial = image.shape[1:-1] if stacked else image.shape[:-1]
  crop = jax.ShapeDtypeStruct((1, *[min(config.crop, n) for n in spatial], image.shape[-1]), jnp.float32)
  out = jax.eval_shape(lambda p, r, x: nnx.merge(graphdef, p, r)(x), params, rest, crop)
  return int(out.shape[-1])


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Integer class indices in ``[0, num_classes)`` (whole-number floats accepted), as int32."""
  if num_classes < 2:
    raise ValueError(f"the model predicts {num_classes} class(es); a segmentation model needs at least 2")
  if labels.dtype == bool:
    labels = labels.astype(np.int32)
  elif not np.issubdtype(labels.dtype, np.integer):
    if (
      not np.issubdtype(labels.dtype, np.floating)
      or not np.all(np.isfinite(labels))
      or not np.all(labels == np.round(labels))
    ):
      raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype} with non-integer values")
  lo, hi = int(labels.min()), int(labels.max())
  if lo < 0 or hi >= num_classes:
    raise ValueError(f"labels hold values {lo}..{hi}, outside the model's classes 0..{num_classes - 1}")
  return labels.astype(np.int32)


def predict_labels(model: nnx.Module, image: np.ndarray, *, stacked: bool = False, batch: int = 8) -> np.ndarray:
  """Argmax labels of ``model`` on a normalised image (``[*spatial, C]``, or ``[n, *spatial, C]`` stacked)."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: jnp.argmax(nnx.merge(graphdef, state)(x), -1).astype(jnp.int32))
  image = np.asarray(image, np.float32)
  if not stacked:
    return np.asarray(forward(state, image[None]))[0]
  out = []
  for i in range(0, image.shape[0], batch):
    chunk = image[i : i + batch]
    padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), np.float32)])
    out.append(np.asarray(forward(state, padded))[: len(chunk)])
  return np.concatenate(out)


def normalize_dataset_part(image: np.ndarray, spec: Any, *, stacked: bool = False) -> np.ndarray:
  """Normalises one image, or each image of a stack separately (as it would be normalised alone)."""
  from scribblejax.pipeline.normalization import normalize

  if stacked:
    return np.stack([normalize(x, spec) for x in image])
  return normalize(image, spec)


class Task(NamedTuple):
  """A built-in training task: a dataset, an architecture, a normalisation and default settings."""

  dataset: Callable[[], Any]  # () -> scribblejax.research.data.Dataset
  model_kwargs: dict  # kwargs of scribblejax.models.unet.UNet
  normalization: dict  # normalisation spec stored with the model
  config: TrainConfig  # default training settings


def tasks() -> dict[str, Task]:
  """The built-in training tasks by name (the shipped models were trained by these)."""
  from scribblejax.research import data

  percentile = {"kind": "percentile", "lower": 1.0, "upper": 99.8}
  mri = {"kind": "percentile", "lower": 0.5, "upper": 99.5}
  unet2d = {"spatial_dims": 2, "in_channels": 1, "channels": [16, 32, 64]}
  return {
    "nuclei2d": Task(
      data.nuclei2d,
      {**unet2d, "num_classes": 2},
      percentile,
      TrainConfig(steps=400, batch_size=8, crop=128, learning_rate=3e-3, intensity=0.1),
    ),
    "tissue2d": Task(
      data.tissue2d,
      {**unet2d, "num_classes": 4},
      mri,
      TrainConfig(steps=400, batch_size=8, crop=128, learning_rate=3e-3, intensity=0.1, dice_weight=1.0),
    ),
    "tissue3d": Task(
      lambda: data.tissue3d(3),
      {"spatial_dims": 3, "in_channels": 1, "num_classes": 4, "channels": [8, 16, 32]},
      mri,
      TrainConfig(steps=1000, batch_size=2, crop=32, learning_rate=3e-3, intensity=0.1, dice_weight=1.0),
    ),
  }


TASK_NAMES = ("nuclei2d", "tissue2d", "tissue3d")


def machine_description() -> str:
  """CPU model, core count and the JAX device of this machine, for provenance."""
  cpu = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"{cpu}; {usable} usable CPU cores; JAX {jax.__version__} on {jax.devices()[0].platform}"


def train_task(
  task: str,
  out: str | os.PathLike,
  *,
  config: TrainConfig | None = None,
  progress: bool = True,
  checkpoint_dir: str | os.PathLike | None = None,
  overwrite: bool = False,
  command: str | None = None,
  log: Callable[[str], None] = print,
) -> dict:
  """Trains a built-in task on its training split, scores it on its test split and saves it.

  Args:
    task: one of :data:`TASK_NAMES`.
    out: the model folder to write (see :func:`scribblejax.models.store.save_model`).
    config: training settings (default: the task's).
    progress: show a progress bar.
    checkpoint_dir: orbax checkpoints of the training state (see :func:`train_segmenter`).
    overwrite: replace an existing ``out``.
    command: the command line recorded in the metadata (default: the equivalent ``scribblejax train``).
    log: where to print the summary.

  Returns:
    The metadata written to ``model.json`` (``test_dice`` per class, ``train_seconds``, ``machine``, ...).
  """
  from scribblejax.models.store import save_model
  from scribblejax.models.unet import UNet
  from scribblejax.research.metrics import dice_per_class

  known = tasks()
  if task not in known:
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASK_NAMES)}")
  spec = known[task]
  config = spec.config if config is None else config
  out = Path(out)
  # every refusal of --out before the training run, not after it
  if out.exists() and not overwrite:
    raise ValueError(f"{out} already exists (pass --overwrite to replace it)")
  if out.exists():
    from scribblejax.models.store import check_replaceable

    check_replaceable(out)
  blocking = next((p for p in out.resolve().parents if p.exists() and not p.is_dir()), None)
  if blocking is not None:
    raise ValueError(f"cannot write the model to {out}: {blocking} is a file, not a folder")
  if checkpoint_dir is not None:
    ckpt, model_dir = Path(checkpoint_dir).resolve(), out.resolve()
    if ckpt == model_dir or model_dir in ckpt.parents or ckpt in model_dir.parents:
      raise ValueError(
        f"the checkpoint folder {checkpoint_dir} must be apart from the model folder {out} (not it, "
        "inside it, or holding it): the model folder is replaced when the model is written"
      )
  ds = spec.dataset()
  kwargs = dict(spec.model_kwargs)
  image = normalize_dataset_part(ds.image[ds.train], spec.normalization, stacked=ds.stacked)
  model = UNet(**kwargs, rngs=nnx.Rngs(config.seed))
  start = time.perf_counter()
  _, losses = train_segmenter(
    model, image, ds.labels[ds.train], config, stacked=ds.stacked, progress=progress, checkpoint_dir=checkpoint_dir
  )
  seconds = time.perf_counter() - start
  test_image = normalize_dataset_part(ds.image[ds.test], spec.normalization, stacked=ds.stacked)
  truth = ds.labels[ds.test]
  pred = predict_labels(model, test_image, stacked=ds.stacked)
  dice = dice_per_class(pred, truth, len(ds.class_names))
  test_dice = {name: (None if np.isnan(d) else round(float(d), 4)) for name, d in zip(ds.class_names, dice)}
  foreground = [d for d in dice[1:] if not np.isnan(d)]
  if command is None:
    command = (
      f"scribblejax train --task {task} --out {out} --steps {config.steps} --seed {config.seed}"
      f" --batch-size {config.batch_size} --crop {config.crop} --learning-rate {config.learning_rate}"
      f" --intensity {config.intensity} --dice-weight {config.dice_weight}" + ("" if config.flips else " --no-flips")
    )
  metadata = {
    "task": task,
    "command": command,
    "train_seconds": round(seconds, 1),
    "machine": machine_description(),
    "train_config": dataclasses.asdict(config),
    "data": ds.description,
    "train_split": repr(ds.train),
    "test_split": repr(ds.test),
    "test_dice": test_dice,
    "test_mean_foreground_dice": round(float(np.mean(foreground)), 4),
    "final_loss": round(float(np.mean(losses[-10:])), 5),
  }
  bad = [
    p for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if not np.all(np.isfinite(np.asarray(v.get_value())))
  ]
  if bad or not np.isfinite(metadata["final_loss"]):
    raise ValueError(
      f"training diverged (final loss {metadata['final_loss']}, {len(bad)} parameter array(s) not "
      f"finite); nothing was written to {out}: lower --learning-rate"
    )
  save_model(
    out,
    model,
    family="scribblejax.UNet",
    kwargs=kwargs,
    normalization=spec.normalization,
    class_names=list(ds.class_names),
    metadata=metadata,
    overwrite=overwrite,
  )
  log(
    f"{task}: {config.steps} steps in {seconds:.0f}s; test Dice "
    + ", ".join(f"{k} {v:.3f}" for k, v in test_dice.items() if v is not None)
    + f"; wrote {out}"
  )
  return metadata
