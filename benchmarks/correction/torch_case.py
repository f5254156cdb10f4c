"""A network trained in PyTorch and imported, as a user would bring one to scribblejax.

:func:`monai_backbone` trains a small MONAI ``BasicUNet`` with torch on the training split of a
built-in 2D task (the crops, flips and intensity jitter of :func:`scribblejax.research.train.sample_batch`, the
normalisation and loss the shipped model of that task was trained with), saves its ``state_dict`` as
``model.pt``, converts it with the project's converter exactly as ``scribblejax convert model.pt --arch
monai.networks.nets.BasicUNet --kwargs ... --normalize ... --out DIR`` does, and loads the folder with
:func:`scribblejax.research.evaluate.load_backbone`. The result is cached: a second call with the same settings
loads the folder.

The cache folder holds ``model.pt`` (the torch weights), ``model/`` (the converted scribblejax model)
and ``training.json`` (settings, training seconds, losses, the torch-vs-JAX logit difference on one
test slice and the converted model's test Dice per class).

torch and MONAI are imported lazily: importing this module needs neither.

Example:
  >>> backbone = monai_backbone("tissue2d", steps=300)
  >>> case = scribblejax.research.evaluate.task_case("tissue2d", backbone)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ARCH = "monai.networks.nets.BasicUNet"
FEATURES = (8, 8, 16, 32, 64, 8)
TASKS = ("tissue2d", "nuclei2d")  # the built-in 2D training tasks of scribblejax.research.train
DEFAULT_STEPS = 400  # the shipped tissue2d model's steps


def model_kwargs(num_classes: int, in_channels: int = 1) -> dict:
  """The ``BasicUNet`` constructor arguments (JSON values, as ``scribblejax convert --kwargs`` takes them)."""
  return {"spatial_dims": 2, "in_channels": in_channels, "out_channels": num_classes, "features": list(FEATURES)}


def _task(task: str):
  from scribblejax.research import train

  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  return train.tasks()[task]


def training_data(task: str) -> tuple[np.ndarray, np.ndarray, Any]:
  """The task's normalised training images and labels, and its dataset.

  Returns:
    ``(image float32[n, H, W, 1] or [H, W, 1], labels int32[...], dataset)``: each slice of a stack
    normalised alone, as the shipped model of the task was trained.
  """
  from scribblejax.research.train import normalize_dataset_part

  spec = _task(task)
  ds = spec.dataset()
  image = normalize_dataset_part(ds.image[ds.train], spec.normalization, stacked=ds.stacked)
  return image, np.asarray(ds.labels[ds.train], np.int32), ds


def _loss(torch, logits, y, num_classes: int, dice_weight: float):
  """Cross-entropy plus ``dice_weight`` times a soft Dice loss over the classes present in the batch
  (the loss of :func:`scribblejax.research.train.train_segmenter`), for channels-first logits."""
  loss = torch.nn.functional.cross_entropy(logits, y)
  if dice_weight:
    probs = torch.softmax(logits, 1)
    onehot = torch.nn.functional.one_hot(y, num_classes).movedim(-1, 1).to(probs.dtype)
    axes = (0, *range(2, logits.ndim))
    inter, denom = (probs * onehot).sum(axes), probs.sum(axes) + onehot.sum(axes)
    present = onehot.sum(axes) > 0
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    loss = loss + dice_weight * (1 - torch.where(present, dice, 0).sum() / present.sum().clamp(min=1))
  return loss


def train_torch_unet(
  image: np.ndarray,
  labels: np.ndarray,
  num_classes: int,
  *,
  steps: int,
  seed: int = 0,
  stacked: bool = True,
  config: Any = None,
  threads: int | None = 1,
  log: Callable[[str], None] = print,
):
  """Trains a fresh MONAI ``BasicUNet`` with torch's Adam; deterministic given the seed.

  The batches are :func:`scribblejax.research.train.sample_batch`'s (a function of ``(seed, step)``), the
  initial weights come from ``torch.manual_seed(seed)`` inside :func:`torch.random.fork_rng` and
  deterministic algorithms are on while it trains (the caller's settings are restored afterwards).
  One intra-op thread by default: these convolutions are small, and on a few shared CPU cores more
  threads mostly wait on each other.

  Args:
    image: normalised ``float32[n, H, W, C]`` (``stacked``) or ``[H, W, C]``.
    labels: ``int[n, H, W]`` or ``int[H, W]``.
    num_classes: output classes.
    steps: Adam steps.
    seed: seed of the weights and of the batches.
    stacked: axis 0 of ``image`` indexes independent slices.
    config: a :class:`scribblejax.research.train.TrainConfig` for batch size, crop, learning rate, flips,
      intensity jitter and Dice weight (its ``steps`` and ``seed`` are replaced by the arguments).
    threads: torch's intra-op threads while it trains (``None``: leave torch's setting).
    log: where progress lines go.

  Returns:
    ``(net, losses)``: the trained ``torch.nn.Module`` in eval mode and the loss of every step.
  """
  import torch
  from monai.networks.nets import BasicUNet

  from scribblejax.research.train import TrainConfig, sample_batch

  config = dataclasses.replace(config or TrainConfig(), steps=steps, seed=seed)
  deterministic, num_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
  losses = []
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    if threads is not None:
      torch.set_num_threads(threads)
    try:
      net = BasicUNet(**model_kwargs(num_classes, image.shape[-1]))
      optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
      net.train()
      for step in range(steps):
        x, y = sample_batch(step, image, labels, config, stacked=stacked)
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
        loss = _loss(torch, net(x), torch.from_numpy(y).long(), num_classes, config.dice_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
          log(f"  step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.4f}")
    finally:
      torch.use_deterministic_algorithms(deterministic)
      torch.set_num_threads(num_threads)
  return net.eval(), losses


def torch_logits(net: Any, image: np.ndarray) -> np.ndarray:
  """The torch network's logits on one channels-last image ``[H, W, C]``: ``float32[H, W, K]``."""
  import torch

  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(image, np.float32), -1, 0)[None]))
    return np.moveaxis(net.eval()(x)[0].numpy(), 0, -1)


