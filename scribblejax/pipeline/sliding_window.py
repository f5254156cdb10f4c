"""Sliding-window inference over patches, refinement on the patches that hold marks, and the
wrappers nnU-Net's inference needs (test-time mirroring, a 2-D network over a volume's slices).

Networks trained on patches (nnU-Net, most 3-D models) are applied to larger images patch by patch:
nnU-Net pads the image with zeros to at least one patch, places patches with a step of half a patch
(``compute_steps_for_sliding_window``) and averages the overlapping logits weighted by a Gaussian
centred on each patch (sigma 1/8 of the patch; ``nnunetv2.inference.sliding_window_prediction``).
:func:`sliding_window_logits` does the same with one compiled program for every patch.

Refinement runs only the patches that hold marks (:func:`marked_windows`): :class:`MarkedPatches`
applies the network to them (in batches of at most :func:`patch_chunk` patches, each a
``jax.checkpoint``, so the backward pass holds one batch's activations at a time) and blends their
logits at the marked voxels as sliding-window inference does, so the loop's stop rule reads the very
logits that the refined network's sliding-window segmentation gives at every marked voxel
(:class:`PatchBlend` does the same over the patches' dense region). The refined weights then segment
the whole image patch by patch.

:class:`Mirrored` averages a network over flips of its input (nnU-Net's test-time mirroring) and
:class:`SliceWise` runs a 2-D network on every slice of a volume. Both, like :class:`PatchBlend`, are
Flax modules around the network (its parameters under ``net``, its layer order kept), so refinement
runs through them unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scribblejax._checks import is_finite_number, is_integer


def _patch(patch_size: Any, ndim: int) -> tuple[int, ...]:
  values = tuple(patch_size) if isinstance(patch_size, (Sequence, np.ndarray)) else None
  if values is None or len(values) != ndim or not all(is_integer(p) and p >= 1 for p in values):
    raise ValueError(f"the patch size must be {ndim} positive integers (one per spatial axis), got {patch_size!r}")
  return tuple(int(p) for p in values)


def window_starts(size: int, patch: int, step: float = 0.5) -> list[int]:
  """Where patches of ``patch`` voxels start along an axis of ``size >= patch`` voxels, at most
  ``step * patch`` apart, the last one ending at the edge (nnU-Net's ``compute_steps_for_sliding_window``).

  Raises:
    ValueError: ``size < patch`` or ``step`` outside ``(0, 1]``.
  """
  if not is_finite_number(step) or not 0 < step <= 1:
    raise ValueError(f"the sliding-window step must be in (0, 1] (a fraction of the patch), got {step!r}")
  if size < patch:
    raise ValueError(f"an axis of {size} voxels is shorter than the patch ({patch}); pad it first")
  count = min(int(np.ceil((size - patch) / (patch * step))) + 1, size - patch + 1)  # never more than distinct starts
  if count == 1:
    return [0]
  stride = (size - patch) / (count - 1)
  return list(dict.fromkeys(int(np.round(stride * i)) for i in range(count)))  # no repeats (1-voxel patches)


def window_grid(shape: Sequence[int], patch: Sequence[int], step: float = 0.5) -> list[tuple[int, ...]]:
  """Every sliding-window patch's first voxel over ``shape`` (at least ``patch`` per axis), the last
  axis fastest (:func:`window_starts` per axis)."""
  import itertools

  return list(itertools.product(*[window_starts(n, p, step) for n, p in zip(shape, patch)]))


@functools.lru_cache(maxsize=8)
def gaussian_importance(patch: tuple[int, ...], sigma_scale: float = 1.0 / 8) -> np.ndarray:
  """The weight of each voxel of a patch: a Gaussian of sigma ``sigma_scale * patch`` centred on the
  patch, largest 1, never 0 (nnU-Net's ``compute_gaussian``, in float32). Read-only."""
  from scipy.ndimage import gaussian_filter

  impulse = np.zeros(patch)
  impulse[tuple(p // 2 for p in patch)] = 1.0
  weights = gaussian_filter(impulse, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
  weights = (weights / weights.max()).astype(np.float32)
  weights[weights == 0] = weights[weights > 0].min()
  weights.setflags(write=False)
  return weights


def pad_to_patch(shape: Sequence[int], patch: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """Zeros before and after each axis that make ``shape`` at least ``patch`` (half before, the odd
  one after, as nnU-Net's ``pad_nd_image``)."""
  return tuple(((max(p - n, 0)) // 2, max(p - n, 0) - max(p - n, 0) // 2) for n, p in zip(shape, patch))


def sliding_window_logits(
  split: Any, image: Any, patch_size: Sequence[int], tunable: Any = None, *, step: float = 0.5, progress: Any = None
) -> np.ndarray:
  """Logits of the network on an image, patch by patch, blended with Gaussian weights.

  Args:
    split: the network's :class:`scribblejax.Split`.
    image: ``[*spatial, C]``; axes shorter than the patch are padded with zeros (and cropped back).
    patch_size: the patch, one size per spatial axis.
    tunable: the tunable weights to use (default: the split's own W).
    step: patches start at most ``step * patch`` apart (nnU-Net: 0.5).
    progress: called as ``progress(done, total)`` after each patch.

  Returns:
    float32 ``[*spatial, classes]``. For a region-based network (:class:`scribblejax.models.Regions`) the
    region logits are blended, as nnU-Net blends them, and the result is their class scores
    (:func:`scribblejax.models.region_scores`), whose argmax is nnU-Net's label map.

  Raises:
    ValueError: the patch size does not fit the image, or the network refuses the patch.
  """
  return sliding_window_logits_of(split, image, patch_size, [tunable], step=step, progress=progress)[0]


def sliding_window_logits_of(
  split: Any, image: Any, patch_size: Sequence[int], tunables: Sequence[Any], *, step: float = 0.5, progress: Any = None
) -> list[np.ndarray]:
  """:func:`sliding_window_logits` for several sets of tunable weights in one pass over the patches
  (e.g. the network before and after a refinement): each patch's frozen trunk
  (:func:`scribblejax.compute_trunk`) is computed once, and only the tunable tail runs once per set.

  Args:
    split: the network's :class:`scribblejax.Split`.
    image: ``[*spatial, C]``.
    patch_size: the patch, one size per spatial axis.
    tunables: tunable weights, each in the split's structure (``None``: the split's own W).
    step: patches start at most ``step * patch`` apart.
    progress: called as ``progress(done, total)`` after each patch.

  Returns:
    One float32 ``[*spatial, classes]`` per entry of ``tunables``.
  """
  from scribblejax.config import RefineConfig
  from scribblejax.refinement import compute_trunk, predict

  if not tunables:
    raise ValueError("no tunable weights given")
  split, unwrapped, order = _unwrap_regions(split, tunables)
  image = np.asarray(image)
  if image.ndim < 2:
    raise ValueError(f"the image must be [*spatial, channels], got shape {image.shape}")
  spatial = image.shape[:-1]
  patch = _patch(patch_size, len(spatial))
  pad = pad_to_patch(spatial, patch)
  padded = np.pad(image, (*pad, (0, 0))) if any(a or b for a, b in pad) else image
  weights = gaussian_importance(patch)[..., None]
  totals = None
  norm = np.zeros(padded.shape[:-1] + (1,), np.float32)
  corners = window_grid(padded.shape[:-1], patch, step)
  for done, start in enumerate(corners, start=1):
    window = tuple(slice(s, s + p) for s, p in zip(start, patch))
    if len(unwrapped) == 1:
      outputs = [predict(split, padded[window], unwrapped[0])]
    else:
      trunk = compute_trunk(split, padded[window], RefineConfig(keep_weight=0.0))  # predictions only: no keep targets
      outputs = [predict(split, padded[window], tunable, trunk=trunk) for tunable in unwrapped]
    if totals is None:
      classes = outputs[0].shape[-1]
      totals = [np.zeros(padded.shape[:-1] + (classes,), np.float32) for _ in unwrapped]
    for total, logits in zip(totals, outputs):
      total[window] += np.asarray(logits, np.float32) * weights
    norm[window] += weights
    if progress is not None:
      progress(done, len(corners))
  results = []
  for total in totals:
    total /= norm
    total = total[tuple(slice(a, n - b) for (a, b), n in zip(pad, total.shape[:-1]))]
    if order is not None:
      from scribblejax.models.regions import region_scores

      total = np.asarray(region_scores(total, order), np.float32)
    results.append(total)
  return results


def _unwrap_regions(split: Any, tunables: Sequence[Any]) -> tuple[Any, list, tuple[int, ...] | None]:
  """For the split of a :class:`scribblejax.models.Regions` network: the split of its network (the same
  tunable parameters), ``tunables`` in that split's structure, and the class order; else unchanged."""
  from scribblejax.models.regions import Regions
  from scribblejax.params import by_predicate, check_tunable, split_params

  model = nnx.merge(split.graphdef, split.tunable, split.frozen)
  if not isinstance(model, Regions):
    return split, list(tunables), None
  chosen = {tuple(p[1:]) for p, _ in nnx.to_flat_state(split.tunable)}
  inner = split_params(model.net, by_predicate(lambda path: path in chosen))
  structure = jax.tree.structure(inner.tunable)
  leaves = [jax.tree.leaves(split.tunable if t is None else check_tunable(split, t)) for t in tunables]
  return inner, [jax.tree.unflatten(structure, one) for one in leaves], model.order


def _refuse_regions(net: nnx.Module, wrapper: str) -> None:
  from scribblejax.models.regions import Regions

  if isinstance(net, Regions):
    raise ValueError(
      f"{wrapper} averages its network's outputs, and a Regions network's are class scores; "
      f"nnU-Net averages the region logits first: wrap the region network instead, "
      f"Regions.of({wrapper}(model.net, ...), model.order)"
    )


def windows_region(
  starts: Sequence[Sequence[int]], patch_size: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[tuple[int, ...], ...]]:
  """The smallest box holding the patches that start at ``starts``, and their starts within it."""
  starts = np.asarray(starts, np.int64)
  patch = np.asarray(patch_size, np.int64)
  low, high = starts.min(axis=0), (starts + patch).max(axis=0)
  region = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
  return region, tuple(tuple(int(v) for v in s - low) for s in starts)


def marked_windows(marks: Any, patch_size: Sequence[int], step: float = 0.5) -> tuple[tuple[int, ...], ...]:
  """The starts of the sliding-window patches (of an image of ``marks``' shape, at least one patch per
  axis) that hold at least one marked voxel: every patch that contributes to a marked voxel's logits.

  Raises:
    ValueError: nothing is marked, an axis is shorter than the patch, or the patch does not fit.
  """
  marks = np.asarray(marks)
  patch = _patch(patch_size, marks.ndim)
  marked = marks >= 0
  if not marked.any():
    raise ValueError("no voxel is marked: there is no region to refine")
  table = np.pad(marked, [(1, 0)] * marks.ndim).astype(np.int64)  # summed-area table of the marks
  for axis in range(marks.ndim):
    table = np.cumsum(table, axis=axis)
  windows = []
  for start in window_grid(marks.shape, patch, step):
    count = 0
    for signs in np.ndindex(*(2,) * marks.ndim):  # inclusion-exclusion over the box's corners
      index = tuple(s + p if high else s for s, p, high in zip(start, patch, signs))
      count += (-1) ** (marks.ndim - sum(signs)) * int(table[index])
    if count:
      windows.append(start)
  return tuple(windows)


# The most voxels (patches times their size times the passes each takes, e.g. mirrored copies) that
# one network call of PatchBlend runs by default: one 128^3 patch, nnU-Net's usual 3-D patch. XLA's
# analysis of the compiled refinement loop of nnU-Net's 3d_fullres U-Net (5 stages, last 3 layers
# tunable, float32, CPU) grew by about 370 MB per 64^3 patch run at once (benchmarks/patch_memory.py:
# 8 patches 3.6 GB at once, 1.0 GB one by one), so about 3 GB per 128^3 patch. A GPU is busy with one
# such patch; running fewer patches per call costs the recomputation of each call's tail in the
# backward pass (28% more per step on 2 CPU cores at 32^3).
PATCH_CHUNK_VOXELS = 128**3


def patch_chunk(patch: Sequence[int], passes: int = 1, voxels: int = PATCH_CHUNK_VOXELS) -> int:
  """How many patches :class:`PatchBlend` runs per network call so that a call sees at most ``voxels``
  voxels: ``voxels // (prod(patch) * passes)``, at least 1.

  Args:
    patch: the patch size.
    passes: network passes per patch (``2 ** len(axes)`` under :class:`Mirrored`).
    voxels: the budget (default :data:`PATCH_CHUNK_VOXELS`, one 128^3 patch).
  """
  if not is_integer(passes) or passes < 1 or not is_integer(voxels) or voxels < 1:
    raise ValueError(f"passes and voxels must be positive integers, got {passes!r} and {voxels!r}")
  return max(1, int(voxels) // (int(np.prod(patch)) * int(passes)))


class PatchBlend(nnx.Module):
  """A network applied to fixed patches of its input and blended as :func:`sliding_window_logits` blends
  them, in one differentiable call: refinement on it optimises exactly the logits sliding-window
  inference gives at the marked voxels.

  The patches run in batches of at most ``chunk``. With more patches than that, the batches run one
  after another (``lax.map``), each a ``jax.checkpoint``: the backward pass keeps each batch's input
  and logits and recomputes its activations when it needs them, so memory grows with one batch
  rather than with every patch. The frozen trunk of a cached-trunk refinement is still computed once
  per interaction (:mod:`scribblejax.refinement.trunk` unzips maps and checkpoints). Voxels no patch covers get
  logits 0.

  Attributes:
    net: the network (its parameters are this module's, under ``net``).
    starts: each patch's first voxel per spatial axis.
    patch: the patch size.
    chunk: the most patches per network call (``None``: all at once).
  """

  def __init__(
    self,
    net: nnx.Module,
    starts: Sequence[Sequence[int]],
    patch: Sequence[int],
    in_channels: int,
    chunk: int | None = None,
  ):
    _refuse_regions(net, "PatchBlend")
    self.net = net
    self.starts = tuple(tuple(int(v) for v in s) for s in starts)
    self.patch = tuple(int(p) for p in patch)
    self.in_channels = int(in_channels)
    if not self.starts:
      raise ValueError("PatchBlend needs at least one patch")
    self.chunk = _chunk(chunk, len(self.starts))

  def layer_order(self) -> list[tuple]:
    """The network's layers (stated, or traced on one patch), under ``net``."""
    return _inner_order(self.net, (*self.patch, self.in_channels))

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, spatial = x.shape[0], x.shape[1:-1]
    windows = [tuple(slice(s, s + p) for s, p in zip(start, self.patch)) for start in self.starts]
    for start in self.starts:
      if any(s + p > n for s, p, n in zip(start, self.patch, spatial)):
        raise ValueError(f"a patch at {start} of size {self.patch} leaves the input of spatial shape {spatial}")
    gather = lambda indices: jnp.concatenate([x[(slice(None), *windows[i])] for i in indices], axis=0)
    logits = _run_in_chunks(self.net, gather, len(windows), self.chunk)[: len(windows) * batch]
    gauss = gaussian_importance(self.patch)[..., None]
    weights = jnp.asarray(gauss, logits.dtype)
    total = jnp.zeros((batch, *spatial, logits.shape[-1]), logits.dtype)
    norm = np.zeros((*spatial, 1), np.float32)
    for i, w in enumerate(windows):
      total = total.at[(slice(None), *w)].add(logits[i * batch : (i + 1) * batch] * weights)
      norm[w] += gauss
    return total / jnp.asarray(np.maximum(norm, np.finfo(np.float32).tiny), logits.dtype)


def _chunk(chunk: int | None, count: int) -> int | None:
  """The patches per network call of ``count`` patches: ``None`` (all at once) when ``chunk`` is
  ``None`` or holds them all.

  Raises:
    ValueError: ``chunk`` is not a positive integer or ``None``.
  """
  if chunk is not None and (not is_integer(chunk) or chunk < 1):
    raise ValueError(f"the patches per network call must be a positive integer or None, got {chunk!r}")
  return None if chunk is None or chunk >= count else int(chunk)


def _run_in_chunks(net: nnx.Module, gather: Any, count: int, chunk: int | None) -> jax.Array:
  """The network on ``count`` inputs, ``gather(indices)`` giving the batch of those inputs: at once, or
  in balanced batches of at most ``chunk`` run one after another (``lax.map``), each a
  ``jax.checkpoint``. The last batch is filled up with input 0; its outputs come after the others'."""
  if chunk is None or chunk >= count:
    return net(gather(range(count)))
  groups = -(-count // chunk)
  size = -(-count // groups)
  order = list(range(count)) + [0] * (groups * size - count)
  stacked = jnp.stack([gather(order[g * size : (g + 1) * size]) for g in range(groups)])
  out = jax.lax.map(jax.checkpoint(lambda patches: net(patches)), stacked)
  return out.reshape((-1, *out.shape[2:]))


class PatchIndex(nnx.Variable):
  """Where :class:`MarkedPatches` reads and writes its marked voxels: values of the frozen state, so
  that marks elsewhere change no compiled program."""


def _bucket(n: int, least: int) -> int:
  """The smallest power of two >= max(n, least)."""
  return 1 << max(int(max(n, least)) - 1, 0).bit_length()


def _patch_bucket(n: int, least: int) -> int:
  """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5 times them) >= max(n, least):
  padding adds less than half the patches' work (17 patches run as 24)."""
  n = max(int(n), int(least), 1)
  power = _bucket(n, 1)
  return power * 3 // 4 if power >= 4 and power * 3 // 4 >= n else power


class MarkedPatches(nnx.Module):
  """A network on the sliding-window patches that hold marks, its logits blended at the marked voxels
  only, as :func:`sliding_window_logits` blends them: the refinement loop of a large image whose
  compiled program depends on how many patches and marked voxels there are (rounded up, see
  :func:`marked_patches`), not on where they are.

  Its input is the patches stacked along the first spatial axis (``[B, P * p_0, p_1, ..., C]``, from
  :func:`marked_patches`), and its output the same patch space with each marked voxel's blended logits
  at one place (the voxel in the first patch holding it) and 0 elsewhere; the marks come in the same
  patch space. Where the patches sit is frozen state (:class:`PatchIndex`), so new marks reuse the
  compiled loop. Padding patches are zeros; padding voxels have weight 0. The output is 0 away from
  the marks, so ``RefineConfig.keep_weight`` (which reads the prediction everywhere) does not apply.

  Attributes:
    net: the network (its parameters are this module's, under ``net``).
    patch: the patch size.
    patches: how many patches the input holds (padding included).
    chunk: the most patches per network call (``None``: all at once); more run as in :class:`PatchBlend`.
    reads: ``int32[m, w]``: for each marked voxel, its flat index in each patch that holds it (``w``:
      the most patches any voxel of the grid lies in, rounded up to a power of two).
    weights: ``float32[m, w]``: the Gaussian weight of each, normalised to sum 1 (0: padding).
    writes: ``int32[m]``: where each marked voxel's blended logits go in the output.
  """

  def __init__(
    self,
    net: nnx.Module,
    patch: Sequence[int],
    in_channels: int,
    patches: int,
    reads: Any,
    weights: Any,
    writes: Any,
    chunk: int | None = None,
  ):
    _refuse_regions(net, "MarkedPatches")
    self.net = net
    self.patch = tuple(int(p) for p in patch)
    self.in_channels = int(in_channels)
    self.patches = int(patches)
    self.chunk = _chunk(chunk, self.patches)
    self.reads = PatchIndex(jnp.asarray(reads, jnp.int32))
    self.weights = PatchIndex(jnp.asarray(weights, jnp.float32))
    self.writes = PatchIndex(jnp.asarray(writes, jnp.int32))

  def layer_order(self) -> list[tuple]:
    """The network's layers (stated, or traced on one patch), under ``net``."""
    return _inner_order(self.net, (*self.patch, self.in_channels))

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, count, size = x.shape[0], self.patches, int(np.prod(self.patch))
    if x.shape[1:-1] != (count * self.patch[0], *self.patch[1:]):
      raise ValueError(
        f"MarkedPatches takes {count} patches of {self.patch} stacked along the first axis, got "
        f"spatial shape {x.shape[1:-1]}"
      )
    patches = x.reshape((batch, count, *self.patch, x.shape[-1]))
    gather = lambda indices: jnp.concatenate([patches[:, i] for i in indices], axis=0)
    logits = _run_in_chunks(self.net, gather, count, self.chunk)  # [groups..., batch, *patch, K]
    classes = logits.shape[-1]
    logits = logits.reshape((-1, batch, size, classes))[:count]  # [P, B, voxels, K]
    flat = jnp.moveaxis(logits, 1, 0).reshape((batch, count * size, classes))
    reads, weights = self.reads[...], self.weights[...].astype(flat.dtype)
    blended = jnp.einsum("bmjk,mj->bmk", flat[:, reads], weights)  # [B, m, K]
    out = jnp.zeros_like(flat).at[:, self.writes[...]].add(blended)
    return out.reshape((batch, count * self.patch[0], *self.patch[1:], classes))


def marked_patches(
  image: Any, marks: Any, patch_size: Sequence[int], step: float = 0.5, *, least_patches: int = 1, least_marks: int = 64
) -> tuple[np.ndarray, np.ndarray, dict]:
  """The inputs of a :class:`MarkedPatches` loop: the sliding-window patches of ``image`` that hold marks,
  stacked, the marks in the same patch space, and the module's patch positions.

  Args:
    image: ``[*spatial, C]``, every axis at least the patch.
    marks: ``int[*spatial]``, -1 unmarked.
    patch_size: the patch.
    step: the sliding window's step (a fraction of the patch).
    least_patches, least_marks: the counts are rounded up (patches: to 1, 2, 3, 4, 6, 8, 12, ...;
      marked voxels: to a power of two) no smaller than these, so that interactions with a few more or
      fewer marks share a compiled loop.

  Returns:
    ``(stacked image [P * p_0, p_1, ..., C], stacked marks [P * p_0, ...], kwargs)``: ``kwargs`` are
    ``patches``, ``reads``, ``weights``, ``writes`` and ``starts`` (the real patches' first voxels)
    for :class:`MarkedPatches` (pass all but ``starts``).

  Raises:
    ValueError: nothing is marked, or the patch does not fit (as :func:`marked_windows`).
  """
  image, marks = np.asarray(image), np.asarray(marks)
  patch = _patch(patch_size, marks.ndim)
  starts = np.asarray(marked_windows(marks, patch, step), np.int64)  # [P, d]
  count = _patch_bucket(len(starts), least_patches)
  size = int(np.prod(patch))
  gauss = gaussian_importance(patch)
  voxels = np.argwhere(marks >= 0)  # [m, d]
  m = len(voxels)
  # the most patches any voxel of this grid lies in (per axis, multiplied): from the image's shape, patch
  # and step alone, so that marks elsewhere give the same shapes (2**d for steps of half a patch or more
  # with exact strides; nnU-Net's rounded strides can give 3 per axis)
  ways = 1
  for n, p in zip(marks.shape, patch):
    cover = np.zeros(n + 1, np.int64)
    for a in window_starts(n, p, step):
      cover[a] += 1
      cover[a + p] -= 1
    ways *= int(np.cumsum(cover)[:n].max())
  ways = _bucket(ways, 1)
  rows = _bucket(m, least_marks)
  reads = np.zeros((rows, ways), np.int32)
  weights = np.zeros((rows, ways), np.float32)
  filled = np.zeros(m, np.int64)  # a voxel's patches, in order, fill its slots 0, 1, ...
  for p, start in enumerate(starts):  # one patch at a time: memory O(marked voxels)
    held_here = np.flatnonzero(np.all((voxels >= start) & (voxels < start + np.asarray(patch)), axis=1))
    local = voxels[held_here] - start
    slots = filled[held_here]
    reads[held_here, slots] = p * size + np.ravel_multi_index(tuple(local.T), patch)
    weights[held_here, slots] = gauss[tuple(local.T)]
    filled[held_here] += 1
  weights[:m] /= weights[:m].sum(axis=1, keepdims=True)
  writes = np.zeros((rows,), np.int32)
  writes[:m] = reads[:m, 0]  # each voxel's place: in the first patch holding it
  stacked_marks = np.full((count * size,), -1, np.int32)
  stacked_marks[writes[:m]] = marks[tuple(voxels.T)]
  stacked = np.zeros((count, *patch, image.shape[-1]), np.float32)
  for i, start in enumerate(starts):
    stacked[i] = image[tuple(slice(a, a + p) for a, p in zip(start, patch))]
  shape = (count * patch[0], *patch[1:])
  kwargs = {
    "patches": count,
    "reads": reads,
    "weights": weights,
    "writes": writes,
    "starts": tuple(tuple(int(v) for v in s) for s in starts),
  }
  return stacked.reshape((*shape, image.shape[-1])), stacked_marks.reshape(shape), kwargs


def _inner_order(net: nnx.Module, example_shape: Sequence[int]) -> list[tuple]:
  """A wrapped network's layers in forward order (stated, or traced on one input of ``example_shape``
  ``[*spatial, C]``), under the wrapper's ``net``."""
  from scribblejax.models.ordering import layer_order

  example = jax.ShapeDtypeStruct((1, *example_shape), jnp.float32)
  return [("net", *path) for path in layer_order(net, example)]


def mirror_combinations(axes: Sequence[int]) -> tuple[tuple[int, ...], ...]:
  """Every non-empty set of ``axes`` to flip together, in nnU-Net's order (singles, then pairs, ...)."""
  import itertools

  axes = tuple(axes)
  return tuple(c for k in range(1, len(axes) + 1) for c in itertools.combinations(axes, k))


class Mirrored(nnx.Module):
  """A network averaged over its input flipped along every combination of ``axes`` (test-time
  mirroring, nnU-Net's ``_internal_maybe_mirror_and_predict``): ``2**len(axes)`` passes as one batch.

  Attributes:
    net: the network (its parameters are this module's, under ``net``).
    axes: spatial axes (0 = the first spatial axis) that may be flipped.
    example_shape: one input's ``[*spatial, C]`` (for the traced layer order of a network that states
      none).
  """

  def __init__(self, net: nnx.Module, axes: Sequence[int], example_shape: Sequence[int]):
    _refuse_regions(net, "Mirrored")
    self.net = net
    self.example_shape = tuple(int(n) for n in example_shape)
    spatial = len(self.example_shape) - 1
    axes = tuple(axes)
    if not axes or len(set(axes)) != len(axes) or not all(is_integer(a) and 0 <= a < spatial for a in axes):
      raise ValueError(f"mirroring axes must be distinct spatial axes 0..{spatial - 1}, got {list(axes)}")
    self.axes = tuple(int(a) for a in axes)

  def layer_order(self) -> list[tuple]:
    """The network's layers, under ``net``."""
    return _inner_order(self.net, self.example_shape)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch = x.shape[0]
    flips = ((),) + mirror_combinations(self.axes)
    inputs = jnp.concatenate([jnp.flip(x, [a + 1 for a in f]) if f else x for f in flips], axis=0)
    logits = self.net(inputs)
    parts = [logits[i * batch : (i + 1) * batch] for i in range(len(flips))]
    total = sum(jnp.flip(part, [a + 1 for a in f]) if f else part for part, f in zip(parts, flips))
    return total / len(flips)


class SliceWise(nnx.Module):
  """A 2-D network applied to every slice along the first spatial axis of a 3-D input (nnU-Net's 2-D
  configurations on volumes): ``[B, Z, Y, X, C]`` runs as ``[B * Z, Y, X, C]``.

  Attributes:
    net: the 2-D network (its parameters are this module's, under ``net``).
    example_shape: one slice's ``[Y, X, C]`` (for the traced layer order of a network that states none).
  """

  def __init__(self, net: nnx.Module, example_shape: Sequence[int]):
    self.net = net
    self.example_shape = tuple(int(n) for n in example_shape)

  def layer_order(self) -> list[tuple]:
    """The network's layers, under ``net``."""
    return _inner_order(self.net, self.example_shape)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 5:
      raise ValueError(f"SliceWise takes [batch, slices, *2-D spatial, channels], got shape {x.shape}")
    out = self.net(x.reshape((x.shape[0] * x.shape[1], *x.shape[2:])))
    return out.reshape((x.shape[0], x.shape[1], *out.shape[1:]))
