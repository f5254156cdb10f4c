"""The programs that run Algorithm 1, written once over a placement: one image, a vmapped batch, a mesh.

Two drivers run the same guarded :func:`scribblejax.refinement.algorithm.step`:

* ``"loop"``: one compiled ``lax.while_loop`` runs the whole refinement on the device.
* ``"host"``: a compiled chunk of ``check_every`` steps, driven from Python, which checks the stop
  rule between chunks (what ``"auto"`` picks where XLA runs convolution gradients slowly inside a
  loop body: :func:`scribblejax.refinement.backend.resolve_driver`).

Both give the same result: each step is guarded (a step after the stop rule fired changes nothing),
so the host driver's extra steps inside its last chunk are no-ops.

A :class:`Placement` says how each compiled program maps over images: one image as it is; a batch
under ``jax.vmap`` (every image its own weights, steps and flags); a batch over a device mesh, each
device running the vmapped program on its own rows under ``jax.shard_map`` (XLA's automatic
partitioning of the grouped convolutions that vmap makes from per-image weights fails). The compiled
programs are module-level so that their compilation caches persist between calls.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from scribblejax import kernels
from scribblejax.config import RefineConfig
from scribblejax.params import Split
from scribblejax.refinement import algorithm, network
from scribblejax.refinement.algorithm import Hyper, RefineResult, RefineState, Settings
from scribblejax.refinement.backend import Backend, differentiate, driver_of, flattens, jit

BATCH_AXIS = "batch"


@dataclasses.dataclass(frozen=True)
class Placement:
  """How the compiled programs map over images (hashable: a static argument of each).

  Attributes:
    batched: the arrays hold a leading batch axis, mapped with ``jax.vmap``.
    mesh: a 1-D :class:`jax.sharding.Mesh` with axis :data:`BATCH_AXIS`: each device maps over its
      own rows of the batch (``batched`` must be set); ``None``: one device.
  """

  batched: bool = False
  mesh: Any = None


SINGLE = Placement()
BATCH = Placement(batched=True)


def on_mesh(mesh: Any) -> Placement:
  """The placement of a batch spread over ``mesh``'s devices."""
  return Placement(batched=True, mesh=mesh)


def _mapped(placement: Placement, fn, batched_args: tuple[bool, ...], batched_out: bool = True):
  """``fn`` over the placement: as it is, ``vmap`` over the batched arguments, or that on each device's rows."""
  if not placement.batched:
    return fn
  fn = jax.vmap(fn, in_axes=tuple(0 if b else None for b in batched_args))
  if placement.mesh is None:
    return fn
  rows, everywhere = PartitionSpec(BATCH_AXIS), PartitionSpec()
  return jax.shard_map(
    fn,
    mesh=placement.mesh,
    in_specs=tuple(rows if b else everywhere for b in batched_args),
    out_specs=rows if batched_out else everywhere,
    check_vma=False,
  )


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------


def _loop_one(
  graphdef, settings: Settings, backend: Backend, anchor, start, frozen, image, marks, keep, hyper, residuals=None
) -> RefineResult:
  """The whole refinement of one image as one ``lax.while_loop`` (W_lam carried flat where
  :func:`~scribblejax.refinement.backend.flattens` says so)."""
  if residuals is None and backend.cache_trunk:
    residuals = network.trunk_residuals(graphdef, anchor, frozen, image, backend.compute_dtype, backend.conv_backend)
  unravel = None
  if flattens(backend, settings.optimizer, anchor):
    anchor, unravel = jax.flatten_util.ravel_pytree(anchor)
    start = jax.flatten_util.ravel_pytree(start)[0]
  as_tree = (lambda t: t) if unravel is None else unravel
  logits_of = lambda t: network.logits(graphdef, as_tree(t), frozen, image, residuals, backend, backend.remat)
  state = algorithm.init_state(start, settings, hyper)
  tree = as_tree(start)
  logits = jnp.zeros(
    jax.eval_shape(lambda: network.logits(graphdef, tree, frozen, image, residuals, backend)).shape, jnp.float32
  )
  state, logits = jax.lax.while_loop(
    lambda c: ~c[0].done & (c[0].step < hyper.max_steps),
    lambda c: algorithm.step(c[0], logits_of, anchor, marks, keep, settings, hyper, differentiate(backend)),
    (state, logits),
  )
  state = state._replace(tunable=as_tree(state.tunable))
  return algorithm.finalize(
    state, lambda t: network.logits(graphdef, t, frozen, image, residuals, backend), marks, settings, last_logits=logits
  )


