"""Refine a batch spread over devices: data parallelism over the batch axis with ``jax.sharding``.

Every image of a batch is refined independently (its own marks, weights, step count and stop flag),
so a batch splits over devices with no communication: :func:`refine_sharded` places the images and
marks on a 1-D :class:`jax.sharding.Mesh` (axis ``"batch"``) with a
:class:`~jax.sharding.NamedSharding`, replicates the network's weights, and runs the batched
refinement of :func:`scribblejax.refine_batch` under ``jax.shard_map``: each device runs the
unsharded batched program on its own rows of the batch. The result equals the unsharded one (tested
on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``).

Several hosts (``jax.distributed``)::

    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    jax.distributed.initialize()                 # on every host (coordinator address from the cluster)
    mesh = batch_mesh()                          # every device of every host, one batch axis
    spec = NamedSharding(mesh, P("batch"))
    # each host validates and loads only its own slice of the batch ...
    local_images, local_marks = prepare_inputs(split, my_images, my_marks, batched=True)
    images = jax.make_array_from_process_local_data(spec, np.asarray(local_images))
    marks = jax.make_array_from_process_local_data(spec, np.asarray(local_marks))
    result = refine_sharded(split, images, marks, config, mesh=mesh)   # same call on every host
    mine = [s.data for s in result.logits.addressable_shards]           # this host's images

Arrays that span several hosts are not validated again (no host can see all of them) and their
batch must be a multiple of the number of devices; every host must run the same call. Tested with
two processes on one machine (``jax.distributed`` over gloo, one CPU device each; both drivers): each
host's images come out as a local :func:`scribblejax.refine_batch` of them would.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scribblejax import kernels
from scribblejax.params import Split, check_tunable

refine_lib = importlib.import_module("scribblejax.refinement.engine")  # the package re-exports the function `refine`

AXIS = "batch"


def batch_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh with axis ``"batch"`` over ``devices`` (default: every device, of every host)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("batch_mesh needs at least one device")
  return Mesh(np.asarray(devices), (AXIS,))


# ---------------------------------------------------------------------------------------------
# The driver: refine.py's pieces, each under shard_map, so that every device runs exactly the
# unsharded batched program on its own images (XLA's automatic partitioning of the grouped
# convolutions that vmap makes from per-image weights fails: "output feature dimension not
# divisible by feature_group_count").
# ---------------------------------------------------------------------------------------------

def _per_device(mesh, fn, batched_args: tuple[bool, ...], batched_out: bool = True):
  """``vmap`` of ``fn`` over the batched arguments, run on each device's rows of the batch."""
  rows, everywhere = PartitionSpec(AXIS), PartitionSpec()
  return jax.shard_map(refine_lib._batched(fn, batched_args), mesh=mesh,
                       in_specs=tuple(rows if b else everywhere for b in batched_args),
                       out_specs=rows if batched_out else everywhere, check_vma=False)


@functools.partial(refine_lib._jit, static_argnames=("graphdef", "static", "mesh", "batched_start"))
def _run_loop(graphdef, static, mesh, batched_start, anchor, start, frozen, image, marks, hyper):
  fn = functools.partial(refine_lib._loop_one, graphdef, static)
  return _per_device(mesh, fn, (False, batched_start, False, True, True, False))(anchor, start, frozen, image,
                                                                                 marks, hyper)


@functools.partial(refine_lib._jit, static_argnames=("graphdef", "compute_dtype", "conv_backend", "mesh"))
def _run_trunk(graphdef, compute_dtype, conv_backend, mesh, tunable, frozen, image):
  fn = functools.partial(refine_lib.trunk_residuals, graphdef, compute_dtype=compute_dtype,
                         conv_backend=conv_backend)
  return _per_device(mesh, fn, (False, False, True))(tunable, frozen, image)


@functools.partial(refine_lib._jit, static_argnames=("graphdef", "conv_backend", "mesh"))
def _run_keep_targets(graphdef, conv_backend, mesh, tunable, frozen, image, marks):
  # refine.py's _keep_targets, each device on its rows: the network's own labels for keep_weight
  fn = lambda t, f, x, m: refine_lib.keep_encoding(refine_lib._run_predict(graphdef, conv_backend, t, f, x), m)
  return _per_device(mesh, fn, (False, False, True, True))(tunable, frozen, image, marks)


@functools.partial(refine_lib._jit, static_argnames=("static", "mesh"))
def _run_init(static, mesh, start, hyper):
  return _per_device(mesh, lambda s, h: refine_lib.init_state(s, static, h), (True, False))(start, hyper)


@functools.partial(refine_lib._jit, static_argnames=("graphdef", "static", "check_every", "mesh"),
                   donate_argnames=("state",))
def _run_chunk(graphdef, static, check_every, mesh, anchor, frozen, image, marks, hyper, state, residuals):
  fn = functools.partial(refine_lib._chunk_one, graphdef, static, check_every)
  return _per_device(mesh, fn, (False, False, True, True, False, True, True))(anchor, frozen, image, marks, hyper,
                                                                              state, residuals)