def jax_logits(model: Any, image: np.ndarray) -> np.ndarray:
  """The converted model's logits on one channels-last image ``[H, W, C]``: ``float32[H, W, K]``."""
  import jax.numpy as jnp

  return np.asarray(model(jnp.asarray(image, jnp.float32)[None])[0])


def load_torch_net(path: str | Path, num_classes: int, in_channels: int = 1):
  """A ``BasicUNet`` of :func:`model_kwargs` with the ``state_dict`` saved at ``path``, in eval mode."""
  import torch
  from monai.networks.nets import BasicUNet

  net = BasicUNet(**model_kwargs(num_classes, in_channels))
  net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
  return net.eval()


def default_cache(task: str, steps: int, seed: int) -> Path:
  """``scribblejax.research.evaluate.cache_dir() / f"torch_monai_{task}_{steps}_{seed}"``."""
  from scribblejax.research.evaluate import cache_dir

  return cache_dir() / f"torch_monai_{task}_{steps}_{seed}"


def _test_slice(ds) -> int:
  from scribblejax.research.evaluate import TISSUE_TEST_SLICE

  return TISSUE_TEST_SLICE if ds.stacked else 0


def _build(task: str, steps: int, seed: int, folder: Path, log: Callable[[str], None]) -> dict:
  """Trains, saves, converts and checks one backbone into ``folder``; returns what ``training.json`` holds."""
  import torch

  from scribblejax.convert.folder import convert
  from scribblejax.models.store import load_model
  from scribblejax.research.metrics import dice_per_class
  from scribblejax.research.train import normalize_dataset_part, predict_labels

  spec = _task(task)
  image, labels, ds = training_data(task)
  k = len(ds.class_names)
  log(f"training a MONAI BasicUNet {list(FEATURES)} with torch on {task} for {steps} steps (seed {seed})")
  start = time.perf_counter()
  net, losses = train_torch_unet(
    image, labels, k, steps=steps, seed=seed, stacked=ds.stacked, config=spec.config, log=log
  )
  seconds = time.perf_counter() - start
  torch.save(net.state_dict(), folder / "model.pt")
  # what `scribblejax convert model.pt --arch ... --kwargs ... --normalize ... --out model` runs
  convert(
    folder / "model.pt",
    folder / "model",
    arch=ARCH,
    kwargs=model_kwargs(k, image.shape[-1]),
    normalize=spec.normalization,
    log=log,
  )
  model, _ = load_model(folder / "model")
  test_image = normalize_dataset_part(ds.image[ds.test], spec.normalization, stacked=ds.stacked)
  truth = np.asarray(ds.labels[ds.test])
  if ds.stacked:
    index = _test_slice(ds) - ds.test[0].start
    one = test_image[index]
  else:
    one = test_image
  difference = float(np.max(np.abs(torch_logits(net, one) - jax_logits(model, one))))
  dice = dice_per_class(predict_labels(model, test_image, stacked=ds.stacked), truth, k)
  foreground = [float(d) for d in dice[1:] if not np.isnan(d)]
  report = {
    "task": task,
    "class_names": list(ds.class_names),
    "arch": ARCH,
    "kwargs": model_kwargs(k, image.shape[-1]),
    "steps": steps,
    "seed": seed,
    "train_config": {**dataclasses.asdict(spec.config), "steps": steps, "seed": seed},
    "normalization": spec.normalization,
    "torch": torch.__version__,
    "train_seconds": round(seconds, 1),
    "final_loss": round(float(np.mean(losses[-10:])), 5),
    "losses": [round(x, 5) for x in losses],
    "max_abs_logit_difference": difference,
    "compared_on": f"test slice {_test_slice(ds)}" if ds.stacked else "test part",
    "test_dice": {n: (None if np.isnan(d) else round(float(d), 4)) for n, d in zip(ds.class_names, dice)},
    "test_mean_foreground_dice": round(float(np.mean(foreground)), 4) if foreground else None,
  }
  (folder / "training.json").write_text(json.dumps(report, indent=1))
  log(
    f"{task}: {steps} torch steps in {seconds:.0f}s; torch vs converted logits max |diff| {difference:.2e}; "
    f"test Dice " + ", ".join(f"{n} {v:.3f}" for n, v in report["test_dice"].items() if v is not None)
  )
  return report