def _chunk_one(
  graphdef,
  settings: Settings,
  backend: Backend,
  check_every: int,
  anchor,
  frozen,
  image,
  marks,
  keep,
  hyper,
  state,
  residuals=None,
) -> RefineState:
  """``check_every`` guarded steps of one image."""
  logits_of = lambda t: network.logits(graphdef, t, frozen, image, residuals, backend, backend.remat)
  for _ in range(check_every):
    state = algorithm.step(state, logits_of, anchor, marks, keep, settings, hyper, differentiate(backend))[0]
  return state


def _finalize_one(
  graphdef, settings: Settings, backend: Backend, frozen, image, marks, state, residuals=None
) -> RefineResult:
  return algorithm.finalize(
    state, lambda t: network.logits(graphdef, t, frozen, image, residuals, backend), marks, settings
  )


# ---------------------------------------------------------------------------------------------
# Compiled programs
# ---------------------------------------------------------------------------------------------


@functools.partial(jit, static_argnames=("graphdef", "settings", "backend", "placement", "batched_start"))
def loop_program(
  graphdef,
  settings,
  backend,
  placement,
  anchor,
  start,
  frozen,
  image,
  marks,
  keep,
  hyper,
  batched_start=False,
  residuals=None,
) -> RefineResult:
  """The loop driver: every image's whole refinement (a batch computes its trunks inside)."""
  fn = functools.partial(_loop_one, graphdef, settings, backend)
  if placement.batched:
    return _mapped(placement, fn, (False, batched_start, False, True, True, True, False))(
      anchor, start, frozen, image, marks, keep, hyper
    )
  return fn(anchor, start, frozen, image, marks, keep, hyper, residuals)


@functools.partial(jit, static_argnames=("settings", "placement", "batch_size", "batched_start"))
def init_program(settings, placement, start, hyper, batch_size, batched_start=False) -> RefineState:
  """The host driver's initial state (one per image of a batch: from ``start``'s rows, or W broadcast)."""
  if batched_start:
    return _mapped(placement, lambda s, h: algorithm.init_state(s, settings, h), (True, False))(start, hyper)
  state = algorithm.init_state(start, settings, hyper)
  if placement.batched:
    state = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch_size, *jnp.shape(x))), state)
  return state


@functools.partial(
  jit, static_argnames=("graphdef", "settings", "backend", "check_every", "placement"), donate_argnames=("state",)
)
def chunk_program(
  graphdef, settings, backend, check_every, placement, anchor, frozen, image, marks, keep, hyper, state, residuals=None
) -> RefineState:
  """The host driver's chunk of ``check_every`` steps."""
  fn = functools.partial(_chunk_one, graphdef, settings, backend, check_every)
  return _mapped(placement, fn, (False, False, True, True, True, False, True, True))(
    anchor, frozen, image, marks, keep, hyper, state, residuals
  )


@functools.partial(jit, static_argnames=("graphdef", "compute_dtype", "conv_backend", "placement"))
def trunk_program(graphdef, compute_dtype, conv_backend, placement, tunable, frozen, image) -> list:
  """The trunk's residuals of every image."""
  fn = functools.partial(network.trunk_residuals, graphdef, compute_dtype=compute_dtype, conv_backend=conv_backend)
  return _mapped(placement, fn, (False, False, True))(tunable, frozen, image)


@functools.partial(jit, static_argnames=("graphdef", "settings", "backend", "placement"))
def finalize_program(
  graphdef, settings, backend, placement, frozen, image, marks, state, residuals=None
) -> RefineResult:
  """The host driver's result: W_lam evaluated once more."""
  fn = functools.partial(_finalize_one, graphdef, settings, backend)
  return _mapped(placement, fn, (False, True, True, True, True))(frozen, image, marks, state, residuals)


@functools.partial(jit, static_argnames=("graphdef", "conv_backend", "compute_dtype"))
def predict_program(graphdef, conv_backend, tunable, frozen, image, residuals=None, compute_dtype=None) -> jax.Array:
  """The logits of one image: the trunk (unless its residuals are given) and the tail, as the refinement
  computes them (with the same faster forms of some operations). ``conv_backend`` is resolved by the
  caller, outside any trace (resolving may build the kernels)."""
  backend = Backend(compute_dtype=compute_dtype, conv_backend=conv_backend)
  if residuals is None:
    residuals = network.trunk_residuals(graphdef, tunable, frozen, image, compute_dtype, conv_backend)
  return network.logits(graphdef, tunable, frozen, image, residuals, backend)


