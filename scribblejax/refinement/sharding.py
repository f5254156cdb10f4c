"""Refine a batch spread over devices: data parallelism over the batch axis with ``jax.sharding``.

Every image of a batch is refined independently (its own marks, weights, step count and stop flag),
so a batch splits over devices with no communication: :func:`refine_sharded` places the images and
marks on a 1-D :class:`jax.sharding.Mesh` (axis ``"batch"``) with a
:class:`~jax.sharding.NamedSharding`, replicates the network's weights, and runs the batched
refinement of :func:`scribblejax.refine_batch` under ``jax.shard_map``: each device runs the
unsharded batched program on its own rows of the batch (the drivers of
:mod:`scribblejax.refinement.drivers`, placed with :func:`~scribblejax.refinement.drivers.on_mesh`). The
result equals the unsharded one (tested on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``).

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from scribblejax.config import RefineConfig
from scribblejax.params import Split, check_tunable
from scribblejax.refinement import drivers
from scribblejax.refinement.backend import resolve_batch_scheme
from scribblejax.refinement.inputs import prepare_inputs

AXIS = drivers.BATCH_AXIS


def batch_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh with axis ``"batch"`` over ``devices`` (default: every device, of every host)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("batch_mesh needs at least one device")
  return Mesh(np.asarray(devices), (AXIS,))


def _global(x: Any) -> bool:
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def refine_sharded(
  split: Split, images: Any, marks: Any, config: Any = None, *, mesh: Mesh | None = None, start: Any = None
):
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
  config = RefineConfig() if config is None else config
  mesh = batch_mesh() if mesh is None else mesh
  if mesh.axis_names != (AXIS,):
    raise ValueError(f"the mesh must be 1-D with axis {AXIS!r}, got axes {mesh.axis_names}")
  if resolve_batch_scheme(config.batch_scheme) == "sequential":
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
    images, marks = prepare_inputs(split, images, marks, batched=True)
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
  result = drivers.drive(placed, images, marks, config, drivers.on_mesh(mesh), start, batched_start=start is not None)
  if pad:
    result = jax.tree.map(lambda x: x[:batch], result)
  return result