def monai_backbone(
  task: str = "tissue2d",
  *,
  steps: int = DEFAULT_STEPS,
  seed: int = 0,
  cache: Path | None = None,
  log: Callable[[str], None] = print,
):
  """A MONAI ``BasicUNet`` trained with torch and imported with ``scribblejax convert``, as a Backbone.

  The first call trains (see the module docstring) and writes the cache folder; later calls with the
  same folder load it. The folder is built under a temporary name and renamed when complete, so an
  interrupted run leaves no half-written cache.

  Args:
    task: a built-in 2D task, one of :data:`TASKS`.
    steps: Adam steps of the torch training.
    seed: seed of the initial weights and of the training batches.
    cache: the cache folder (default :func:`default_cache`).
    log: where progress lines go.

  Returns:
    A :class:`scribblejax.research.evaluate.Backbone` named after the cache folder, with the task's class names
    and normalisation (the converted model's ``model.json`` states the normalisation; a bare checkpoint
    carries no class names, so they come from the dataset).

  Raises:
    ValueError: an unknown task or a bad number of steps.
    ImportError: torch or MONAI is missing (``pip install 'scribblejax[torch]'``).
  """
  from scribblejax._checks import is_integer
  from scribblejax.research.evaluate import load_backbone

  _task(task)
  if not is_integer(steps) or steps < 1:
    raise ValueError(f"steps must be a positive integer, got {steps!r}")
  folder = Path(cache) if cache is not None else default_cache(task, steps, seed)
  if not (folder / "model" / "model.json").is_file():
    try:
      import monai  # noqa: F401
      import torch  # noqa: F401
    except ImportError as err:
      raise ImportError("training the MONAI backbone needs torch and MONAI: pip install 'scribblejax[torch]'") from err
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
      shutil.rmtree(partial)
    partial.mkdir(parents=True)
    _build(task, int(steps), int(seed), partial, log)
    if folder.exists():
      shutil.rmtree(folder)
    partial.rename(folder)
  backbone = load_backbone(folder / "model")
  class_names = json.loads((folder / "training.json").read_text())["class_names"]
  return backbone._replace(
    name=f"MONAI BasicUNet trained with torch ({task}, {steps} steps, seed {seed}; {folder})",
    class_names=tuple(class_names),
  )
