"""Moving a PyTorch state dict into an NNX model strictly: torch layouts, aliased keys, every key used.

Weights are moved with :class:`StateReader` (every torch key used or explicitly ignored, every shape
checked) and :func:`assign` (every model variable assigned exactly once, parameter counts equal); the
layers they fill are those of :mod:`scribblejax.models.zoo.layers`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from scribblejax.models.zoo.layers import ConversionError

__all__ = [
  "ConversionError",
  "StateReader",
  "Values",
  "assign",
  "canonicalize",
  "conv_kernel",
  "conv_transpose_kernel",
  "path_prefixes",
  "strip_wrappers",
]

Path = tuple[Any, ...]


# ----------------------------------------------------------------------------- layouts


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """Torch conv weight ``(out, in, *k)`` -> channels-last kernel ``(*k, in, out)``."""
  return np.transpose(weight, (*range(2, weight.ndim), 1, 0))


def conv_transpose_kernel(weight: np.ndarray) -> np.ndarray:
  """Torch transposed-conv weight ``(in, out, *k)`` -> ``(*k, in, out)`` as
  :class:`~scribblejax.models.zoo.layers.ConvTranspose` uses it.

  The spatial flip that turns a transposed convolution into a dilated convolution is done inside
  that layer, so refined kernels keep torch's orientation.
  """
  return np.transpose(weight, (*range(2, weight.ndim), 0, 1))


# ----------------------------------------------------------------------------- strict loading


def canonicalize(
  state: Mapping[str, np.ndarray], canonical: Callable[[str], str], *, source: str = "checkpoint"
) -> dict[str, np.ndarray]:
  """Merges aliased keys (one tensor saved under several names) into their canonical name.

  Args:
    state: flat state dict.
    canonical: maps each key to its canonical key (identity for most keys).
    source: name used in error messages.

  Returns:
    ``{canonical_key: array}``.

  Raises:
    ConversionError: two aliases of one key hold different values.
  """
  out: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for key, value in state.items():
    name = canonical(key)
    value = np.asarray(value)
    if name in out:
      if out[name].shape != value.shape or not np.array_equal(out[name], value, equal_nan=True):
        raise ConversionError(f"{source}: keys {origin[name]!r} and {key!r} should hold the same tensor but differ")
      if key == name:
        origin[name] = key
      continue
    out[name], origin[name] = value, key
  return out


class StateReader:
  """Takes tensors from a flat state dict by explicit key, and insists that every key is used.

  Example::

    reader = StateReader(state, source="model.pt")
    kernel = conv_kernel(reader.take("conv.weight", (8, 1, 3, 3)))
    reader.ignore_matching(r".*num_batches_tracked$")
    reader.finish()      # raises, naming every key neither taken nor ignored
  """

  def __init__(self, state: Mapping[str, Any], *, source: str = "checkpoint"):
    self.source = source
    self._state = {k: v for k, v in state.items()}
    self._used: set[str] = set()
    self._last: tuple[str, tuple[int, ...]] | None = None

  def values(self) -> Values:
    """An empty ``{variable path: array}`` map that remembers, for each entry, the key last taken
    before it was set: :func:`assign` names that torch key in its shape errors."""
    return Values(self)

  def __contains__(self, key: str) -> bool:
    return key in self._state

  def keys(self) -> list[str]:
    return list(self._state)

  def take(self, key: str, shape: Sequence[int] | None = None) -> np.ndarray:
    """Returns ``state[key]`` as a NumPy array, checking its shape; marks the key used.

    Raises:
      ConversionError: the key is missing, already taken, or has another shape.
    """
    if key not in self._state:
      raise ConversionError(f"{self.source}: missing key {key!r}")
    if key in self._used:
      raise ConversionError(f"{self.source}: key {key!r} used twice")
    value = np.asarray(self._state[key])
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise ConversionError(f"{self.source}: key {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    self._used.add(key)
    self._last = (key, tuple(value.shape))
    return value

  def ignore(self, *keys: str) -> None:
    """Marks keys as deliberately unused (each must exist)."""
    for key in keys:
      if key not in self._state:
        raise ConversionError(f"{self.source}: key {key!r} to ignore is missing")
      self._used.add(key)

  def ignore_matching(self, pattern: str) -> list[str]:
    """Marks every key matching the regular expression ``pattern`` (full match) as unused."""
    matched = [k for k in self._state if re.fullmatch(pattern, k)]
    self._used.update(matched)
    return matched

  def finish(self) -> None:
    """Raises :class:`ConversionError` naming every key neither taken nor ignored."""
    left = [k for k in self._state if k not in self._used]
    if left:
      shown = ", ".join(left[:20]) + (f", ... ({len(left)} in all)" if len(left) > 20 else "")
      raise ConversionError(f"{self.source}: unexpected keys not used by the conversion: {shown}")


class Values(dict):
  """``{variable path: array}`` that records the torch key (and its shape) each entry came from."""

  def __init__(self, reader: StateReader):
    super().__init__()
    self.origins: dict[Path, tuple[str, tuple[int, ...]]] = {}
    self._reader = reader

  def __setitem__(self, path, value) -> None:
    super().__setitem__(path, value)
    if self._reader._last is not None:
      self.origins[tuple(path)] = self._reader._last
      self._reader._last = None  # an entry set without a new take has no origin


def strip_wrappers(state: Mapping[str, Any]) -> dict[str, Any]:
  """Drops ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes shared by every key."""
  state = dict(state)
  for prefix in ("module.", "_orig_mod."):
    if state and all(k.startswith(prefix) for k in state):
      state = {k[len(prefix) :]: v for k, v in state.items()}
  return state


def assign(
  model: nnx.Module,
  values: Mapping[Path, np.ndarray],
  *,
  source: str = "checkpoint",
  torch_param_count: int | None = None,
) -> None:
  """Sets every Param and BatchStat of ``model`` from ``values``, in place, strictly.

  Args:
    model: the NNX model.
    values: ``{variable_path: array}`` with exactly one entry per Param/BatchStat.
    source: name used in error messages.
    torch_param_count: if given, the number of trainable elements on the torch side, which must
      equal the model's Param element count.

  Raises:
    ConversionError: a variable is not assigned, a path is not a variable, or a shape differs.
  """
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
  missing = [p for p in flat if p not in values]
  unknown = [p for p in values if tuple(p) not in flat]
  if missing or unknown:
    fmt = lambda ps: ", ".join("/".join(map(str, p)) for p in ps[:20])
    raise ConversionError(
      f"{source}: model variables not assigned: [{fmt(missing)}]; "
      f"assigned paths that are not model variables: [{fmt(unknown)}]"
    )
  for path, variable in flat.items():
    value = np.asarray(values[path], dtype=np.float32)
    if tuple(value.shape) != tuple(variable.shape):
      origin = getattr(values, "origins", {}).get(tuple(path))
      torch = f" (from torch key {origin[0]!r} of shape {origin[1]})" if origin else ""
      raise ConversionError(
        f"{source}: {'/'.join(map(str, path))} has shape {tuple(variable.shape)}, "
        f"converted value has {tuple(value.shape)}{torch}"
      )
    variable.set_value(jnp.asarray(value))
  if torch_param_count is not None:
    ours = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    if ours != torch_param_count:
      raise ConversionError(f"{source}: model has {ours} parameters, checkpoint has {torch_param_count}")
  nnx.update(model, state)


def path_prefixes(model: nnx.Module, roots: Iterable[Path]) -> list[Path]:
  """Keeps the prefixes in ``roots`` that own at least one Param of ``model`` (helper for layer orders)."""
  params = [tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  return [r for r in roots if any(p[: len(r)] == tuple(r) for p in params)]
