"""Initialisers that draw with NumPy, so that building a model compiles (almost) nothing.

Flax's own initialisers run eagerly when a module is built, and JAX compiles one XLA program per
operation and weight shape the first time it sees it, so building a large U-Net is mostly compiling.
These initialisers draw the same distributions with NumPy from a seed taken
from the layer's key (one tiny compiled draw, the same for every shape). Under a trace
(``nnx.eval_shape``, ``nnx.jit``) they hand over to JAX's own, which compile nothing there.

Each is an ordinary Flax initialiser, ``init(key, shape, dtype) -> Array``.

Example:
  >>> conv = nnx.Conv(3, 8, (3, 3), kernel_init=lecun_normal(), bias_init=zeros, rngs=nnx.Rngs(0))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]

# The standard deviation of a standard normal truncated to [-2, 2], as jax.nn.initializers uses it
# to keep variance_scaling's variance exact.
_TRUNCATED_STD = 0.87962566103423978


def _traced(key: Any) -> bool:
  return isinstance(key, jax.core.Tracer)


def seed_of(key: jax.Array) -> int:
  """A NumPy seed from a (concrete) JAX key: 32 random bits of it."""
  return int(jax.random.bits(key, (), jnp.uint32))


def _rng(key: jax.Array) -> np.random.Generator:
  return np.random.default_rng(seed_of(key))


def _truncated_standard_normal(rng: np.random.Generator, size: int) -> np.ndarray:
  """Standard normal values conditioned on [-2, 2] (redrawn until inside, as truncation means)."""
  values = rng.standard_normal(size)
  outside = np.abs(values) > 2
  while outside.any():
    values[outside] = rng.standard_normal(int(outside.sum()))
    outside = np.abs(values) > 2
  return values


def _to_device(values: np.ndarray, dtype: Any) -> jax.Array:
  # cast on the host and copy: jnp.asarray compiles a small program per shape (a conversion, or staging)
  return jax.device_put(np.asarray(values, jnp.dtype(dtype)))


def _fan_in(shape: Sequence[int]) -> int:
  """Inputs per output for a kernel ``[*window, in, out]`` (Flax's convention: in axis -2)."""
  if len(shape) < 2:
    raise ValueError(f"a fan-in initialiser needs a kernel with at least 2 axes, got shape {tuple(shape)}")
  return int(shape[-2]) * math.prod(int(n) for n in shape[:-2])


def lecun_normal() -> Initializer:
  """Flax's default kernel initialiser: a normal truncated to 2 standard deviations, variance
  ``1 / fan_in`` (``jax.nn.initializers.lecun_normal``), drawn with NumPy."""
  traced = jax.nn.initializers.lecun_normal()

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    if _traced(key):
      return traced(key, shape, dtype)
    std = math.sqrt(1.0 / _fan_in(shape)) / _TRUNCATED_STD
    values = _truncated_standard_normal(_rng(key), math.prod(int(n) for n in shape)) * std
    return _to_device(values.reshape(tuple(shape)), dtype)

  return init


def normal(stddev: float) -> Initializer:
  """Normal values with mean 0 and standard deviation ``stddev``, drawn with NumPy."""
  traced = jax.nn.initializers.normal(stddev)

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    if _traced(key):
      return traced(key, shape, dtype)
    return _to_device(_rng(key).standard_normal(tuple(shape)) * stddev, dtype)

  return init


def zeros(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
  """Zeros, built on the host (``jnp.zeros`` compiles once per shape)."""
  del key
  return _to_device(np.zeros(tuple(shape)), dtype)


def ones(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
  """Ones, built on the host."""
  del key
  return _to_device(np.ones(tuple(shape)), dtype)