@functools.partial(jit, static_argnames=("graphdef", "conv_backend", "placement"))
def keep_targets_program(graphdef, conv_backend, placement, tunable, frozen, image) -> jax.Array:
  """The network's initial labels, the keep term's targets
  (:func:`~scribblejax.refinement.algorithm.initial_labels`), each image in one program (a mesh's devices on
  their own rows)."""
  fn = lambda t, f, x: algorithm.initial_labels(predict_program(graphdef, conv_backend, t, f, x))
  return _mapped(placement, fn, (False, False, True))(tunable, frozen, image)


PROGRAMS = {
  "loop": loop_program,
  "init": init_program,
  "chunk": chunk_program,
  "trunk": trunk_program,
  "finalize": finalize_program,
  "predict": predict_program,
  "keep_targets": keep_targets_program,
}


def cache_sizes() -> dict[str, int]:
  """How many programs each compiled function holds (tests and benchmarks compare them to detect retracing)."""
  return {name: program.cache_size() for name, program in PROGRAMS.items()}


@jax.jit
def _all_finished(done: jax.Array, step: jax.Array, max_steps: int) -> jax.Array:
  """Whether every image of the (possibly multi-host) batch is finished, as a replicated scalar."""
  return jnp.all(done | (step >= max_steps))


# ---------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------


def keep_targets(
  split: Split,
  image: jax.Array,
  marks: jax.Array | None,
  keep_weight: float,
  placement: Placement = SINGLE,
  cached: jax.Array | None = None,
) -> jax.Array:
  """The keep term's targets: the network's initial labels when ``keep_weight`` is positive, else none.

  Either way the refinement's programs take the same arguments, so changing ``keep_weight`` never
  recompiles them.

  Args:
    split: the split whose network W gives the labels (its own tunable weights, not a W_lam).
    image: the validated image, placed as the refinement places it.
    marks: the validated marks; read only when ``keep_weight`` is 0, for the shape of the map that says
      "no targets" (so it may be ``None`` otherwise).
    keep_weight: the keep term's weight (``RefineConfig.keep_weight``).
    placement: where the arrays live (one device, or a mesh for a batch).
    cached: the targets this function returned before for this split and image (a
      :class:`~scribblejax.refinement.Trunk` holds them): returned as they are, and the network is not run.

  Returns:
    int32, shaped and placed like the marks (a leading batch axis for a batch): W's labels
    (:func:`~scribblejax.refinement.algorithm.initial_labels`, the whole network in float32), or
    :func:`~scribblejax.refinement.algorithm.no_keep`'s map when ``keep_weight`` is 0 (the network is not run).
  """
  if not keep_weight > 0:
    return algorithm.no_keep(marks)
  if cached is not None:
    return cached
  conv_backend = kernels.resolve_conv_backend("auto")
  graphdef = network.graph_key(split.graphdef)
  if placement.mesh is not None:
    return keep_targets_program(graphdef, conv_backend, placement, split.tunable, split.frozen, image)
  images = image if placement.batched else image[None]
  logits = jnp.stack([predict_program(graphdef, conv_backend, split.tunable, split.frozen, x) for x in images])
  return algorithm.initial_labels(logits if placement.batched else logits[0])


def _finished(placement: Placement, state: RefineState, max_steps: int, progress: Any) -> bool:
  if placement.mesh is not None:
    # one replicated flag, which every host holds (the per-image flags of other hosts it cannot fetch)
    return bool(np.asarray(_all_finished(state.done, state.step, max_steps).addressable_data(0)))
  finished, steps = jax.device_get((state.done | (state.step >= max_steps), state.step))
  if progress is not None:
    progress(int(np.max(steps)), max_steps)
  return bool(np.asarray(finished).all())


