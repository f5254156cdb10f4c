"""Small models for tests, examples and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def random_unet(dims: int, channels: Sequence[int], classes: int = 2, seed: int = 0):
  """A :class:`scribblejax.UNet` with random weights drawn by numpy (fixed seed).

  Kernels are normal with variance ``1 / fan_in``, norm scales 1 and biases 0: the weights every
  recorded benchmark used, the same for the PyTorch reference (built from them).
  """
  import jax.numpy as jnp
  from flax import nnx

  import scribblejax as sj

  abstract = nnx.eval_shape(
    lambda: sj.UNet(spatial_dims=dims, in_channels=1, num_classes=classes, channels=tuple(channels), rngs=nnx.Rngs(0))
  )
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(state):
    shape = tuple(var.shape)
    if path[-1] == "scale":
      value = np.ones(shape, np.float32)
    elif path[-1] == "bias":
      value = np.zeros(shape, np.float32)
    else:
      value = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
    flat.append((path, var.replace(jnp.asarray(value))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
