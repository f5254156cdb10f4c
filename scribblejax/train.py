"""Supervised training of a backbone on random crops (optax Adam, flips, a fixed seed)."""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training settings.

  Attributes:
    steps: Adam steps.
    batch_size: crops per step.
    crop: crop size per spatial axis.
    learning_rate: Adam learning rate.
    seed: seed of crops and flips.
    flips: random flips along every spatial axis.
  """
  steps: int = 400
  batch_size: int = 8
  crop: int = 128
  learning_rate: float = 3e-3
  seed: int = 0
  flips: bool = True


def _crops(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, config: TrainConfig):
  spatial = labels.shape
  size = [min(config.crop, s) for s in spatial]
  xs, ys = [], []
  for _ in range(config.batch_size):
    start = [int(rng.integers(0, s - c + 1)) for s, c in zip(spatial, size)]
    index = tuple(slice(a, a + c) for a, c in zip(start, size))
    x, y = image[index], labels[index]
    if config.flips:
      for axis in range(len(spatial)):
        if rng.random() < 0.5:
          x, y = np.flip(x, axis), np.flip(y, axis)
    xs.append(x)
    ys.append(y)
  return np.stack(xs), np.stack(ys)


@nnx.jit
def _train_step(model, optimizer, x, y):
  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def train_segmenter(model: nnx.Module, image: np.ndarray, labels: np.ndarray, config: TrainConfig = TrainConfig(),
                    *, progress: bool = True) -> tuple[nnx.Module, list[float]]:
  """Trains ``model`` (in place, as Flax NNX training does) on random crops of one image.

  Args:
    model: a Flax NNX segmentation model taking ``[batch, *spatial, C]``.
    image: ``[*spatial, C]`` float32, already normalised.
    labels: ``int[*spatial]``.
    config: a :class:`TrainConfig`.
    progress: print a progress line to stderr.

  Returns:
    ``(model, losses)``.
  """
  rng = np.random.default_rng(config.seed)
  optimizer = nnx.Optimizer(model, optax.adam(config.learning_rate), wrt=nnx.Param)
  losses = []
  start = time.perf_counter()
  for step in range(config.steps):
    x, y = _crops(rng, image, labels, config)
    losses.append(float(_train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y))))
    if progress and (step % 20 == 0 or step == config.steps - 1):
      print(f"\rtraining {step + 1}/{config.steps}  loss {losses[-1]:.4f}  {time.perf_counter() - start:.0f}s",
            end="", file=sys.stderr, flush=True)
  if progress:
    print(file=sys.stderr)
  return model, losses