def drive(
  split: Split,
  image: jax.Array,
  marks: jax.Array,
  config: RefineConfig,
  placement: Placement = SINGLE,
  start: Any = None,
  *,
  batched_start: bool = False,
  progress: Any = None,
  residuals: list | None = None,
  backend: Backend | None = None,
  targets: jax.Array | None = None,
) -> RefineResult:
  """Refines validated inputs with the driver ``config`` resolves to.

  Args:
    split: the network (its arrays placed where ``placement`` needs them).
    image: float32 ``[*spatial, C]``, with a leading batch axis for a batched placement.
    marks: int32 ``[*spatial]``, the user's map (batched likewise); the keep term's targets are computed
      here (:func:`keep_targets`) and passed on beside it.
    config: the settings.
    placement: :data:`SINGLE`, :data:`BATCH` or :func:`on_mesh`.
    start: the tunable parameters to start from; ``None``: W (``split.tunable``).
    batched_start: ``start``'s leaves hold one row per image.
    progress: ``progress(steps_taken, max_steps)``, after each chunk (host driver) or once at the end
      (loop driver); not called on a mesh.
    residuals: the trunk's residuals of this image (one image only), computed once elsewhere.
    backend: the backend settings; ``None``: :meth:`Backend.of` ``config`` (benchmarks pass one with a
      field changed to compare the two forms).
    targets: the keep term's targets computed before for this split and image (one image only; a trunk's),
      else they are computed here.

  Returns:
    A :class:`~scribblejax.refinement.algorithm.RefineResult` (fields with a leading batch axis for a
    batched placement).
  """
  settings, hyper = Settings.of(config), Hyper.of(config)
  backend = Backend.of(config, placement.batched) if backend is None else backend
  graphdef = network.graph_key(split.graphdef)
  anchor = split.tunable
  start = anchor if start is None else start
  keep = keep_targets(split, image, marks, config.keep_weight, placement, targets)
  if driver_of(config) == "loop":
    result = loop_program(
      graphdef,
      settings,
      backend,
      placement,
      anchor,
      start,
      split.frozen,
      image,
      marks,
      keep,
      hyper,
      batched_start=batched_start,
      residuals=residuals,
    )
    if progress is not None:
      progress(int(np.max(jax.device_get(result.num_steps))), config.max_steps)
    return result
  if placement.mesh is not None and not batched_start:
    start = jax.tree.map(lambda x: jnp.broadcast_to(x, (image.shape[0], *x.shape)), start)
    batched_start = True
  state = init_program(
    settings, placement, start, hyper, image.shape[0] if placement.batched else 1, batched_start=batched_start
  )
  if residuals is None and backend.cache_trunk:
    residuals = trunk_program(
      graphdef, backend.compute_dtype, backend.conv_backend, placement, anchor, split.frozen, image
    )
  while not _finished(placement, state, config.max_steps, progress):
    state = chunk_program(
      graphdef,
      settings,
      backend,
      config.check_every,
      placement,
      anchor,
      split.frozen,
      image,
      marks,
      keep,
      hyper,
      state,
      residuals,
    )
  return finalize_program(graphdef, settings, backend, placement, split.frozen, image, marks, state, residuals)


def lowered_programs(split: Split, image: jax.Array, marks: jax.Array, config: RefineConfig) -> tuple[str, dict]:
  """The programs one refinement of one validated image runs, lowered (compiled by nothing yet).

  Returns:
    ``(driver, {name: jax.stages.Lowered})``: ``"loop"``, or the host driver's ``"trunk"`` (with
    ``cache_trunk``), ``"chunk"`` and ``"finalize"``.
  """
  settings, hyper, backend = Settings.of(config), Hyper.of(config), Backend.of(config)
  anchor, frozen, graphdef = split.tunable, split.frozen, network.graph_key(split.graphdef)
  keep = jax.ShapeDtypeStruct(marks.shape, jnp.int32)  # the programs are the same for any keep_weight
  driver = driver_of(config)
  if driver == "loop":
    return driver, {
      "loop": loop_program.lower(graphdef, settings, backend, SINGLE, anchor, anchor, frozen, image, marks, keep, hyper)
    }
  # shapes only, from the plain functions (on GPUs the compiled ones take XLA options, refused when nested)
  state = jax.eval_shape(lambda a, h: algorithm.init_state(a, settings, h), anchor, hyper)
  programs, residuals = {}, None
  if config.cache_trunk:
    trunk = functools.partial(
      network.trunk_residuals, graphdef, compute_dtype=backend.compute_dtype, conv_backend=backend.conv_backend
    )
    residuals = jax.eval_shape(trunk, anchor, frozen, image)
    programs["trunk"] = trunk_program.lower(
      graphdef, backend.compute_dtype, backend.conv_backend, SINGLE, anchor, frozen, image
    )
  programs["chunk"] = chunk_program.lower(
    graphdef, settings, backend, config.check_every, SINGLE, anchor, frozen, image, marks, keep, hyper, state, residuals
  )
  programs["finalize"] = finalize_program.lower(
    graphdef, settings, backend, SINGLE, frozen, image, marks, state, residuals
  )
  return driver, programs