@functools.partial(refine_lib._jit, static_argnames=("graphdef", "static", "mesh"))
def _run_finalize(graphdef, static, mesh, frozen, image, marks, state, residuals=None):
  fn = lambda f, i, m, s, r: refine_lib.finalize(graphdef, f, i, m, static, s, r)
  return _per_device(mesh, fn, (False, True, True, True, True))(frozen, image, marks, state, residuals)


def _drive(split: Split, images, marks, config, mesh: Mesh, start, batched_start: bool):
  """refine.py's driver, with every compiled piece split over the mesh's batch axis."""
  static, hyper = refine_lib._static(config, True), refine_lib._hyper(config)
  anchor, graphdef = split.tunable, refine_lib.graph_key(split.graphdef)
  if config.keep_weight > 0:
    marks = _run_keep_targets(graphdef, kernels.resolve_conv_backend("auto"), mesh, anchor, split.frozen, images,
                              marks)
  if refine_lib._driver(config) == "loop":
    return _run_loop(graphdef, static, mesh, batched_start, anchor, start, split.frozen, images, marks, hyper)
  if not batched_start:
    start = jax.tree.map(lambda x: jnp.broadcast_to(x, (images.shape[0], *x.shape)), start)
  state = _run_init(static, mesh, start, hyper)
  residuals = (_run_trunk(graphdef, static.compute_dtype, static.conv_backend, mesh, anchor, split.frozen, images)
               if config.cache_trunk else None)
  while True:
    # one replicated flag, which every host holds (the per-image flags of other hosts it cannot fetch)
    if bool(np.asarray(_all_finished(state.done, state.step, config.max_steps).addressable_data(0))):
      break
    state = _run_chunk(graphdef, static, config.check_every, mesh, anchor, split.frozen, images, marks, hyper,
                       state, residuals)
  return _run_finalize(graphdef, static, mesh, split.frozen, images, marks, state, residuals)


@jax.jit
def _all_finished(done: jax.Array, step: jax.Array, max_steps: int) -> jax.Array:
  """Whether every image of the (possibly multi-host) batch is finished, as a replicated scalar."""
  return jnp.all(done | (step >= max_steps))


def _global(x: Any) -> bool:
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def refine_sharded(split: Split, images: Any, marks: Any, config: Any = None, *, mesh: Mesh | None = None,
                   start: Any = None):
  """:func:`scribblejax.refine_batch`, with the batch spread over the devices of ``mesh``.

  A batch that is not a multiple of the number of devices is padded with copies of its last image
  without marks (these take no step) and the padding is dropped from the result.

  Args:
    split: from :func:`scribblejax.split_params`; its weights are replicated on every device.
    images: ``[batch, *spatial, channels]`` or ``[batch, *spatial]`` (host arrays, or arrays already
      sharded over ``mesh``, e.g. from ``jax.make_array_from_process_local_data``).
    marks: int ``[batch, *spatial]``.
    config: a :class:`scribblejax.RefineConfig`. A ``"sequential"`` batch scheme (what ``"auto"``
      means on CPU) becomes ``"vmap"``: each device refines its images in one program.
    mesh: a 1-D mesh with axis ``"batch"``; default :func:`batch_mesh` over every device.
    start: per-image tunable parameters to start from (leaves ``[batch, *shape]``), as in
      :func:`scribblejax.refine_batch`.

  Returns:
    A :class:`scribblejax.RefineResult` whose fields have a leading batch axis, sharded over ``mesh``
    (when the batch needed no padding).

  Raises:
    ValueError: bad input (as :func:`scribblejax.refine_batch`), or a mesh without a ``"batch"`` axis.
  """
  config = refine_lib.RefineConfig() if config is None else config
  mesh = batch_mesh() if mesh is None else mesh
  if mesh.axis_names != (AXIS,):
    raise ValueError(f"the mesh must be 1-D with axis {AXIS!r}, got axes {mesh.axis_names}")
  if refine_lib.resolve_batch_scheme(config.batch_scheme) == "sequential":
    config = dataclasses.replace(config, batch_scheme="vmap")
  n = mesh.size
  rows = NamedSharding(mesh, PartitionSpec(AXIS))
  everywhere = NamedSharding(mesh, PartitionSpec())
  if _global(images) or _global(marks):
    batch = images.shape[0]
    if batch % n:
      raise ValueError(f"a batch spanning several hosts must be a multiple of the {n} devices, got {batch}")
    pad = 0
  else:
    images, marks = refine_lib.prepare_inputs(split, images, marks, batched=True)
    images, marks = np.asarray(images), np.asarray(marks)
    batch = images.shape[0]
    pad = (-batch) % n
    if pad:
      images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
      marks = np.concatenate([marks, np.full((pad, *marks.shape[1:]), -1, marks.dtype)])
  if start is not None:
    start = check_tunable(split, start, "start", batch=batch)
    if pad:
      start = jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]), start)
    start = jax.device_put(start, rows)
  images = jax.device_put(images, rows)
  marks = jax.device_put(marks, rows)
  placed = Split(split.graphdef, jax.device_put(split.tunable, everywhere), jax.device_put(split.frozen, everywhere))
  result = _drive(placed, images, marks, config, mesh, placed.tunable if start is None else start, start is not None)
  if pad:
    result = jax.tree.map(lambda x: x[:batch], result)
  return result
